"""Interpreters: every op call lands in the one on top of the stack.

`EagerInterpreter` computes now on the inputs' backend and records an autograd
node when gradients are needed. Other interpreters (the jit's tracer) push
themselves with `interpret(...)` and see the same op calls.
"""
from __future__ import annotations

import contextlib
import numbers
import weakref
from typing import Any, Callable, Iterator

import numpy as np

import ops
from ops.errors import DeviceError, EngineError, GradError, OpError

from .state import autocast_state, get_backend, grad_mode, graph_state, interpreters
from .tensor import Tensor


class Node:
    """How a tensor was made: the op, its inputs and params, and the versions of the
    inputs and the output when it was made (to detect in-place changes before backward;
    None when the VJP reads nothing).

    `inputs` holds real tensors only where the VJP reads them: leaves and the
    positions in `op.saves`; other non-leaf inputs are `Edge`s (no data), so an
    intermediate nobody's VJP reads is freed as soon as the forward drops it.
    `out` is the output's raw value when the VJP reads it (-1 in `op.saves`), else
    None; the node never refers to its output Tensor (no node <-> tensor cycle).
    Backward frees a node in place (`inputs` becomes None): every tensor and edge
    that points at it sees it freed.
    """

    __slots__ = ("op", "inputs", "params", "versions", "out")

    def __init__(self, op: ops.Op, inputs: tuple, params: dict, versions: list | None,
                 out: Any = None) -> None:
        self.op = op
        self.inputs = inputs
        self.params = params
        self.versions = versions
        self.out = out

    @property
    def freed(self) -> bool:
        return self.inputs is None

    def output(self, t: Any) -> Any:
        """The value to hand the VJP as `out` when backward reaches the node through
        `t` (the output tensor, or its edge): the tensor itself; through an edge, the
        real tensor if the edge knows it (it retains grad), else one rebuilt from the
        saved raw value with the same node and version counter (the graph keys values
        by node, so for gradients, also of higher order, the two are the same value)."""
        if type(t) is not Edge or self.out is None:
            return t
        real = t.tensor()
        if real is not None:
            return real
        real = Tensor(self.out, t._backend)
        real.requires_grad = True
        real._ctx = self
        real._version = t._version
        return real


class Edge:
    """A non-leaf tensor as an autograd graph edge, without its value.

    Recorded in place of an input whose value the consumer's VJP does not read: it
    carries what backward needs (the producing node `_ctx`, shape, dtype, device,
    the shared version counter) but no data, so it does not keep the array alive.
    Reading its value fails loudly. One edge per tensor is cached in `Tensor._edge`.
    """

    __slots__ = ("_ctx", "_version", "_backend", "shape", "dtype", "_retains_grad", "_ref")
    requires_grad = True
    is_leaf = False

    def __init__(self, t: Tensor) -> None:
        self._ctx = t._ctx
        self._version = t._version
        self._backend = t._backend
        data = t._data
        self.shape = data.shape
        self.dtype = data.dtype
        self._retains_grad = t._retains_grad
        self._ref = weakref.ref(t) if t._retains_grad else None
        t._edge = self

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def device(self) -> str:
        return self._backend.name

    @property
    def grad_fn(self) -> str:
        return self._ctx.op.name

    def tensor(self) -> Tensor | None:
        """The real tensor, when it retains grad and is still alive (else None)."""
        return None if self._ref is None else self._ref()

    def _no_value(self, reader: str = "reading it") -> GradError:
        return GradError(
            f"{reader}: the value of the output of {self._ctx.op.name} (shape {self.shape}) "
            f"is not kept by the autograd graph, which records it as an edge because no "
            f"consumer's VJP declares it in its op's `saves`. A VJP that reads an input "
            f"(or its output) must declare it in `saves`.")

    @property
    def _data(self) -> Any:
        raise self._no_value()

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._no_value("converting an edge to an array")

    def numpy(self) -> Any:
        raise self._no_value("Edge.numpy()")

    def __repr__(self) -> str:
        return f"Edge({self.dtype}{list(self.shape)}@{self.device}, grad_fn={self.grad_fn})"


