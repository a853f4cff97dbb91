"""Fused ops: softmax, log_softmax and layer_norm as single primitives.

Their decompositions into primitives (ops.composite) waste memory traffic and
Python dispatch: each intermediate is a full array and a tape node. As fused ops
they are one node each, with a forward a backend may implement as one kernel
(`backend.softmax(x, axis)` etc., optional; a kernel may return None for inputs it
does not handle) and a short VJP written in ops, so
higher-order gradients, tracing and symbolic execution still work. The composite
versions remain the reference: the tests check forward and gradients against them.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .elementwise import add, div, eq, exp, log, mul, rsqrt, sub, sum_to
from .errors import DTypeError, ShapeError
from .reduce import sum as sum_op
from .spec import Op, register

NEG_INF = float("-inf")


def _fn(op: Any, be: Any) -> Any:
    return op.impl(be)


def _row_shift(be: Any, x: Any, axis: int) -> Any:
    """Row max, with 0 where a row is all -inf (so exp(x - m) is 0, not NaN)."""
    m = be.max(x, (axis,), True)
    return be.where(_fn(eq, be)(m, NEG_INF), 0.0, m)


def _softmax_forward(be: Any, x: Any, axis: int) -> Any:
    kernel = getattr(be, "softmax", None)
    out = None if kernel is None else kernel(x, axis)
    if out is not None:
        return out
    e = _fn(exp, be)(_fn(sub, be)(x, _row_shift(be, x, axis)))
    s = be.sum(e, (axis,), True)
    return _fn(div, be)(e, be.where(_fn(eq, be)(s, 0.0), 1.0, s))


def _log_softmax_forward(be: Any, x: Any, axis: int) -> Any:
    kernel = getattr(be, "log_softmax", None)
    out = None if kernel is None else kernel(x, axis)
    if out is not None:
        return out
    shifted = _fn(sub, be)(x, _row_shift(be, x, axis))
    s = be.sum(_fn(exp, be)(shifted), (axis,), True)
    return _fn(sub, be)(shifted, _fn(log, be)(be.where(_fn(eq, be)(s, 0.0), 1.0, s)))


def _infer_axis_op(name: str, x: Any, axis: int) -> tuple:
    if not 0 <= axis < x.ndim:
        raise ShapeError(f"{name}: axis {axis} out of range for shape {tuple(x.shape)}")
    if np.dtype(x.dtype).kind != "f":
        raise DTypeError(f"{name}: needs a floating tensor, got {x.dtype}")
    return tuple(x.shape), np.dtype(x.dtype)


def _softmax_vjp(g: Any, out: Any, inputs: tuple, needs: tuple, axis: int) -> tuple:
    """dx = p * (g - sum(g * p))."""
    return (mul(out, sub(g, sum_op(mul(g, out), axis=(axis,), keepdims=True))),)


def _log_softmax_vjp(g: Any, out: Any, inputs: tuple, needs: tuple, axis: int) -> tuple:
    """dx = g - softmax * sum(g)."""
    return (sub(g, mul(exp(out), sum_op(g, axis=(axis,), keepdims=True))),)


def _axis_samples(rng: np.random.Generator) -> list:
    masked = rng.standard_normal((3, 4))
    masked[0, 1] = NEG_INF
    return [([rng.standard_normal((3, 5))], dict(axis=1)),
            ([rng.standard_normal((2, 3, 4))], dict(axis=0)),
            ([rng.standard_normal((4,)) * 30], dict(axis=0))]


def _np_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


softmax = register(Op(
    "softmax", kind="fused", saves=(-1,),
    forward=_softmax_forward,
    infer=lambda x, axis: _infer_axis_op("softmax", x, axis),
    vjp=_softmax_vjp, sample=_axis_samples, reference=_np_softmax,
    doc="exp(x - max) / sum(exp(x - max)); a row of all -inf gives 0"))

log_softmax = register(Op(
    "log_softmax", kind="fused", saves=(-1,),
    forward=_log_softmax_forward,
    infer=lambda x, axis: _infer_axis_op("log_softmax", x, axis),
    vjp=_log_softmax_vjp, sample=_axis_samples,
    reference=lambda x, axis: np.log(_np_softmax(x, axis)),
    doc="x - logsumexp(x); a row of all -inf gives -inf"))


# -- layer norm -----------------------------------------------------------------------------

def _layer_norm_forward(be: Any, x: Any, w: Any, b: Any, eps: float) -> Any:
    kernel = getattr(be, "layer_norm", None)
    out = None if kernel is None else kernel(x, w, b, eps)
    if out is not None:
        return out
    n = float(x.shape[-1])
    axis = (x.ndim - 1,)
    xc = _fn(sub, be)(x, _fn(div, be)(be.sum(x, axis, True), n))
    var = _fn(div, be)(be.sum(_fn(mul, be)(xc, xc), axis, True), n)
    y = _fn(mul, be)(xc, _fn(rsqrt, be)(_fn(add, be)(var, eps)))
    return _fn(add, be)(_fn(mul, be)(y, w), b)


def _normalized(x: Any, eps: float) -> tuple:
    """(x - mean) * rstd and rstd over the last axis, recomputed in ops for the VJP."""
    axis = (x.ndim - 1,)
    n = float(x.shape[-1])
    xc = sub(x, div(sum_op(x, axis=axis, keepdims=True), n))
    rstd = rsqrt(add(div(sum_op(mul(xc, xc), axis=axis, keepdims=True), n), eps))
    return mul(xc, rstd), rstd


def _layer_norm_vjp(g: Any, out: Any, inputs: tuple, needs: tuple, eps: float) -> tuple:
    """dx = rstd * (dxh - mean(dxh) - xh * mean(dxh * xh)), dxh = g * w."""
    x, w, b = inputs
    axis = (x.ndim - 1,)
    n = float(x.shape[-1])
    xhat, rstd = _normalized(x, eps)
    gx = gw = gb = None
    if needs[0]:
        gxh = mul(g, w)
        m1 = div(sum_op(gxh, axis=axis, keepdims=True), n)
        m2 = div(sum_op(mul(gxh, xhat), axis=axis, keepdims=True), n)
        gx = mul(rstd, sub(sub(gxh, m1), mul(xhat, m2)))
    if needs[1]:
        gw = sum_to(mul(g, xhat), tuple(w.shape))
    if needs[2]:
        gb = sum_to(g, tuple(b.shape))
    return gx, gw, gb


def _infer_layer_norm(x: Any, w: Any, b: Any, eps: float) -> tuple:
    d = x.shape[-1] if x.ndim else None
    for name, p in (("weight", w), ("bias", b)):
        if tuple(p.shape) != (d,):
            raise ShapeError(f"layer_norm: {name} of shape {tuple(p.shape)} does not match the "
                             f"last axis of x with shape {tuple(x.shape)} (expected ({d},))")
    return tuple(x.shape), np.result_type(np.dtype(x.dtype), np.dtype(w.dtype), np.dtype(b.dtype))


def _np_layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


layer_norm = register(Op(
    "layer_norm", kind="fused", saves=(0, 1),
    forward=_layer_norm_forward, infer=_infer_layer_norm, vjp=_layer_norm_vjp,
    sample=lambda rng: [([rng.standard_normal((3, 5)), rng.standard_normal(5), rng.standard_normal(5)],
                         dict(eps=1e-5)),
                        ([rng.standard_normal((2, 3, 4)) * 10, rng.standard_normal(4),
                          rng.standard_normal(4)], dict(eps=1e-3))],
    reference=_np_layer_norm,
    doc="(x - mean) / sqrt(var + eps) * w + b over the last axis (biased variance)"))
