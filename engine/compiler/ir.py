"""The compiler's IR: a flat SSA list of nodes over typed values.

A `Program` has inputs (the traced function's tensor arguments), captures
(concrete tensors the function read from its closure, such as parameters and
optimizer state: read afresh at every call), constants (folded arrays), nodes
in execution order, and outputs (the function's results, then the state written
back: updated buffers and gradients). Passes are pure functions Program -> Program.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

_ids = itertools.count()


class Value:
    """One SSA value: an id, a shape and a dtype."""

    __slots__ = ("id", "shape", "dtype")

    def __init__(self, shape: tuple, dtype: Any) -> None:
        self.id = next(_ids)
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)

    @property
    def type_str(self) -> str:
        return f"{_DTYPE_NAMES.get(self.dtype, str(self.dtype))}[{','.join(map(str, self.shape))}]"

    def __repr__(self) -> str:
        return f"%{self.id}"


_DTYPE_NAMES = {np.dtype(k): v for k, v in [(np.float32, "f32"), (np.float64, "f64"), (np.float16, "f16"),
                                              (np.int64, "i64"), (np.int32, "i32"), (bool, "bool")]}


@dataclass(frozen=True)
class Node:
    """out = op(*inputs, **params). Inputs are Values or Python scalars."""

    op: Any
    inputs: tuple
    params: dict
    out: Value

    def with_inputs(self, inputs: tuple) -> "Node":
        return replace(self, inputs=inputs)


@dataclass
class Program:
    inputs: list
    captures: list                       # [(Value, Tensor)]
    constants: dict                      # Value -> backend array
    nodes: list
    outputs: list                        # Values (or Python scalars) returned by the program
    meta: dict = field(default_factory=dict)

    def copy(self, **changes: Any) -> "Program":
        fields = dict(inputs=list(self.inputs), captures=list(self.captures),
                      constants=dict(self.constants), nodes=list(self.nodes),
                      outputs=list(self.outputs), meta=dict(self.meta))
        fields.update(changes)
        return Program(**fields)

    # -- views ----------------------------------------------------------------------------
    def producers(self) -> dict:
        return {n.out: n for n in self.nodes}

    def uses(self) -> dict:
        """Value -> number of uses (node inputs and outputs)."""
        count: dict = {}
        for n in self.nodes:
            for v in n.inputs:
                if isinstance(v, Value):
                    count[v] = count.get(v, 0) + 1
        for v in self.outputs:
            if isinstance(v, Value):
                count[v] = count.get(v, 0) + 1
        return count

    # -- printing -----------------------------------------------------------------------------
    def __str__(self) -> str:
        lines = []
        heads = [f"{v}: {v.type_str}" for v in self.inputs]
        heads += [f"{v}: {v.type_str} (captured)" for v, _ in self.captures]
        lines.append(f"program({', '.join(heads)}) {{")
        for v, arr in self.constants.items():
            lines.append(f"  {v} = constant : {v.type_str}")
        for n in self.nodes:
            args = ", ".join(_arg(a) for a in n.inputs)
            params = ", ".join(f"{k}={_param(p)}" for k, p in n.params.items())
            sep = ", " if args and params else ""
            lines.append(f"  {n.out} = {op_name(n.op)}({args}{sep}{params}) : {n.out.type_str}")
        lines.append(f"  return ({', '.join(_arg(o) for o in self.outputs)})")
        lines.append("}")
        return "\n".join(lines)

    def to_mermaid(self) -> str:
        """The dataflow graph as a Mermaid flowchart."""
        out = ["flowchart TD"]
        for v in self.inputs:
            out.append(f'  v{v.id}[/"input {v} {v.type_str}"/]')
        for v, _ in self.captures:
            out.append(f'  v{v.id}[/"captured {v} {v.type_str}"/]')
        for v in self.constants:
            out.append(f'  v{v.id}(["const {v} {v.type_str}"])')
        for n in self.nodes:
            out.append(f'  v{n.out.id}["{op_name(n.op)} {n.out.type_str}"]')
            for a in n.inputs:
                if isinstance(a, Value):
                    out.append(f"  v{a.id} --> v{n.out.id}")
        for i, o in enumerate(self.outputs):
            if isinstance(o, Value):
                out.append(f'  out{i}(("output {i}"))')
                out.append(f"  v{o.id} --> out{i}")
        return "\n".join(out)

    def to_dot(self) -> str:
        """The dataflow graph in Graphviz DOT."""
        out = ["digraph program {", "  rankdir=TB; node [fontname=monospace];"]
        for v in self.inputs:
            out.append(f'  v{v.id} [shape=invhouse, label="input {v}\\n{v.type_str}"];')
        for v, _ in self.captures:
            out.append(f'  v{v.id} [shape=invhouse, style=dashed, label="captured {v}\\n{v.type_str}"];')
        for v in self.constants:
            out.append(f'  v{v.id} [shape=note, label="const {v}\\n{v.type_str}"];')
        for n in self.nodes:
            out.append(f'  v{n.out.id} [shape=box, label="{op_name(n.op)}\\n{n.out.type_str}"];')
            for a in n.inputs:
                if isinstance(a, Value):
                    out.append(f"  v{a.id} -> v{n.out.id};")
        for i, o in enumerate(self.outputs):
            if isinstance(o, Value):
                out.append(f'  out{i} [shape=doublecircle, label="out {i}"];')
                out.append(f"  v{o.id} -> out{i};")
        out.append("}")
        return "\n".join(out)


def op_name(op: Any) -> str:
    return getattr(op, "name", type(op).__name__)


def _arg(a: Any) -> str:
    return repr(a) if isinstance(a, Value) else repr(a)


def _param(p: Any) -> str:
    if isinstance(p, np.dtype):
        return _DTYPE_NAMES.get(p, str(p))
    return repr(p)
