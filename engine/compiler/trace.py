"""Tracing: run a Python function on abstract tensors and record its ops as IR.

The tracer is an interpreter like eager mode; only what an op *produces* differs
(an abstract value with the shape and dtype of the op's rule, plus an IR node).
Autograd recording is shared, so `loss.backward()` and optimizer steps inside the
function are traced too. Concrete tensors the function reaches (parameters,
optimizer state) become captured inputs, read afresh at every call; in-place
updates and gradients they receive become outputs written back after the call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import ops
from ops.errors import TraceError

from ..dispatch import EagerInterpreter, interpret
from ..state import no_grad
from ..tensor import Tensor
from .ir import Node, Program, Value


class AbstractArray:
    """Stands in for an array while tracing: shape and dtype only, plus its IR value."""

    __slots__ = ("value",)
    is_abstract = True

    def __init__(self, value: Value) -> None:
        self.value = value

    @property
    def shape(self) -> tuple:
        return self.value.shape

    @property
    def dtype(self) -> np.dtype:
        return self.value.dtype

    @property
    def ndim(self) -> int:
        return len(self.value.shape)

    def __repr__(self) -> str:
        return f"AbstractArray({self.value.type_str})"


def is_abstract(x: Any) -> bool:
    return getattr(x, "is_abstract", False)


@dataclass
class _Saved:
    """The state of an outside tensor before tracing touched it."""
    tensor: Tensor
    data: Any
    grad: Any
    version: int
    ctx: Any
    requires_grad: bool


@dataclass
class Writeback:
    """After a call, put output `index` into `tensor` (its data, or its .grad)."""
    tensor: Tensor
    kind: str                      # "data" | "grad" | "grad_none"
    index: int = -1


class TraceInterpreter(EagerInterpreter):
    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.captures: dict[int, tuple[Value, Tensor]] = {}
        self.saved: dict[int, _Saved] = {}

    # -- the two hooks ---------------------------------------------------------------------------
    def compute(self, op: ops.Op, backend: Any, raw: list, args: tuple, params: dict) -> Any:
        inputs = []
        for a, r in zip(args, raw):
            if isinstance(a, Tensor):
                inputs.append(r.value if is_abstract(r) else self.capture(a))
            else:
                inputs.append(r)
        shape, dtype = op.infer(*args, **params)
        out = Value(shape, dtype)
        self.nodes.append(Node(op, tuple(inputs), dict(params), out))
        return AbstractArray(out)

    def assign(self, t: Tensor, name: str, value: Any, index: tuple | None) -> None:
        if index is not None:
            raise TraceError(
                f"indexed assignment (t[...] = v) on a tensor of shape {t.shape} inside jit: "
                f"compiled programs are functional; build the new value with eg.where(...) "
                f"or eg.concatenate(...) instead")
        from ..dispatch import _INPLACE_OPS
        with no_grad():
            if name == "copy":
                new = _as_tensor_like(t, value)
            else:
                new = ops.REGISTRY[_INPLACE_OPS[name]](t, value)
        self.remember(t)
        t._data = new._data

    # -- outside tensors --------------------------------------------------------------------------
    def remember(self, t: Tensor) -> None:
        if id(t) not in self.saved:
            self.saved[id(t)] = _Saved(t, t._data, t.grad, t._version[0], t._ctx, t.requires_grad)

    def capture(self, t: Tensor) -> Value:
        """The IR input standing for concrete tensor `t` (read at every call)."""
        got = self.captures.get(id(t))
        if got is None:
            self.remember(t)
            got = self.captures[id(t)] = (Value(t.shape, t.dtype), t)
        return got[0]

    def restore(self) -> None:
        for s in self.saved.values():
            s.tensor._data, s.tensor.grad, s.tensor._ctx = s.data, s.grad, s.ctx
            s.tensor._version[0] = s.version
            s.tensor.requires_grad = s.requires_grad


def _as_tensor_like(t: Tensor, value: Any) -> Tensor:
    """`value` with t's shape and dtype (what copying it into t's buffer would store)."""
    from ..creation import full
    if not isinstance(value, Tensor):
        return full(t.shape, value, t.dtype, t.device)
    if value.dtype != t.dtype:
        value = ops.REGISTRY["cast"](value, dtype=t.dtype)
    if value.shape != t.shape:
        value = ops.REGISTRY["broadcast_to"](value, shape=tuple(t.shape))
    return value


# -- pytrees of arguments and results ------------------------------------------------------------

def flatten(tree: Any) -> tuple[list, Any]:
    """Tensors in nested lists/tuples/dicts -> (leaves, structure); other leaves are static."""
    leaves: list = []

    def walk(x: Any) -> Any:
        if isinstance(x, Tensor):
            leaves.append(x)
            return ("T",)
        if isinstance(x, (list, tuple)):
            return (type(x).__name__, tuple(walk(v) for v in x))
        if isinstance(x, dict):
            return ("dict", tuple((k, walk(x[k])) for k in sorted(x)))
        return ("S", x)
    return leaves, walk(tree)


def unflatten(structure: Any, leaves: list) -> Any:
    it = iter(leaves)

    def build(s: Any) -> Any:
        kind = s[0]
        if kind == "T":
            return next(it)
        if kind == "S":
            return s[1]
        if kind == "dict":
            return {k: build(v) for k, v in s[1]}
        items = [build(v) for v in s[1]]
        return tuple(items) if kind == "tuple" else items
    return build(structure)


@dataclass
class Traced:
    program: Program
    out_structure: Any
    writebacks: list
    capture_tensors: list
    capture_guards: list = field(default_factory=list)


def trace(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Traced:
    """Run `fn` on abstract stand-ins of its tensor arguments and record the program."""
    leaves, structure = flatten((args, kwargs))
    tracer = TraceInterpreter()
    inputs = [Value(t.shape, t.dtype) for t in leaves]
    stand_ins = []
    for t, v in zip(leaves, inputs):
        s = Tensor(AbstractArray(v), t._backend)
        s.requires_grad = t.requires_grad
        stand_ins.append(s)
    a, kw = unflatten(structure, stand_ins)
    try:
        with interpret(tracer):
            result = fn(*a, **kw)
        out_leaves, out_structure = flatten(result)
        outputs: list = []
        for t in out_leaves:
            outputs.append(t._data.value if is_abstract(t._data) else tracer.capture(t))
        writebacks = _writebacks(tracer, leaves, stand_ins, inputs, outputs)
    finally:
        tracer.restore()
    caps = list(tracer.captures.values())
    sources = {id(t): v for v, t in caps}        # not arguments: two may share one array
    # A rebound buffer's new value may be written into the old buffer (as eager's in-place
    # update does) once nothing reads the old value any more: codegen decides when.
    donations = {wb.index: sources[id(wb.tensor)] for wb in writebacks
                 if wb.kind == "data" and id(wb.tensor) in sources}
    program = Program(inputs=inputs, captures=[(v, None) for v, _ in caps], constants={},
                      nodes=tracer.nodes, outputs=outputs,
                      meta=dict(n_results=len(out_leaves), donations=donations))
    tensors = [t for _, t in caps]
    return Traced(program, out_structure, writebacks, tensors,
                  [(tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in tensors])


def _writebacks(tracer: TraceInterpreter, leaves: list, stand_ins: list, inputs: list,
                outputs: list) -> list:
    """State changed by the function: buffers rebound and .grad set on outside tensors."""
    wbs: list[Writeback] = []

    def out_index(t: Tensor) -> int:
        outputs.append(t._data.value if is_abstract(t._data) else tracer.capture(t))
        return len(outputs) - 1

    targets = [(s.tensor, s.data, s.grad) for s in tracer.saved.values()]
    targets += [(stand, None, None) for stand in stand_ins]
    real = {id(s): r for s, r in zip(stand_ins, leaves)}
    initial = {id(s): v for s, v in zip(stand_ins, inputs)}
    for t, orig_data, orig_grad in targets:
        dest = real.get(id(t), t)
        data_changed = (is_abstract(t._data) and t._data.value is not initial.get(id(t))
                        and (id(t) in real or t._data is not orig_data))
        if data_changed:
            wbs.append(Writeback(dest, "data", out_index(t)))
        g = t.grad
        if g is not orig_grad:
            if g is None:
                wbs.append(Writeback(dest, "grad_none"))
            else:
                wbs.append(Writeback(dest, "grad", out_index(g)))
    return wbs
