"""Optimisation passes. Each is a pure function Program -> Program that preserves
results; `pipeline.run_passes` applies them in order and records what each did."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import sympy

from backends.cprint import Constant, Operand
from ops.elementwise import ElementwiseOp

from .identities import elementwise_identity
from .ir import Node, Program, Value


def _substitute(program: Program, mapping: dict) -> Program:
    """Replace uses of Values by other Values/scalars everywhere."""
    if not mapping:
        return program

    def sub(v: Any) -> Any:
        while isinstance(v, Value) and v in mapping:
            v = mapping[v]
        return v
    nodes = [n.with_inputs(tuple(sub(a) for a in n.inputs)) for n in program.nodes]
    return program.copy(nodes=nodes, outputs=[sub(o) for o in program.outputs])


# -- dead-code elimination -----------------------------------------------------------------------

def dce(program: Program) -> Program:
    """Drop nodes whose values nothing uses. (The IR has no side effects: state
    updates are outputs, so they are always live.)"""
    live = {o for o in program.outputs if isinstance(o, Value)}
    kept = []
    for n in reversed(program.nodes):
        if n.out in live:
            kept.append(n)
            live.update(a for a in n.inputs if isinstance(a, Value))
    constants = {v: c for v, c in program.constants.items() if v in live}
    return program.copy(nodes=kept[::-1], constants=constants)


# -- common-subexpression elimination --------------------------------------------------------------

def _freeze(x: Any) -> Any:
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    if isinstance(x, float) and x != x:
        return ("nan",)
    return x


def _key_input(a: Any) -> Any:
    return ("v", a.id) if isinstance(a, Value) else ("c", type(a).__name__, _freeze(a))


def cse(program: Program) -> Program:
    """Merge nodes computing the same op on the same inputs. Random ops are never merged."""
    seen: dict = {}
    mapping: dict = {}
    nodes = []
    for n in program.nodes:
        n = n.with_inputs(tuple(mapping.get(a, a) if isinstance(a, Value) else a for a in n.inputs))
        if getattr(n.op, "random", False):
            nodes.append(n)
            continue
        key = (id(n.op), tuple(_key_input(a) for a in n.inputs), _freeze(n.params))
        prev = seen.get(key)
        if prev is not None and prev.shape == n.out.shape and prev.dtype == n.out.dtype:
            mapping[n.out] = prev
        else:
            seen[key] = n.out
            nodes.append(n)
    return program.copy(nodes=nodes, outputs=[mapping.get(o, o) if isinstance(o, Value) else o
                                              for o in program.outputs])


# -- constant folding ----------------------------------------------------------------------------------

MAX_FOLD_ELEMENTS = 1 << 16


def constant_fold(program: Program, backend: Any) -> Program:
    """Evaluate at compile time the nodes whose inputs are all constants (small results)."""
    constants = dict(program.constants)
    nodes = []
    for n in program.nodes:
        foldable = (not getattr(n.op, "random", False)
                    and all(not isinstance(a, Value) or a in constants for a in n.inputs)
                    and int(np.prod(n.out.shape)) <= MAX_FOLD_ELEMENTS)
        if foldable:
            raw = [constants[a] if isinstance(a, Value) else a for a in n.inputs]
            constants[n.out] = n.op.forward(backend, *raw, **n.params)
        else:
            nodes.append(n)
    return program.copy(nodes=nodes, constants=constants)


# -- algebraic simplification ----------------------------------------------------------------------------

def _identity_rewrite(n: Node, producers: dict, constants: dict) -> Any:
    """A Value or node equal to n's result, or None. Read from the ops' traits
    (ops/spec.py): elementwise identities derived from their expressions, `no_op_when`,
    and `compose` for a chain of the same op. Never drops a change of shape or dtype."""
    op, a, out = n.op, n.inputs, n.out
    found = elementwise_identity(n, producers, constants)
    if found is not None:
        return found
    x = a[0] if a else None
    if not isinstance(x, Value):
        return None
    no_op = getattr(op, "no_op_when", None)
    if no_op is not None and x.shape == out.shape and x.dtype == out.dtype \
            and no_op(n.params, x.shape, out.shape):
        return x
    compose = getattr(op, "compose", None)
    p = producers.get(x)
    if compose is not None and p is not None and p.op is op:
        return Node(op, (p.inputs[0],), compose(p.params, n.params), out)
    return None


def simplify(program: Program) -> Program:
    """Nodes equal to one of their inputs dropped (x*1, x+0, x-0, x/1, -(-x), identity
    reshape/broadcast/cast/transpose, stop_gradient), chains of one op composed
    (transposes, reshapes, broadcasts): see `_identity_rewrite`."""
    mapping: dict = {}
    producers: dict = {}
    nodes = []
    for n in program.nodes:
        n = n.with_inputs(tuple(mapping.get(a, a) if isinstance(a, Value) else a for a in n.inputs))
        r = _identity_rewrite(n, producers, program.constants)
        while isinstance(r, Node):
            n = r
            r = _identity_rewrite(n, producers, program.constants)
        if isinstance(r, Value):
            mapping[n.out] = r
            continue
        producers[n.out] = n
        nodes.append(n)
    return program.copy(nodes=nodes, outputs=[mapping.get(o, o) if isinstance(o, Value) else o
                                              for o in program.outputs])


# -- elementwise fusion -----------------------------------------------------------------------------------

class FusedElementwise:
    """A tree of elementwise ops evaluated as one kernel.

    `steps` lists (op, args) in evaluation order, where each arg is ("in", k) for
    the k-th group input, ("step", j) for an earlier step, or a Python scalar.
    The last step is the group's result.
    """

    kind = "fused_elementwise"
    random = False
    view = False

    def __init__(self, steps: list, n_inputs: int) -> None:
        self.steps = steps
        self.n_inputs = n_inputs
        self.name = "fused[" + ",".join(op.name for op, _ in steps) + "]"

    def expression(self) -> tuple[Any, tuple]:
        """The whole group as one sympy expression of symbols in0..in{n-1}: each
        step's (stable) spec expression with its arguments substituted, each argument
        a distinct opaque `Operand` and each scalar an opaque `Constant`, so that sympy
        cannot combine terms across steps or fold 0*x into 0 (IEEE does neither)."""
        symbols = tuple(sympy.Symbol(f"in{i}", real=True) for i in range(self.n_inputs))
        vals: list = []
        tags = iter(range(1 << 30))
        for op, args in self.steps:
            operands = [Operand(symbols[a[1]] if a[0] == "in" else vals[a[1]], next(tags))
                        if isinstance(a, tuple) else Constant(int(a) if type(a) is bool else a)
                        for a in args]
            vals.append(op.impl_expr.xreplace(dict(zip(op.symbols, operands))))
        return (vals[-1] if vals else symbols[0]), symbols      # no steps: the input itself

    def forward(self, backend: Any, *inputs: Any) -> Any:
        vals: list = []
        for op, args in self.steps:
            raw = [inputs[a[1]] if isinstance(a, tuple) and a[0] == "in" else
                   vals[a[1]] if isinstance(a, tuple) else a for a in args]
            vals.append(op.forward(backend, *raw))
        return vals[-1] if vals else inputs[0]


def _fusable(n: Node) -> bool:
    """Elementwise with a float result; `where` too (its condition joins as an input)."""
    return isinstance(n.op, ElementwiseOp) and n.out.dtype.kind == "f"


def fuse_elementwise(program: Program) -> Program:
    """Group each elementwise node with the elementwise producers whose only use it is
    (same shape and dtype), into one FusedElementwise node."""
    uses = program.uses()
    producers = program.producers()
    absorbed: set = set()
    groups: dict = {}
    for n in reversed(program.nodes):
        if n.out in absorbed or not _fusable(n):
            continue
        members = []

        def grow(node: Node) -> None:
            for a in node.inputs:
                p = producers.get(a) if isinstance(a, Value) else None
                if (p is not None and _fusable(p) and uses.get(a, 0) == 1 and p.out.dtype == node.out.dtype
                        and p.out.shape == n.out.shape and p.out not in absorbed):
                    absorbed.add(p.out)
                    members.append(p)
                    grow(p)
        grow(n)
        if members:
            groups[n.out] = members
    if not groups:
        return program
    nodes = []
    for n in program.nodes:
        if n.out in absorbed:
            continue
        if n.out not in groups:
            nodes.append(n)
            continue
        members = {m.out: m for m in groups[n.out]}
        order = [m for m in program.nodes if m.out in members] + [n]
        inputs: list = []
        index: dict = {}
        steps = []
        position = {}
        for m in order:
            args = []
            for a in m.inputs:
                if isinstance(a, Value) and a in position:
                    args.append(("step", position[a]))
                elif isinstance(a, Value):
                    if a not in index:
                        index[a] = len(inputs)
                        inputs.append(a)
                    args.append(("in", index[a]))
                else:
                    args.append(a)
            position[m.out] = len(steps)
            steps.append((m.op, tuple(args)))
        nodes.append(Node(FusedElementwise(steps, len(inputs)), tuple(inputs), {}, n.out))
    return program.copy(nodes=nodes)


# -- reduction fusion --------------------------------------------------------------------------------------

class FusedReduction:
    """sum(group(...), axis, keepdims) as one kernel: the elementwise group is
    evaluated inside the reduction loop, never stored."""

    kind = "fused_reduction"
    random = False
    view = False

    def __init__(self, group: FusedElementwise, axis: tuple | None, keepdims: bool,
                 in_shape: tuple) -> None:
        self.group = group
        self.axis = axis
        self.keepdims = keepdims
        self.in_shape = tuple(in_shape)
        self.name = f"sum<{group.name}>"

    def forward(self, backend: Any, *inputs: Any) -> Any:
        return backend.sum(self.group.forward(backend, *inputs), self.axis, self.keepdims)

    def split(self) -> tuple[int, int, str] | None:
        """(outer, inner, "rows"|"cols") when the reduced axes are a trailing ("rows":
        each output sums a contiguous run) or leading ("cols") block, else None."""
        nd = len(self.in_shape)
        axes = tuple(range(nd)) if self.axis is None else tuple(self.axis)
        if not axes:
            return None
        size = int(np.prod(self.in_shape))
        if axes == tuple(range(nd - len(axes), nd)):
            inner = int(np.prod([self.in_shape[a] for a in axes]))
            return size // max(inner, 1), inner, "rows"
        if axes == tuple(range(len(axes))):
            outer = int(np.prod([self.in_shape[a] for a in axes]))
            return outer, size // max(outer, 1), "cols"
        return None


def fuse_reductions(program: Program) -> Program:
    """Merge a sum with the elementwise group (or single elementwise op) it reads,
    when that value has no other use."""
    return _absorb_producer(
        program, lambda n: getattr(n.op, "reduction", None) == "sum",
        lambda n, group, p: FusedReduction(group, n.params["axis"], n.params["keepdims"], p.out.shape))


def _absorb_producer(program: Program, accepts: Callable, make: Callable) -> Program:
    """Each float node `n` with `accepts(n)` whose first input comes from an elementwise
    group (or single elementwise node) of the same dtype used nowhere else becomes
    `make(n, group, producer)` over the group's inputs; the producer disappears."""
    uses = program.uses()
    producers = program.producers()
    merged: dict = {}
    for n in program.nodes:
        if not accepts(n) or n.out.dtype.kind != "f":
            continue
        src = n.inputs[0]
        p = producers.get(src) if isinstance(src, Value) else None
        if p is None or uses.get(src, 0) != 1 or p.out.dtype != n.out.dtype:
            continue
        if isinstance(p.op, FusedElementwise):
            group, inputs = p.op, p.inputs
        elif _fusable(p):
            group, inputs = single_group(p)
        else:
            continue
        merged[p.out] = None
        merged[n.out] = Node(make(n, group, p), tuple(inputs), {}, n.out)
    if not merged:
        return program
    nodes = [merged.get(n.out, n) for n in program.nodes]
    return program.copy(nodes=[n for n in nodes if n is not None])


