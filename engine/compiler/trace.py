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

from ..creation import full
from ..dispatch import INPLACE_OPS, EagerInterpreter, interpret
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
    grad_rebound: bool = False      # Python code replaced .grad before tracing touched it


@dataclass
class Writeback:
    """After a call, put output `index` into `tensor` (its data, or its .grad); for an
    argument of the function, `arg` is its leaf position and `tensor` is None: the call's
    own argument is the target, not the one traced."""
    tensor: Tensor | None
    kind: str                      # "data" | "grad" | "grad_none"
    index: int = -1
    arg: int = -1

    def target(self, leaves: list) -> Tensor:
        return leaves[self.arg] if self.arg >= 0 else self.tensor


class TraceInterpreter(EagerInterpreter):
    def __init__(self) -> None:
        self.nodes: list[Node] = []
        # id -> (IR input, holder, kind): kind "tensor" reads the holder's data at every
        # call, "grad" its .grad's (an existing gradient, which a call replaces).
        self.captures: dict[int, tuple[Value, Tensor, str]] = {}
        self.saved: dict[int, _Saved] = {}
        self.grad_owners: dict[int, Tensor] = {}        # id(.grad at trace start) -> owner
        self.host_reads: dict[int, Tensor] = {}
        self.checks: list[tuple[Value, Callable]] = []
        self.grads_before: dict[int, tuple[Tensor, Any]] = {}

    # -- the hooks ----------------------------------------------------------------------------
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
        owner = self.grad_owners.get(id(t))
        if owner is not None and owner.grad is t:
            raise TraceError(
                f"in-place {name} on an existing .grad (shape {t.shape}) inside jit: a compiled "
                f"call replaces .grad with a new tensor; assign it instead (p.grad = p.grad * s)")
        op = INPLACE_OPS[name]
        with no_grad():
            new = _as_tensor_like(t, value) if op is None else op(t, value)
        self.remember(t)
        t._data = new._data

    def read_host(self, t: Tensor) -> None:
        """The trace read t's values on the host: they are frozen into the program, so
        the program is only valid while t keeps its version."""
        self.host_reads[id(t)] = t

    def check_values(self, t: Tensor, check: Callable[[np.ndarray], None]) -> None:
        """Record `check` to run on t's values at every call (now, too, if t is concrete)."""
        if is_abstract(t._data):
            self.checks.append((t._data.value, check))
            return
        super().check_values(t, check)
        self.checks.append((self.capture(t), check))

    # -- outside tensors --------------------------------------------------------------------------
    def remember(self, t: Tensor) -> None:
        if id(t) not in self.saved:
            grad = self.grads_before.get(id(t), (t, t.grad))[1]    # before Python changed it
            self.saved[id(t)] = _Saved(t, t._data, grad, t._version[0], t._ctx, t.requires_grad,
                                       grad_rebound=t.grad is not grad)
            if grad is not None:
                self.grad_owners[id(grad)] = t

    def capture(self, t: Tensor) -> Value:
        """The IR input standing for concrete tensor `t` (read at every call)."""
        got = self.captures.get(id(t))
        if got is None:
            owner = self.grad_owners.get(id(t))
            if owner is not None and owner.grad is t:      # an existing gradient
                got = (Value(t.shape, t.dtype), owner, "grad")
            else:
                self.remember(t)
                got = (Value(t.shape, t.dtype), t, "tensor")
            self.captures[id(t)] = got
        return got[0]

    def restore(self) -> None:
        """Undo what tracing changed (only that: another thread may be using the rest)."""
        for s in self.saved.values():
            t = s.tensor
            if t._data is not s.data:
                t._data = s.data
            if t.grad is not s.grad:
                t.grad = s.grad
            if t._ctx is not s.ctx:
                t._ctx = s.ctx
            if t._version[0] != s.version:
                t._version[0] = s.version
            if t.requires_grad != s.requires_grad:
                t.requires_grad = s.requires_grad


def _as_tensor_like(t: Tensor, value: Any) -> Tensor:
    """`value` with t's shape and dtype (what copying it into t's buffer would store)."""
    if not isinstance(value, Tensor):
        return full(t.shape, value, t.dtype, t.device)
    if value.dtype != t.dtype:
        value = ops.REGISTRY["cast"](value, dtype=t.dtype)
    if value.shape != t.shape:
        value = ops.REGISTRY["broadcast_to"](value, shape=tuple(t.shape))
    return value


# -- pytrees of arguments and results ------------------------------------------------------------

class Static:
    """A static (non-tensor) leaf in a cache key: equal only to a value of the same type
    that compares equal, so True and 1, or 1 and 1.0, or 0.0 and -0.0, key different
    programs (they can trace differently: 1.0 promotes an int tensor to float)."""

    __slots__ = ("value", "key")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.key = (type(value), value.hex() if type(value) is float else value)

    def __eq__(self, other: object) -> bool:
        return type(other) is Static and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return repr(self.value)


