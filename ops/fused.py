"""Fused ops: softmax, log_softmax, logsumexp, layer_norm and rms_norm as single
primitives, each declared as a row program (ops/rows.py).

Their decompositions into primitives (ops.composite) waste memory traffic and
Python dispatch: each intermediate is a full array and a tape node. As row-program
ops they are one node each, whose forward is the printed kernel of its program where
a backend offers one (C on the CPU, CUDA on the GPU), and the program run step by
step elsewhere (the symbolic backend included, so the proofs cover the program the
kernels are printed from). Their VJPs are short expressions in ops, so higher-order
gradients, tracing and symbolic execution still work. The composite versions remain
the reference: the tests check forward and gradients against them.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import sympy

from .elementwise import add, div, exp, mul, rsqrt, sub
from .errors import ShapeError
from .movement import reshape
from .reduce import sum as sum_op, sum_to
from .rows import RowProgram, Step, finite_or, infer_axis, infer_last_axis, nonzero_or, rows_op, symbols

NEG_INF = float("-inf")

_x, _m0, _m, _e, _s0, _s, _out = symbols("x m0 m e s0 s out")

# exp(x - max) and its row sum; a row of all -inf has its max taken as 0 and its sum as 1.
_SHIFTED_EXP = (
    Step(_m0, "max", _x),
    Step(_m, "map", finite_or(_m0, 0)),
    Step(_e, "map", sympy.exp(_x - _m)),
    Step(_s0, "sum", _e),
    Step(_s, "map", nonzero_or(_s0, 1)))

# softmax: a row of all -inf gives 0.
SOFTMAX = RowProgram("softmax", rows=(_x,), axis="axis",
                     steps=_SHIFTED_EXP + (Step(_out, "map", _e / _s),))

# log_softmax: a row of all -inf gives -inf.
LOG_SOFTMAX = RowProgram("log_softmax", rows=(_x,), axis="axis",
                         steps=_SHIFTED_EXP + (Step(_out, "map", (_x - _m) - sympy.log(_s)),))

_w, _b, _eps, _mu, _var, _rstd = symbols("w b eps mu var rstd")

# layer_norm over the last axis, biased variance.
LAYER_NORM = RowProgram("layer_norm", rows=(_x,), cols=(_w, _b), params=(_eps,), steps=(
    Step(_mu, "mean", _x),
    Step(_var, "mean", (_x - _mu) ** 2),
    Step(_rstd, "map", 1 / sympy.sqrt(_var + _eps)),
    Step(_out, "map", (_x - _mu) * _rstd * _w + _b)))


# logsumexp: log(sum(exp(x - m))) + m with the shift m taken as 0 where the max is
# infinite, as PyTorch: a row of all -inf gives -inf, a +inf gives +inf, a NaN NaN.
LOGSUMEXP = RowProgram("logsumexp", rows=(_x,), axis="axis", steps=(
    Step(_m0, "max", _x),
    Step(_m, "map", sympy.Piecewise((0, sympy.Eq(sympy.Abs(_m0), sympy.oo)), (_m0, True))),
    Step(_s0, "sum", sympy.exp(_x - _m)),
    Step(_out, "map", sympy.Piecewise((-sympy.oo, sympy.Eq(_s0, 0)), (_m + sympy.log(_s0), True)))))


_p, _dp = symbols("p dp")

# The softmax's gradient on one row, from its output p and the output's cotangent dp:
# dx = p * (dp - sum(dp * p)) (the fused attention kernel's backward prints it; a row
# with p all 0, a fully masked one, gives 0).
SOFTMAX_GRAD = RowProgram("softmax_grad", rows=(_p, _dp), steps=(
    Step(_s0, "sum", _p * _dp),
    Step(_out, "map", _p * (_dp - _s0))))


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


softmax = rows_op(
    "softmax", SOFTMAX, saves=(-1,),
    infer=lambda x, axis: infer_axis("softmax", x, axis),
    vjp=_softmax_vjp, sample=_axis_samples, reference=_np_softmax,
    doc="exp(x - max) / sum(exp(x - max)); a row of all -inf gives 0")

log_softmax = rows_op(
    "log_softmax", LOG_SOFTMAX, saves=(-1,),
    infer=lambda x, axis: infer_axis("log_softmax", x, axis),
    vjp=_log_softmax_vjp, sample=_axis_samples,
    reference=lambda x, axis: np.log(_np_softmax(x, axis)),
    doc="x - logsumexp(x); a row of all -inf gives -inf")


def _kept(shape: tuple, axis: int) -> tuple:
    return tuple(1 if d == axis else n for d, n in enumerate(shape))


def _logsumexp_vjp(g: Any, out: Any, inputs: tuple, needs: tuple, axis: int, keepdims: bool) -> tuple:
    """dx = softmax(x) * g (0 on a row of all -inf, where softmax is 0)."""
    x, = inputs
    return (mul(softmax(x, axis=axis), reshape(g, shape=_kept(tuple(x.shape), axis))),)


def _infer_logsumexp(x: Any, axis: int, keepdims: bool) -> tuple:
    shape, dtype = infer_axis("logsumexp", x, axis)
    if shape[axis] == 0:
        raise ShapeError(f"logsumexp: axis {axis} of shape {shape} is empty (a row needs a value)")
    return (_kept(shape, axis) if keepdims else shape[:axis] + shape[axis + 1:]), dtype


logsumexp = rows_op(
    "logsumexp", LOGSUMEXP, saves=(0,), infer=_infer_logsumexp, vjp=_logsumexp_vjp,
    sample=lambda rng: [([rng.standard_normal((3, 5))], dict(axis=1, keepdims=False)),
                        ([rng.standard_normal((2, 3, 4))], dict(axis=0, keepdims=True)),
                        ([rng.standard_normal((4,)) * 30], dict(axis=0, keepdims=False))],
    reference=lambda x, axis, keepdims: np.logaddexp.reduce(x, axis=axis, keepdims=keepdims),
    doc="log(sum(exp(x))) over `axis`; a row of all -inf gives -inf, a +inf gives +inf")


# -- layer norm -----------------------------------------------------------------------------

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


def _np_layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


layer_norm = rows_op(
    "layer_norm", LAYER_NORM, saves=(0, 1),
    infer=lambda x, w, b, eps: infer_last_axis("layer_norm", x, weight=w, bias=b),
    vjp=_layer_norm_vjp,
    sample=lambda rng: [([rng.standard_normal((3, 5)), rng.standard_normal(5), rng.standard_normal(5)],
                         dict(eps=1e-5)),
                        ([rng.standard_normal((2, 3, 4)) * 10, rng.standard_normal(4),
                          rng.standard_normal(4)], dict(eps=1e-3))],
    reference=_np_layer_norm,
    doc="(x - mean) / sqrt(var + eps) * w + b over the last axis (biased variance)")


# -- rms norm ------------------------------------------------------------------------------

_ms, _r = symbols("ms r")

# rms_norm over the last axis: x / sqrt(mean(x^2) + eps) * w.
RMS_NORM = RowProgram("rms_norm", rows=(_x,), cols=(_w,), params=(_eps,), steps=(
    Step(_ms, "mean", _x ** 2),
    Step(_r, "map", 1 / sympy.sqrt(_ms + _eps)),
    Step(_out, "map", _x * _r * _w)))


def _rms_norm_vjp(g: Any, out: Any, inputs: tuple, needs: tuple, eps: float) -> tuple:
    """dx = r * (g*w - x * r^2 * mean(g*w*x)), dw = sum(g * x * r)."""
    x, w = inputs
    axis = (x.ndim - 1,)
    n = float(x.shape[-1])
    r = rsqrt(add(div(sum_op(mul(x, x), axis=axis, keepdims=True), n), eps))
    gx = gw = None
    if needs[0]:
        gxh = mul(g, w)
        m = div(sum_op(mul(gxh, x), axis=axis, keepdims=True), n)
        gx = mul(r, sub(gxh, mul(x, mul(mul(r, r), m))))
    if needs[1]:
        gw = sum_to(mul(g, mul(x, r)), tuple(w.shape))
    return gx, gw


rms_norm = rows_op(
    "rms_norm", RMS_NORM, saves=(0, 1),
    infer=lambda x, w, eps: infer_last_axis("rms_norm", x, weight=w),
    vjp=_rms_norm_vjp,
    sample=lambda rng: [([rng.standard_normal((3, 5)), rng.standard_normal(5)], dict(eps=1e-5)),
                        ([rng.standard_normal((2, 3, 4)) * 10, rng.standard_normal(4)], dict(eps=1e-3))],
    reference=lambda x, w, eps: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w,
    doc="x / sqrt(mean(x^2) + eps) * w over the last axis")