# -- row-op prologues -----------------------------------------------------------------------------------

def prologue_row_op(op: Any) -> bool:
    """A row-program op of one input over an `axis` parameter (softmax, log_softmax):
    it can run on the rows of a group computed on the fly."""
    prog = getattr(op, "rows", None)
    return prog is not None and len(prog.rows) == 1 and not prog.cols and not prog.params \
        and not prog.indices and not prog.reduces and prog.axis == "axis"


class FusedRowOp:
    """A one-input row op (softmax, log_softmax) over the last axis of an elementwise
    group's value, as one kernel: each row of the group is computed into a scratch row
    and normalised at once, never stored (attention's scale and mask feed its softmax
    this way). `row_op` is the op itself: its row program is what the kernel prints."""

    kind = "fused_row"
    random = False
    view = False

    def __init__(self, row_op: Any, group: FusedElementwise, axis: int) -> None:
        self.row_op = row_op
        self.group = group
        self.axis = axis
        self.name = f"{row_op.name}<{group.name}>"

    def forward(self, backend: Any, *inputs: Any) -> Any:
        return self.row_op.forward(backend, self.group.forward(backend, *inputs), axis=self.axis)


def fuse_row_prologues(program: Program) -> Program:
    """Merge a last-axis softmax / log_softmax with the elementwise group (or single
    elementwise op) producing its input, when that value has no other use."""
    def last_axis_row_op(n: Node) -> bool:
        return (prologue_row_op(n.op) and n.params["axis"] == len(n.out.shape) - 1
                and tuple(n.inputs[0].shape) == tuple(n.out.shape))
    return _absorb_producer(program, last_axis_row_op,
                            lambda n, group, p: FusedRowOp(n.op, group, n.params["axis"]))


def single_group(p: Node) -> tuple[FusedElementwise, tuple]:
    """One elementwise node as a group of one step, and its array inputs."""
    args, inputs = [], []
    for a in p.inputs:
        if isinstance(a, Value):
            args.append(("in", len(inputs)))
            inputs.append(a)
        else:
            args.append(a)
    return FusedElementwise([(p.op, tuple(args))], len(inputs)), tuple(inputs)