def _describe(args: tuple) -> str:
    parts = []
    for a in args:
        if isinstance(a, Tensor):
            parts.append(f"{a.dtype}{list(a.shape)}@{a.device}")
        else:
            parts.append(repr(a))
    return ", ".join(parts)


def explain_failure(op: ops.Op, args: tuple, params: dict, err: Exception) -> Exception:
    """Turn a backend exception into an engine error naming the op, shapes and dtypes."""
    if isinstance(err, EngineError):
        return err
    try:
        op.infer(*args, **params)
    except EngineError as e:
        return e
    except Exception:   # the rule itself could not run on these inputs: fall through
        pass
    return OpError(f"{op.name}({_describe(args)}) with {params or 'no params'} failed: "
                   f"{type(err).__name__}: {err}")


_SCALARS = (float, int, bool)
_NUMPY_SCALARS = frozenset(np.sctypeDict.values()) - {np.ndarray}
# In-place updates: the op combining the old value with the new one (None: the new
# value replaces the old, as `copy_` does).
INPLACE_OPS = {"copy": None, "+=": ops.elementwise.add, "-=": ops.elementwise.sub,
               "*=": ops.elementwise.mul, "/=": ops.elementwise.div}


class EagerInterpreter:
    """Run ops now; record autograd nodes when an input requires grad.

    Subclasses (the jit's tracer) change only `compute` (what an op produces) and
    `assign` (what an in-place update does); device checks and autograd recording
    are shared, so traced programs differentiate exactly like eager ones.
    """

    def compute(self, op: ops.Op, backend: Any, raw: list, args: tuple, params: dict) -> Any:
        try:
            return op.forward(backend, *raw, **params)
        except Exception as e:
            raise explain_failure(op, args, params, e) from None

    def assign(self, t: Tensor, name: str, value: Any, index: tuple | None) -> None:
        """In-place update of t's buffer: `t op= value`, or `t[index] = value`."""
        raw = value._data if isinstance(value, Tensor) else value
        be = t._backend
        if index is None:
            op = INPLACE_OPS[name]
            be.setitem(t._data, (Ellipsis,), raw if op is None else op.forward(be, t._data, raw))
        else:
            spec, tensors = index
            be.setitem(t._data, ops.movement.index_tuple(spec, tuple(x._data for x in tensors)), raw)

    def read_host(self, t: Tensor) -> None:
        """t's values are being read on the host (.item(), .numpy(), bool()): nothing to do
        when running eagerly (the tracer records it)."""

    def check_values(self, t: Tensor, check: Callable[[np.ndarray], None]) -> None:
        check(t.numpy())

    def apply(self, op: ops.Op, args: tuple, params: dict) -> Tensor:
        if autocast_state.dtype is not None and op.autocast == "lower":
            args = _autocast(args, autocast_state.dtype)
        backend = None
        needs_grad = False
        raw = []
        for a in args:
            if type(a) is Tensor or isinstance(a, Tensor):
                if backend is None:
                    backend = a._backend
                elif a._backend is not backend:
                    raise DeviceError(f"{op.name}: tensors on different devices "
                                      f"({backend.name} and {a.device}); move them with .to()")
                if a.requires_grad:
                    needs_grad = True
                raw.append(a._data)
            elif type(a) in _SCALARS or isinstance(a, (numbers.Number, np.generic)):
                raw.append(a.item() if isinstance(a, np.generic) else a)
            elif isinstance(a, Edge):
                raise a._no_value(f"{op.name} got a graph edge as input")
            else:
                raise TypeError(f"{op.name}: inputs must be tensors or Python scalars, "
                                f"got {type(a).__name__}")
        if backend is None:
            backend = get_backend(params.get("device", "cpu"))
        out = self.compute(op, backend, raw, args, params)
        if type(out) in _NUMPY_SCALARS:       # NumPy gives 0-d results as scalars
            out = np.asarray(out)
        t = Tensor(out, backend)
        if op.view and args:
            t._version = args[0]._version
        if needs_grad and grad_mode.enabled and op.vjp is not None and out.dtype.kind == "f":
            t.requires_grad = True
            saves = op.saves
            if saves is None or graph_state.keep_inputs:
                inputs = args
                versions = [a._version[0] if type(a) is Tensor or isinstance(a, Tensor) else 0
                            for a in args]
                versions.append(t._version[0])
            else:
                # Non-leaf inputs whose value the VJP does not read are recorded as edges
                # (no data), so nothing keeps an unread intermediate alive. Versions are
                # only read at saved positions (_check_versions); none when nothing is saved.
                inputs = []
                versions = [] if saves else None
                i = 0
                for a in args:
                    if type(a) is Tensor or isinstance(a, Tensor):
                        if versions is not None:
                            versions.append(a._version[0])
                        ctx = a._ctx
                        if ctx is not None and i not in saves:
                            e = a._edge
                            a = e if e is not None and e._ctx is ctx else Edge(a)
                    elif versions is not None:
                        versions.append(0)
                    inputs.append(a)
                    i += 1
                if versions is not None:
                    versions.append(t._version[0])
            t._ctx = Node(op, tuple(inputs), params, versions,
                          out if saves is None or -1 in saves else None)
        return t


