"""Interpreters: every op call lands in the one on top of the stack.

`EagerInterpreter` computes now on the inputs' backend and records an autograd
node when gradients are needed. Other interpreters (the jit's tracer) push
themselves with `interpret(...)` and see the same op calls.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Any, Iterator

import numpy as np

import ops
from ops.errors import DeviceError, EngineError, OpError

from .state import autocast_state, get_backend, grad_mode, interpreter_stack
from .tensor import Tensor


class Node:
    """How a tensor was made: the op, its inputs and params, and the versions of the
    inputs and the output when it was made (to detect in-place changes before backward)."""

    __slots__ = ("op", "inputs", "params", "versions")

    def __init__(self, op: ops.Op, inputs: tuple, params: dict, versions: tuple) -> None:
        self.op = op
        self.inputs = inputs
        self.params = params
        self.versions = versions


class FreedNode:
    """What is left of a node after backward freed its graph."""

    __slots__ = ("op",)

    def __init__(self, op: ops.Op) -> None:
        self.op = op


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
_INPLACE_OPS = {"+=": "add", "-=": "sub", "*=": "mul", "/=": "div"}


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
        if name == "copy":
            be.setitem(t._data, (Ellipsis,), raw)
        elif index is None:
            op = ops.REGISTRY[_INPLACE_OPS[name]]
            be.setitem(t._data, (Ellipsis,), op.forward(be, t._data, raw))
        else:
            spec, tensors = index
            be.setitem(t._data, ops.movement.index_tuple(spec, tuple(x._data for x in tensors)), raw)

    def apply(self, op: ops.Op, args: tuple, params: dict) -> Tensor:
        if autocast_state.dtype is not None and op.name in AUTOCAST_OPS:
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
            else:
                raise TypeError(f"{op.name}: inputs must be tensors or Python scalars, "
                                f"got {type(a).__name__}")
        if backend is None:
            backend = get_backend(params.get("device", "cpu"))
        out = self.compute(op, backend, raw, args, params)
        t = Tensor(out, backend)
        if op.view and args:
            t._version = args[0]._version
        if needs_grad and grad_mode.enabled and op.vjp is not None and out.dtype.kind == "f":
            t.requires_grad = True
            versions = [a._version[0] if type(a) is Tensor or isinstance(a, Tensor) else 0
                        for a in args]
            versions.append(t._version[0])
            t._ctx = Node(op, args, params, tuple(versions))
        return t


# Ops that run in the low-precision dtype inside `eg.autocast` (their inputs are cast,
# recorded as cast ops so gradients flow back to float32 parameters). Everything
# else keeps float32: softmax, layer norm, reductions and losses need the range.
AUTOCAST_OPS = frozenset({"matmul"})


def _autocast(args: tuple, dtype: Any) -> tuple:
    cast = ops.REGISTRY["cast"]
    return tuple(cast(a, dtype=dtype) if isinstance(a, Tensor) and a.dtype.kind == "f"
                 and a.dtype != dtype else a for a in args)


_stack = interpreter_stack
_stack.append(EagerInterpreter())


def apply(op: ops.Op, args: tuple, params: dict) -> Any:
    """The dispatcher installed into ops: hand the call to the current interpreter."""
    return _stack[-1].apply(op, args, params)


def current() -> Any:
    """The interpreter on top of the stack."""
    return _stack[-1]


@contextlib.contextmanager
def interpret(interpreter: Any) -> Iterator[Any]:
    """Run the block with `interpreter` handling every op call."""
    _stack.append(interpreter)
    try:
        yield interpreter
    finally:
        _stack.pop()


ops.set_dispatcher(apply)