def statics(structure: Any) -> list:
    """The static leaves of a flattened structure, in order."""
    found: list = []

    def walk(s: Any) -> None:
        if s[0] == "S":
            found.append(s[1].value)
        elif s[0] == "dict":
            for _, v in s[1]:
                walk(v)
        elif s[0] != "T":
            for v in s[1]:
                walk(v)
    walk(structure)
    return found


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
        return ("S", Static(x))
    return leaves, walk(tree)


def unflatten(structure: Any, leaves: list) -> Any:
    it = iter(leaves)

    def build(s: Any) -> Any:
        kind = s[0]
        if kind == "T":
            return next(it)
        if kind == "S":
            return s[1].value
        if kind == "dict":
            return {k: build(v) for k, v in s[1]}
        items = [build(v) for v in s[1]]
        return tuple(items) if kind == "tuple" else items
    return build(structure)


@dataclass
class Capture:
    """A captured tensor: `holder`'s data (kind "tensor") or its .grad's ("grad"), with
    the shape, dtype, device and requires_grad it had when traced."""
    holder: Tensor
    kind: str
    meta: tuple


@dataclass
class Traced:
    program: Program
    out_structure: Any
    writebacks: list
    captures: list                                     # Capture per program capture
    grad_none: list = field(default_factory=list)     # (tensor, .grad was None)
    host_reads: list = field(default_factory=list)    # (tensor, version)
    checks: list = field(default_factory=list)        # (Value, check): see check_values
    touched: set = field(default_factory=set)         # ids of tensors the trace read or changed


def trace(fn: Callable[..., Any], args: tuple, kwargs: dict, reachable: list = ()) -> Traced:
    """Run `fn` on abstract stand-ins of its tensor arguments and record the program.

    `reachable`: tensors fn may reach (guards.reachable_tensors). Their .grad is noted
    before tracing, so one Python code sets (zero_grad) before the trace touches the
    tensor is still known, restored after tracing and set by every call."""
    leaves, structure = flatten((args, kwargs))
    tracer = TraceInterpreter()
    tracer.grads_before = {id(t): (t, t.grad) for t in reachable}
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
        for t, grad in tracer.grads_before.values():
            if t.grad is not grad:
                tracer.remember(t)
        writebacks = _writebacks(tracer, leaves, stand_ins, inputs, outputs)
    finally:
        tracer.restore()
    caps = list(tracer.captures.values())
    sources = {id(t): v for v, t, kind in caps if kind == "tensor"}   # two may share one array
    # A rebound buffer's new value may be written into the old buffer (as eager's in-place
    # update does) once nothing reads the old value any more: codegen decides when.
    donations = {wb.index: sources[id(wb.tensor)] for wb in writebacks
                 if wb.kind == "data" and id(wb.tensor) in sources}
    program = Program(inputs=inputs, captures=[(v, None) for v, _, _ in caps], constants={},
                      nodes=tracer.nodes, outputs=outputs,
                      meta=dict(n_results=len(out_leaves), donations=donations))
    captures = []
    for _, holder, kind in caps:
        x = holder if kind == "tensor" else holder.grad
        captures.append(Capture(holder, kind, (tuple(x.shape), x.dtype, x.device, x.requires_grad)))
    return Traced(program, out_structure, writebacks, captures,
                  grad_none=[(s.tensor, s.grad is None) for s in tracer.saved.values()
                             if not s.grad_rebound],
                  host_reads=[(t, t._version[0]) for t in tracer.host_reads.values()],
                  checks=tracer.checks, touched=set(tracer.saved) | set(tracer.captures))


def _writebacks(tracer: TraceInterpreter, leaves: list, stand_ins: list, inputs: list,
                outputs: list) -> list:
    """State changed by the function: buffers rebound and .grad set on outside tensors."""
    wbs: list[Writeback] = []

    def out_index(t: Tensor) -> int:
        outputs.append(t._data.value if is_abstract(t._data) else tracer.capture(t))
        return len(outputs) - 1

    targets = [(s.tensor, s.data, s.grad) for s in tracer.saved.values()]
    targets += [(stand, None, None) for stand in stand_ins]
    position = {id(s): i for i, s in enumerate(stand_ins)}
    initial = {id(s): v for s, v in zip(stand_ins, inputs)}
    for t, orig_data, orig_grad in targets:
        arg = position.get(id(t), -1)
        dest = None if arg >= 0 else t
        data_changed = (is_abstract(t._data) and t._data.value is not initial.get(id(t))
                        and (arg >= 0 or t._data is not orig_data))
        if data_changed:
            wbs.append(Writeback(dest, "data", out_index(t), arg))
        g = t.grad
        if g is not orig_grad:
            if g is None:
                wbs.append(Writeback(dest, "grad_none", arg=arg))
            else:
                wbs.append(Writeback(dest, "grad", out_index(g), arg))
    return wbs