def _autocast(args: tuple, dtype: Any) -> tuple:
    """The float tensor inputs of an op of autocast class "lower" (ops/spec.py: matmul)
    cast to the low-precision dtype, recorded as cast ops so gradients flow back to
    float32 parameters. The other ops keep float32: softmax, layer norm, reductions
    and losses need the range."""
    cast = ops.REGISTRY["cast"]
    return tuple(cast(a, dtype=dtype) if isinstance(a, Tensor) and a.dtype.kind == "f"
                 and a.dtype != dtype else a for a in args)


# Every thread's stack starts with one shared eager interpreter (it holds no state).
type(interpreters).base = EagerInterpreter()
interpreters.stack[0] = interpreters.base


def apply(op: ops.Op, args: tuple, params: dict) -> Any:
    """The dispatcher installed into ops: hand the call to this thread's current interpreter."""
    return interpreters.stack[-1].apply(op, args, params)


def current() -> Any:
    """The interpreter on top of this thread's stack."""
    return interpreters.stack[-1]


def check_values(t: Tensor, check: Callable[[np.ndarray], None]) -> None:
    """Run `check` on t's values as a NumPy array (it raises on bad ones): now when
    running eagerly, and under eg.jit at every call of the compiled program, before
    its results are returned or written back. Use it for checks on values (index
    bounds, target ranges) that eager code would make by reading them."""
    interpreters.stack[-1].check_values(t, check)


@contextlib.contextmanager
def interpret(interpreter: Any) -> Iterator[Any]:
    """Run the block with `interpreter` handling every op call of this thread."""
    stack = interpreters.stack
    stack.append(interpreter)
    try:
        yield interpreter
    finally:
        stack.pop()


def offers(op: ops.Op, args: tuple, params: dict) -> bool:
    """Does the backend of the tensors in `args` offer a kernel for the optional op `op`
    (its `offers(op, args, params)`, keyed by the op object)? Never under autocast: an
    offered kernel runs in its inputs' dtypes, and the composite casts where autocast says."""
    if autocast_state.dtype is not None:
        return False
    backend = next((a._backend for a in args if isinstance(a, Tensor)), None)
    ask = getattr(backend, "offers", None)
    return bool(ask is not None and ask(op, args, params))


ops.set_dispatcher(apply)
ops.spec.set_offers(offers)
