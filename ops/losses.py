"""Per-row losses as row programs: the cross-entropy of logits and the negative
log-likelihood of log-probabilities, one value per row, classes on the last axis.

Each picks the target's entry by index (a `pick` step), never through a one-hot
product, so a -inf at another class gives no 0 * -inf: the loss is finite whenever
the target's entry is. Label smoothing's uniform part sums only the classes that are
not -inf (PyTorch's loss is +inf there). A row whose target is `ignore_index` gives
exactly 0 whatever its entries hold (NaN, inf): the mask is the program's last step,
and their gradients (row programs too, reading the cotangent as a per-row input and the
column index) give exactly 0 there. The reduction over rows (mean, sum) is an
ordinary sum, in ops.composite.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import sympy

from .errors import DTypeError, ShapeError
from .rows import RowProgram, Step, finite_or, nonzero_or, rows_op, symbols

NEG_INF = float("-inf")

_x, _t, _s, _ign = symbols("x target label_smoothing ignore_index")
_m0, _m, _s0, _lse, _xt, _fx, _ff, _out = symbols("m0 m s0 lse xt fx ff out")

# x where it is not -inf, else 0; 1 where x is not -inf, else 0.
_FINITE_X = sympy.Piecewise((0, sympy.Eq(_x, -sympy.oo)), (_x, True))
_FINITE_ONE = sympy.Piecewise((0, sympy.Eq(_x, -sympy.oo)), (1, True))


def _masked(loss: sympy.Expr, smoothed: sympy.Expr) -> sympy.Expr:
    """0 on an ignored row; `loss` without smoothing (so no 0 * inf from the uniform
    part), `smoothed` with it."""
    return sympy.Piecewise((0, sympy.Eq(_t, _ign)), (loss, sympy.Eq(_s, 0)), (smoothed, True))


# loss = (1 - s) (lse - x[t]) + s (|F| lse - sum_F x) / C over the classes F not at -inf.
CROSS_ENTROPY = RowProgram("cross_entropy_per_row", rows=(_x,), indices=(_t,), params=(_s, _ign), steps=(
    Step(_m0, "max", _x),
    Step(_m, "map", finite_or(_m0, 0)),
    Step(_s0, "sum", sympy.exp(_x - _m)),
    Step(_lse, "map", _m + sympy.log(nonzero_or(_s0, 1))),
    Step(_xt, "pick", _x, at=_t),
    Step(_fx, "mean", _FINITE_X),
    Step(_ff, "mean", _FINITE_ONE),
    Step(_out, "map", _masked(_lse - _xt, (1 - _s) * (_lse - _xt) + _s * (_ff * _lse - _fx)))))

# loss = -(1 - s) x[t] - s sum_F x / C, x the log-probabilities.
NLL = RowProgram("nll_per_row", rows=(_x,), indices=(_t,), params=(_s, _ign), steps=(
    Step(_xt, "pick", _x, at=_t),
    Step(_fx, "mean", _FINITE_X),
    Step(_out, "map", _masked(-_xt, -(1 - _s) * _xt - _s * _fx))))


def _infer(name: str) -> Any:
    def infer(x: Any, t: Any, ignore_index: int, label_smoothing: float) -> tuple:
        if x.ndim < 1 or np.dtype(x.dtype).kind != "f":
            raise DTypeError(f"{name}: scores must be a floating tensor with a class axis, got dtype "
                             f"{x.dtype} shape {tuple(x.shape)}")
        if np.dtype(t.dtype).kind not in "iu":
            raise DTypeError(f"{name}: targets must be integer class indices, got {t.dtype}")
        if tuple(t.shape) != tuple(x.shape[:-1]):
            raise ShapeError(f"{name}: scores of shape {tuple(x.shape)} (classes on the last axis) "
                             f"need targets of shape {tuple(x.shape[:-1])}, got {tuple(t.shape)}")
        if x.shape[-1] == 0:
            raise ShapeError(f"{name}: scores of shape {tuple(x.shape)} have no classes")
        return tuple(t.shape), np.dtype(x.dtype)
    return infer


def _np_nll(logp: np.ndarray, t: np.ndarray, ignore_index: int, label_smoothing: float) -> np.ndarray:
    valid = t != ignore_index
    picked = np.take_along_axis(logp, np.where(valid, t, 0)[..., None], -1)[..., 0]
    uniform = np.where(np.isneginf(logp), 0.0, logp).mean(-1)
    loss = -(1 - label_smoothing) * picked - (label_smoothing * uniform if label_smoothing else 0.0)
    return np.where(valid, loss, 0.0)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, -1, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)
    s = np.exp(x - m).sum(-1, keepdims=True)
    return x - m - np.log(np.where(s == 0, 1.0, s))


def _samples(rng: np.random.Generator) -> list:
    """Plain, smoothed, with -inf at a non-target class, with ignored rows, batched."""
    masked = rng.standard_normal((3, 4))
    masked[0, 2] = NEG_INF
    return [([rng.standard_normal((3, 5)), rng.integers(0, 5, (3,))], dict(ignore_index=-100, label_smoothing=0.0)),
            ([masked, np.array([1, -100, 3])], dict(ignore_index=-100, label_smoothing=0.2)),
            ([rng.standard_normal((2, 2, 3)) * 3, np.array([[0, 2], [1, 1]])],
             dict(ignore_index=1, label_smoothing=0.1))]


# -- gradients, as row programs too -------------------------------------------------------
# d loss / dx_j = g * (softmax(x)_j * sum(w) - w_j) (cross-entropy) or -g * w_j (nll),
# w the smoothed target distribution: (1 - s) at the target, s / C at each class not
# at -inf. 0 on an ignored row whatever it holds.
_g, _j, _n, _e, _sm = symbols("g j n e sm")
_HOT = sympy.Piecewise((1 - _s, sympy.Eq(_j, _t)), (0, True))
_W = _HOT + _s / _n * _FINITE_ONE


def _grad_masked(plain: sympy.Expr, smoothed: sympy.Expr) -> sympy.Expr:
    return sympy.Piecewise((0, sympy.Eq(_t, _ign)), (plain, sympy.Eq(_s, 0)), (smoothed, True))


CROSS_ENTROPY_GRAD = RowProgram(
    "cross_entropy_per_row_grad", rows=(_x,), scalars=(_g,), indices=(_t,), params=(_s, _ign),
    column=_j, length=_n, steps=(
        Step(_m0, "max", _x),
        Step(_m, "map", finite_or(_m0, 0)),
        Step(_e, "map", sympy.exp(_x - _m)),
        Step(_s0, "sum", _e),
        Step(_sm, "map", nonzero_or(_s0, 1)),
        Step(_ff, "mean", _FINITE_ONE),
        Step(_out, "map", _grad_masked(_g * (_e / _sm - _HOT.subs(_s, 0)),
                                       _g * (_e / _sm * (1 - _s + _s * _ff) - _W)))))

NLL_GRAD = RowProgram(
    "nll_per_row_grad", rows=(_x,), scalars=(_g,), indices=(_t,), params=(_s, _ign),
    column=_j, length=_n, steps=(
        Step(_out, "map", _grad_masked(-_g * _HOT.subs(_s, 0), -_g * _W)),))


def _np_weights(x: np.ndarray, t: np.ndarray, label_smoothing: float) -> np.ndarray:
    hot = np.arange(x.shape[-1]) == t[..., None]
    w = np.where(hot, 1.0 - label_smoothing, 0.0)
    return w + (np.where(np.isneginf(x), 0.0, label_smoothing / x.shape[-1]) if label_smoothing else 0.0)


def _np_cross_entropy_grad(x: np.ndarray, g: np.ndarray, t: np.ndarray, ignore_index: int,
                           label_smoothing: float) -> np.ndarray:
    w = _np_weights(x, t, label_smoothing)
    p = np.exp(_np_log_softmax(x))
    return np.where((t != ignore_index)[..., None], g[..., None] * (p * w.sum(-1, keepdims=True) - w), 0.0)


def _np_nll_grad(x: np.ndarray, g: np.ndarray, t: np.ndarray, ignore_index: int,
                 label_smoothing: float) -> np.ndarray:
    return np.where((t != ignore_index)[..., None], -g[..., None] * _np_weights(x, t, label_smoothing), 0.0)


def _infer_grad(name: str) -> Any:
    def infer(x: Any, g: Any, t: Any, ignore_index: int, label_smoothing: float) -> tuple:
        _infer(name)(x, t, ignore_index, label_smoothing)
        if tuple(g.shape) != tuple(t.shape) or np.dtype(g.dtype).kind != "f":
            raise ShapeError(f"{name}: the cotangent must be floating with one value per row, shape "
                             f"{tuple(t.shape)}; got {g.dtype} shape {tuple(g.shape)}")
        return tuple(x.shape), np.dtype(x.dtype)
    return infer


def _grad_samples(rng: np.random.Generator) -> list:
    return [([x, rng.standard_normal(t.shape), t], p) for (x, t), p in _samples(rng)]


cross_entropy_per_row_grad = rows_op(
    "cross_entropy_per_row_grad", CROSS_ENTROPY_GRAD, vjp=None, saves=None,
    infer=_infer_grad("cross_entropy_per_row_grad"), sample=_grad_samples, reference=_np_cross_entropy_grad,
    doc="the VJP of cross_entropy_per_row: g * (softmax(x) * sum(w) - w), w the smoothed targets")

nll_per_row_grad = rows_op(
    "nll_per_row_grad", NLL_GRAD, vjp=None, saves=None, infer=_infer_grad("nll_per_row_grad"),
    sample=_grad_samples, reference=_np_nll_grad,
    doc="the VJP of nll_per_row: -g * w, w the smoothed targets")


def _cross_entropy_vjp(g: Any, out: Any, inputs: tuple, needs: tuple, ignore_index: int,
                       label_smoothing: float) -> tuple:
    """dx = g * (softmax(x) * sum(w) - w): one printed row kernel."""
    x, t = inputs
    return cross_entropy_per_row_grad(x, g, t, ignore_index=ignore_index, label_smoothing=label_smoothing), None


def _nll_vjp(g: Any, out: Any, inputs: tuple, needs: tuple, ignore_index: int,
             label_smoothing: float) -> tuple:
    """dx = -g * w: one printed row kernel."""
    x, t = inputs
    return nll_per_row_grad(x, g, t, ignore_index=ignore_index, label_smoothing=label_smoothing), None


cross_entropy_per_row = rows_op(
    "cross_entropy_per_row", CROSS_ENTROPY, saves=(0, 1), infer=_infer("cross_entropy_per_row"), vjp=_cross_entropy_vjp,
    sample=_samples,
    reference=lambda x, t, ignore_index, label_smoothing: _np_nll(_np_log_softmax(x), t, ignore_index,
                                                                  label_smoothing),
    doc="per-row cross-entropy of logits (..., C) and targets (...): finite whenever the target "
        "logit is; 0 on a row whose target is ignore_index")

nll_per_row = rows_op(
    "nll_per_row", NLL, saves=(0, 1), infer=_infer("nll_per_row"), vjp=_nll_vjp, sample=_samples, reference=_np_nll,
    doc="per-row negative log-likelihood of log-probabilities (..., C) and targets (...); 0 on a "
        "row whose target is ignore_index")
