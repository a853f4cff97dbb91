"""Composite functions, written from primitive ops.

They are differentiated through their primitives, so their gradients need no
code of their own; they are numerically stable (max-shifted exponentials), and
masked entries at -inf never produce NaN in forward or backward:
- a softmax row whose entries are all -inf gives 0 and gradient 0;
- logsumexp of an all -inf slice gives -inf with gradient 0;
- log_softmax of such a row gives -inf (gradient flows only where finite).
`COMPOSITES` lists them with samples so the registry-driven tests cover them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .attention import fused_attention
from .elementwise import add, div, eq, exp, log, maximum, minimum, mul, ne, neg, rsqrt, sub
from .errors import DTypeError, ShapeError
from .fused import logsumexp as fused_logsumexp, softmax as fused_softmax
from .losses import cross_entropy_per_row, nll_per_row
from .linalg import matmul
from .elementwise import where
from .extrema import max as max_op
from .movement import cast, concatenate, getitem, reshape, stop_gradient, transpose
from .random import arange, bernoulli
from .reduce import sum as sum_op
from .shapes import normalize_axis, prod, reduced_shape
from .spec import offers

NEG_INF = float("-inf")


def _axes(name: str, x: Any, axis: Any) -> tuple | None:
    return normalize_axis(name, axis, x.ndim)


def _one_axis(name: str, x: Any, axis: int) -> int:
    return normalize_axis(name, axis, x.ndim)[0]


def _float(x: Any) -> Any:
    return x if np.dtype(x.dtype).kind == "f" else cast(x, dtype=np.dtype(np.float32))


# -- shape helpers -------------------------------------------------------------------------

def expand_dims(x: Any, axis: int) -> Any:
    """Insert a size-1 axis at `axis` (negative counts from the new end)."""
    nd = x.ndim + 1
    if not -nd <= axis < nd:
        raise ShapeError(f"expand_dims: axis {axis} out of range for {x.ndim}-d shape {tuple(x.shape)}")
    axis %= nd
    shape = tuple(x.shape)
    return reshape(x, shape=shape[:axis] + (1,) + shape[axis:])


def squeeze(x: Any, axis: Any = None) -> Any:
    """Drop size-1 axes (all of them, or those in `axis`)."""
    shape = tuple(x.shape)
    axes = _axes("squeeze", x, axis)
    if axes is None:
        axes = tuple(i for i, d in enumerate(shape) if d == 1)
    for a in axes:
        if shape[a] != 1:
            raise ShapeError(f"squeeze: axis {a} of shape {shape} has size {shape[a]}, not 1")
    return reshape(x, shape=tuple(d for i, d in enumerate(shape) if i not in axes))


def swapaxes(x: Any, a: int, b: int) -> Any:
    a, b = _one_axis("swapaxes", x, a), _one_axis("swapaxes", x, b)
    axes = list(range(x.ndim))
    axes[a], axes[b] = axes[b], axes[a]
    return transpose(x, axes=tuple(axes))


def stack(xs: Sequence[Any], axis: int = 0) -> Any:
    if not xs:
        raise ShapeError("stack: needs at least one tensor")
    nd = xs[0].ndim + 1
    axis = normalize_axis("stack", axis, nd)[0]
    return concatenate(*(expand_dims(x, axis) for x in xs), axis=axis)


def split(x: Any, sections: int | Sequence[int], axis: int = 0) -> list:
    """NumPy's split: `sections` equal parts, or the cut points given."""
    axis = _one_axis("split", x, axis)
    n = x.shape[axis]
    if isinstance(sections, int):
        if sections <= 0 or n % sections:
            raise ShapeError(f"split: axis {axis} of size {n} cannot be split into {sections} equal parts")
        cuts = [n // sections * i for i in range(1, sections)]
    else:
        cuts = list(sections)
    bounds = [0] + cuts + [n]
    pre = tuple(("slice", None, None, None) for _ in range(axis))
    return [getitem(x, index=pre + (("slice", a, b, None),)) for a, b in zip(bounds[:-1], bounds[1:])]


# -- reductions ------------------------------------------------------------------------------

def _count(x: Any, axes: tuple | None) -> int:
    return prod(x.shape) if axes is None else prod(x.shape[a] for a in axes)


def mean(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    axes = _axes("mean", x, axis)
    return div(sum_op(_float(x), axis=axes, keepdims=keepdims), float(_count(x, axes)))


def var(x: Any, axis: Any = None, keepdims: bool = False, correction: int = 0) -> Any:
    """Variance; `correction=0` is the biased (population) variance, 1 the unbiased."""
    axes = _axes("var", x, axis)
    x = _float(x)
    centred = sub(x, mean(x, axes, keepdims=True))
    return div(sum_op(mul(centred, centred), axis=axes, keepdims=keepdims),
               float(_count(x, axes) - correction))


def min(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    return neg(max_op(neg(x), axis=_axes("min", x, axis), keepdims=keepdims))


def _shift(x: Any, axes: tuple | None) -> Any:
    """The max along `axes` as a constant (it cancels), 0 where the slice is all -inf."""
    m = stop_gradient(max_op(x, axis=axes, keepdims=True))
    return where(eq(m, NEG_INF), 0.0, m)


def logsumexp(x: Any, axis: Any = -1, keepdims: bool = False) -> Any:
    """The row program of ops.fused over one axis; several axes (or None: all) are
    moved last and flattened into one. An empty slice gives -inf (as PyTorch)."""
    axes = _axes("logsumexp", x, axis)
    x = _float(x)
    axes = tuple(range(x.ndim)) if axes is None else axes
    shape = tuple(x.shape)
    if _count(x, axes) == 0:
        return add(sum_op(x, axis=axes, keepdims=keepdims), NEG_INF)     # sum of nothing: 0
    if len(axes) == 1:
        return fused_logsumexp(x, axis=axes[0], keepdims=keepdims)
    rest = tuple(d for d in range(x.ndim) if d not in axes)
    flat = reshape(transpose(x, axes=rest + axes), shape=tuple(shape[d] for d in rest) + (_count(x, axes),))
    out = fused_logsumexp(flat, axis=len(rest), keepdims=False)
    return reshape(out, shape=reduced_shape(shape, axes, keepdims))


def softmax(x: Any, axis: int = -1) -> Any:
    axes = (_one_axis("softmax", x, axis),)
    x = _float(x)
    e = exp(sub(x, _shift(x, axes)))
    s = sum_op(e, axis=axes, keepdims=True)
    return div(e, where(eq(s, 0.0), 1.0, s))


def log_softmax(x: Any, axis: int = -1) -> Any:
    axes = (_one_axis("log_softmax", x, axis),)
    x = _float(x)
    shifted = sub(x, _shift(x, axes))
    s = sum_op(exp(shifted), axis=axes, keepdims=True)
    return sub(shifted, log(where(eq(s, 0.0), 1.0, s)))


# -- selection -----------------------------------------------------------------------------

def masked_fill(x: Any, mask: Any, value: float) -> Any:
    """`value` where `mask` is True, else `x` (mask broadcasts)."""
    return where(mask, value, x)


def clip(x: Any, lo: float | None = None, hi: float | None = None) -> Any:
    if lo is not None:
        x = maximum(x, lo)
    if hi is not None:
        x = minimum(x, hi)
    return x


def _device(x: Any) -> str:
    return getattr(x, "device", "cpu")


def take_along_axis(x: Any, indices: Any, axis: int) -> Any:
    """NumPy's take_along_axis, as advanced indexing with broadcast ranges."""
    axis = _one_axis("take_along_axis", x, axis)
    if indices.ndim != x.ndim:
        raise ShapeError(f"take_along_axis: indices of shape {tuple(indices.shape)} must have "
                         f"as many dimensions as x of shape {tuple(x.shape)}")
    spec, extra = [], []
    for d in range(x.ndim):
        if d == axis:
            extra.append(indices)
        else:
            shape = [1] * x.ndim
            shape[d] = x.shape[d]
            r = arange(start=0, stop=x.shape[d], step=1, dtype=np.dtype(np.int64), device=_device(x))
            extra.append(reshape(r, shape=tuple(shape)))
        spec.append(("tensor", d))
    return getitem(x, *extra, index=tuple(spec))


def one_hot(indices: Any, num_classes: int, dtype: Any = np.float32) -> Any:
    if np.dtype(indices.dtype).kind not in "iu":
        raise DTypeError(f"one_hot: indices must be integer, got {indices.dtype}")
    classes = arange(start=0, stop=num_classes, step=1, dtype=np.dtype(indices.dtype),
                     device=_device(indices))
    return cast(eq(expand_dims(indices, -1), classes), dtype=np.dtype(dtype))


def dropout(x: Any, p: float, training: bool = True) -> Any:
    """Zero each element with probability `p`, scale the rest by 1/(1-p)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    keep = bernoulli(shape=tuple(x.shape), p=1.0 - p, dtype=np.dtype(x.dtype), device=_device(x))
    return mul(x, mul(keep, 1.0 / (1.0 - p)))


# -- normalisation and attention ---------------------------------------------------------------

def layer_norm(x: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
    """Normalise over the last axis (biased variance), then scale and shift."""
    mu = mean(x, -1, keepdims=True)
    centred = sub(x, mu)
    v = mean(mul(centred, centred), -1, keepdims=True)
    y = mul(centred, rsqrt(add(v, eps)))
    if weight is not None:
        y = mul(y, weight)
    if bias is not None:
        y = add(y, bias)
    return y


def attention(q: Any, k_t: Any, v: Any, mask: Any = None, scale: float | None = None,
              dropout_p: float = 0.0, training: bool = False) -> tuple:
    """softmax(q @ k_t * scale, masked) @ v over the last two axes -> (out, weights).

    The one attention of the engine: nn.MultiheadAttention and both
    scaled_dot_product_attention functions call it. `k_t` is K already transposed
    (..., d, S), so the matmul needs no transposed view (a KV cache keeps K^T).
    `mask` is bool (True = may attend) or additive float (0 / -inf or a large
    negative), broadcast against the scores (..., T, S); PyTorch's MultiheadAttention
    convention (True = blocked) is converted by nn, at its API. A query with no
    allowed key gets weights 0 and output 0, never NaN (forward and backward).
    Dropout, when training, acts on the weights (as in the paper).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    masks = () if mask is None else (mask,)
    params = dict(scale=scale, dropout_p=float(dropout_p) if training else 0.0)
    if offers(fused_attention, (q, k_t, v, *masks), params):
        # one kernel (ops/attention.py) where the backend offers it: [weights | out]
        packed = fused_attention(q, k_t, v, *masks, **params)
        pre = (("ellipsis",),)
        s = k_t.shape[-1]
        return (getitem(packed, index=pre + (("slice", s, None, None),)),
                getitem(packed, index=pre + (("slice", None, s, None),)))
    scores = mul(matmul(q, k_t), scale)
    if mask is not None:
        if np.dtype(mask.dtype) == np.dtype(bool):
            scores = where(mask, scores, NEG_INF)
        else:
            scores = add(scores, mask)
    weights = fused_softmax(scores, axis=scores.ndim - 1)
    if dropout_p and training:
        weights = dropout(weights, dropout_p, training)
    return matmul(weights, v), weights


def scaled_dot_product_attention(q: Any, k: Any, v: Any, mask: Any = None,
                                 scale: float | None = None, return_weights: bool = False) -> Any:
    """softmax(Q K^T * scale, masked) V over the last two axes; `mask` as in `attention`
    (bool True = may attend, or additive float)."""
    out, weights = attention(q, swapaxes(k, -1, -2), v, mask, scale)
    return (out, weights) if return_weights else out


# -- losses ----------------------------------------------------------------------------------------

LOSS_REDUCTIONS = ("mean", "sum", "none")


def _check_loss_args(name: str, arg: str, scores: Any, targets: Any, reduction: str,
                     label_smoothing: float) -> None:
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    if scores.ndim < 1 or np.dtype(scores.dtype).kind != "f":
        raise DTypeError(f"{name}: {arg} must be a floating tensor with a class axis, got "
                         f"dtype {scores.dtype} shape {tuple(scores.shape)}")
    if np.dtype(targets.dtype).kind not in "iu":
        raise DTypeError(f"{name}: targets must be integer class indices, got {targets.dtype} "
                         f"(shape {tuple(targets.shape)})")
    if tuple(targets.shape) != tuple(scores.shape[:-1]):
        raise ShapeError(f"{name}: {arg} of shape {tuple(scores.shape)} (classes on the last "
                         f"axis) need targets of shape {tuple(scores.shape[:-1])}, got "
                         f"{tuple(targets.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1], got {label_smoothing}")


def _reduce_loss(loss: Any, targets: Any, ignore_index: int, reduction: str) -> Any:
    """Per-row losses summed, or averaged over the rows that are not ignored."""
    if reduction == "none":
        return loss
    total = sum_op(loss, axis=None, keepdims=False)
    if reduction == "sum":
        return total
    count = sum_op(cast(ne(targets, ignore_index), dtype=np.dtype(loss.dtype)), axis=None, keepdims=False)
    return div(total, maximum(count, 1.0))


def nll_loss(log_probs: Any, targets: Any, ignore_index: int = -100, reduction: str = "mean",
             label_smoothing: float = 0.0) -> Any:
    """Negative log-likelihood of integer targets (...) given log-probabilities (..., C).

    PyTorch's semantics, classes on the last axis: with label smoothing s the target
    distribution is (1 - s) onehot + s / C; a row whose target is `ignore_index`
    contributes 0, and "mean" divides by the number of the other rows (a batch with
    every row ignored gives 0 with gradient 0, where PyTorch gives NaN).
    Per row it is the row program `ops.losses.nll_per_row`: the target's
    log-probability is picked by index, never multiplied by a one-hot row, so the loss
    is finite whenever the target's log-probability is (a -inf at another class gives
    no 0 * -inf); with smoothing such a class is left out of the uniform part, where
    PyTorch's loss is +inf. An ignored row gives 0 whatever it holds. A target outside
    [0, C) that is not ignored gives NaN (nn checks the values first and names them).
    """
    _check_loss_args("nll_loss", "log_probs", log_probs, targets, reduction, label_smoothing)
    loss = nll_per_row(log_probs, targets, ignore_index=ignore_index, label_smoothing=float(label_smoothing))
    return _reduce_loss(loss, targets, ignore_index, reduction)


def cross_entropy(logits: Any, targets: Any, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean") -> Any:
    """nll_loss(log_softmax(logits)) with classes on the last axis (see nll_loss), as one
    row program (`ops.losses.cross_entropy_per_row`): whatever an ignored row holds
    (NaN, inf) changes neither the loss nor any gradient. The gradient with respect to
    the logits is (softmax - target distribution) / rows.
    """
    _check_loss_args("cross_entropy", "logits", logits, targets, reduction, label_smoothing)
    loss = cross_entropy_per_row(logits, targets, ignore_index=ignore_index,
                                 label_smoothing=float(label_smoothing))
    return _reduce_loss(loss, targets, ignore_index, reduction)


# -- the composite registry (the test plan for composites) --------------------------------------

@dataclass(frozen=True)
class Composite:
    name: str
    fn: Callable[..., Any]
    sample: Callable[[np.random.Generator], list]
    reference: Callable[..., np.ndarray]


def _np_logsumexp(x: np.ndarray, axis: Any, keepdims: bool = False) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis)) if not keepdims else \
        m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def _np_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _np_attention(q: Any, k: Any, v: Any, mask: Any = None) -> np.ndarray:
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    return _np_softmax(s, -1) @ v


def _np_nll(logp: np.ndarray, targets: np.ndarray, ignore_index: int = -100,
            reduction: str = "mean", label_smoothing: float = 0.0) -> np.ndarray:
    valid = targets != ignore_index
    safe = np.where(valid, targets, 0)
    nll = -np.take_along_axis(logp, safe[..., None], -1)[..., 0]
    loss = np.where(valid, (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1), 0.0)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / max(valid.sum(), 1)


def _np_cross_entropy(logits: np.ndarray, targets: np.ndarray, ignore_index: int = -100,
                      label_smoothing: float = 0.0, reduction: str = "mean") -> np.ndarray:
    return _np_nll(np.log(_np_softmax(logits, -1)), targets, ignore_index, reduction,
                   label_smoothing)


def _sample_losses(rng: np.random.Generator) -> list:
    return [([rng.standard_normal((4, 5)), rng.integers(0, 5, (4,))], {}),
            ([rng.standard_normal((2, 3, 4)) * 3, rng.integers(0, 4, (2, 3))],
             dict(label_smoothing=0.1)),
            ([rng.standard_normal((5, 3)), np.array([0, 2, -100, 1, -100])],
             dict(label_smoothing=0.2, reduction="sum")),
            ([rng.standard_normal((2, 4)), np.array([[3, 1], [1, 0]])[0]],
             dict(ignore_index=1, reduction="none"))]


def _sample_attention(rng: np.random.Generator) -> list:
    q, k, v = (rng.standard_normal(s) for s in [(2, 2, 2), (2, 3, 2), (2, 3, 2)])
    causal = np.tril(np.ones((2, 3), bool), 1)
    return [([q, k, v], {}), ([q, k, v, causal], {})]


COMPOSITES: dict[str, Composite] = {c.name: c for c in [
    Composite("mean", mean, lambda r: [([r.standard_normal((3, 4))], dict(axis=1)),
                                       ([r.standard_normal((2, 3, 4))], dict(axis=(0, 2), keepdims=True))],
              lambda x, axis=None, keepdims=False: np.mean(x, axis=axis, keepdims=keepdims)),
    Composite("var", var, lambda r: [([r.standard_normal((3, 4))], dict(axis=-1)),
                                     ([r.standard_normal((5,))], dict(correction=1))],
              lambda x, axis=None, keepdims=False, correction=0: np.var(x, axis=axis, ddof=correction)),
    Composite("min", min, lambda r: [([r.standard_normal((3, 4))], dict(axis=0))],
              lambda x, axis=None, keepdims=False: np.min(x, axis=axis, keepdims=keepdims)),
    Composite("logsumexp", logsumexp, lambda r: [([r.standard_normal((3, 4))], dict(axis=-1)),
                                                 ([r.standard_normal((2, 3)) * 3], dict(axis=0, keepdims=True))],
              _np_logsumexp),
    Composite("softmax", softmax, lambda r: [([r.standard_normal((3, 4))], dict(axis=-1)),
                                             ([r.standard_normal((2, 3, 4))], dict(axis=1))],
              _np_softmax),
    Composite("log_softmax", log_softmax, lambda r: [([r.standard_normal((3, 4))], dict(axis=-1))],
              lambda x, axis: np.log(_np_softmax(x, axis))),
    Composite("masked_fill", masked_fill,
              lambda r: [([r.standard_normal((3, 4)), r.random((1, 4)) < 0.5], dict(value=-2.0))],
              lambda x, mask, value: np.where(mask, value, x)),
    Composite("expand_dims", expand_dims, lambda r: [([r.standard_normal((3, 4))], dict(axis=-1))],
              np.expand_dims),
    Composite("squeeze", squeeze, lambda r: [([r.standard_normal((3, 1, 4, 1))], dict(axis=1))],
              lambda x, axis=None: np.squeeze(x, axis)),
    Composite("swapaxes", swapaxes, lambda r: [([r.standard_normal((2, 3, 4)), 0, -1], {})],
              np.swapaxes),
    Composite("stack", lambda *xs, axis=0: stack(xs, axis),
              lambda r: [([r.standard_normal((2, 3)), r.standard_normal((2, 3))], dict(axis=1))],
              lambda *xs, axis=0: np.stack(xs, axis)),
    Composite("split", lambda x, sections, axis=0: concatenate(*[mul(p, float(i + 1)) for i, p in
                                                                 enumerate(split(x, sections, axis))], axis=axis),
              lambda r: [([r.standard_normal((6, 2))], dict(sections=3)),
                         ([r.standard_normal((2, 5))], dict(sections=[1, 4], axis=1))],
              lambda x, sections, axis=0: np.concatenate(
                  [p * (i + 1) for i, p in enumerate(np.split(x, sections, axis))], axis)),
    Composite("take_along_axis", take_along_axis,
              lambda r: [([r.standard_normal((3, 5)), r.integers(0, 5, (3, 2))], dict(axis=1)),
                         ([r.standard_normal((4, 3)), r.integers(0, 4, (2, 3))], dict(axis=0))],
              lambda x, idx, axis: np.take_along_axis(x, idx, axis)),
    Composite("one_hot", lambda idx, num_classes: one_hot(idx, num_classes, np.float64),
              lambda r: [([r.integers(0, 4, (3, 2))], dict(num_classes=4))],
              lambda idx, num_classes: np.eye(num_classes)[idx]),
    Composite("clip", clip, lambda r: [([r.standard_normal((4, 5)) * 2], dict(lo=-1.0, hi=1.0))],
              lambda x, lo, hi: np.clip(x, lo, hi)),
    Composite("layer_norm", layer_norm,
              lambda r: [([r.standard_normal((3, 5)), r.standard_normal(5), r.standard_normal(5)], {}),
                         ([r.standard_normal((2, 3, 4))], {})],
              lambda x, w=None, b=None, eps=1e-5: (x - x.mean(-1, keepdims=True)) /
              np.sqrt(x.var(-1, keepdims=True) + eps) * (1 if w is None else w) + (0 if b is None else b)),
    Composite("scaled_dot_product_attention", scaled_dot_product_attention, _sample_attention,
              _np_attention),
    Composite("attention", lambda q, k_t, v, *m, **kw: attention(q, k_t, v, *m, **kw)[0],
              lambda r: [([q, np.swapaxes(k, -1, -2), v, *m], p) for (q, k, v, *m), p
                         in _sample_attention(r)],
              lambda q, k_t, v, mask=None: _np_attention(q, np.swapaxes(k_t, -1, -2), v, mask)),
    Composite("cross_entropy", cross_entropy, _sample_losses, _np_cross_entropy),
    Composite("nll_loss", lambda x, t, **kw: nll_loss(log_softmax(x, -1), t, **kw), _sample_losses,
              _np_cross_entropy),
]}
