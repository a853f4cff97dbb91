"""The fused attention: scores, mask, softmax, dropout and P @ V as one op, and its
backward as another, for backends that offer a kernel for them (ops.spec.offers).

`composite.attention` is the definition: softmax(q @ k_t * scale, masked) @ v, with
dropout on the weights. Where the inputs' backend offers `fused_attention` (the CUDA
backend, for short sequences: backends/attnprint.py prints the kernels), the
composite calls it instead of its primitives; elsewhere it never runs, so CPU numerics
are those of the primitives. One op is one output array, so the forward returns the
weights and the output side by side, [weights | out] on the last axis (..., T, S + dv),
and the composite slices them; the backward returns [dQ | dK^T | dV | dScores]
flattened per batch element (dScores only when an additive mask needs a gradient).

The softmax and its gradient inside are the row programs ops.fused.SOFTMAX and
SOFTMAX_GRAD: the kernels call their printed device functions, and here (a backend
without the kernel) they run step by step with `rows.evaluate`. The dropout's keep
mask is the `bernoulli` draw of the composite (same shape, same counters, so the same
bits); the backward reads it back from the weights (a kept weight is p / (1 - p) >= p,
never 0 where p is not). Gradients of gradients are not offered: attention_backward's
VJP raises GradError.

The two ops are declared like the registered ones but kept out of ops.REGISTRY: the
registry-driven tests run every registered op from its samples on every backend and
hold the random ops to the three draws, while these are optional (called only where
offered) and draw when dropout is on. tests/test_cuda_attention.py checks them (the
forward against NumPy and the composite, the VJP proved on the symbolic backend).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .elementwise import add, mul, ne, where
from .errors import DTypeError, GradError, ShapeError
from .fused import SOFTMAX_GRAD, softmax
from .linalg import matmul
from .movement import getitem, reshape
from .random import BERNOULLI
from .reduce import sum_to
from .rows import evaluate
from .spec import Op

NEG_INF = float("-inf")


def _mask_kind(mask: Any) -> str:
    """"none", "bool" (True = may attend) or "add" (added to the scores)."""
    if mask is None:
        return "none"
    return "bool" if np.dtype(mask.dtype) == np.dtype(bool) else "add"


def _infer(q: Any, k_t: Any, v: Any, *mask: Any, scale: float, dropout_p: float) -> tuple:
    """(..., T, d), (..., d, S), (..., S, dv) and a mask broadcasting to (..., T, S) ->
    (..., T, S + dv); one float dtype throughout (an additive mask's too)."""
    if q.ndim < 2 or k_t.ndim != q.ndim or v.ndim != q.ndim:
        raise ShapeError(f"fused_attention: q, k_t and v need the same rank >= 2, got shapes "
                         f"{tuple(q.shape)}, {tuple(k_t.shape)}, {tuple(v.shape)}")
    batch, (t, d), (d2, s), (s2, dv) = tuple(q.shape[:-2]), q.shape[-2:], k_t.shape[-2:], v.shape[-2:]
    if tuple(k_t.shape[:-2]) != batch or tuple(v.shape[:-2]) != batch or d != d2 or s != s2:
        raise ShapeError(f"fused_attention: q {tuple(q.shape)}, k_t {tuple(k_t.shape)} and v "
                         f"{tuple(v.shape)} do not fit (..., T, d), (..., d, S), (..., S, dv) with one batch shape")
    dt = np.dtype(q.dtype)
    if dt.kind != "f" or np.dtype(k_t.dtype) != dt or np.dtype(v.dtype) != dt:
        raise DTypeError(f"fused_attention: q, k_t and v need one float dtype, got {q.dtype}, "
                         f"{k_t.dtype}, {v.dtype}")
    if len(mask) > 1:
        raise ShapeError("fused_attention: at most one mask")
    if mask:
        m = mask[0]
        if _mask_kind(m) == "add" and np.dtype(m.dtype) != dt:
            raise DTypeError(f"fused_attention: an additive mask needs the dtype of q ({dt}), got {m.dtype}")
        try:
            full = np.broadcast_shapes(tuple(m.shape), batch + (t, s))
        except ValueError:
            full = None
        if full != batch + (t, s):
            raise ShapeError(f"fused_attention: mask of shape {tuple(m.shape)} does not broadcast "
                             f"to the scores {batch + (t, s)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fused_attention: dropout_p must be in [0, 1), got {dropout_p}")
    return batch + (t, s + dv), dt


def _probabilities(be: Any, q: Any, k_t: Any, mask: tuple, scale: float) -> Any:
    """softmax of the masked, scaled scores, as the composite computes it."""
    scores = mul.forward(be, matmul.forward(be, q, k_t), scale)
    if mask and _mask_kind(mask[0]) == "bool":
        scores = where.forward(be, mask[0], scores, NEG_INF)
    elif mask:
        scores = add.forward(be, scores, mask[0])
    return softmax.forward(be, scores, axis=scores.ndim - 1)


def _forward(be: Any, q: Any, k_t: Any, v: Any, *mask: Any, scale: float, dropout_p: float) -> Any:
    """The backend's kernel (`run_attention`), or the composite's primitives in its order."""
    run = getattr(be, "run_attention", None)
    out = None if run is None else run(q, k_t, v, mask[0] if mask else None, scale, dropout_p)
    if out is not None:
        return out
    p = _probabilities(be, q, k_t, mask, scale)
    if dropout_p:
        keep = be.random(BERNOULLI, tuple(p.shape), p.dtype, p=1.0 - dropout_p)
        p = mul.forward(be, p, mul.forward(be, keep, 1.0 / (1.0 - dropout_p)))
    return be.concatenate([p, matmul.forward(be, p, v)], -1)


def _sizes(q: Any, k_t: Any, v: Any) -> tuple:
    """(T, d, S, dv)."""
    return q.shape[-2], q.shape[-1], k_t.shape[-1], v.shape[-1]


def _last(x: Any) -> int:
    return x.ndim - 1


def _backward_forward(be: Any, g: Any, y: Any, q: Any, k_t: Any, v: Any, *mask: Any, scale: float,
                      dropout_p: float, with_scores: bool) -> Any:
    """The backend's kernel (`run_attention_backward`), or the same sums with its primitives."""
    run = getattr(be, "run_attention_backward", None)
    out = None if run is None else run(g, y, q, k_t, v, mask[0] if mask else None, scale, dropout_p,
                                       with_scores)
    if out is not None:
        return out
    t, d, s, dv = _sizes(q, k_t, v)
    batch = tuple(q.shape[:-2])
    n = len(batch)
    swap = tuple(range(n)) + (n + 1, n)
    p = _probabilities(be, q, k_t, mask, scale)
    pd, gw, go = (be.getitem(a, (Ellipsis, part)) for a, part in ((y, slice(None, s)), (g, slice(None, s)),
                                                                 (g, slice(s, None))))
    dpd = add.forward(be, gw, matmul.forward(be, go, be.transpose(v, swap)))
    if dropout_p:
        dpd = mul.forward(be, dpd, where.forward(be, ne.forward(be, pd, 0.0), 1.0 / (1.0 - dropout_p), 0.0))
    ds = evaluate(SOFTMAX_GRAD, be, [p, dpd], {})
    dsr = mul.forward(be, ds, scale)
    parts = [matmul.forward(be, dsr, be.transpose(k_t, swap)),        # dQ (T, d)
             matmul.forward(be, be.transpose(q, swap), dsr),          # dK^T (d, S)
             matmul.forward(be, be.transpose(pd, swap), go)]          # dV (S, dv)
    if with_scores:
        parts.append(ds)
    return be.concatenate([be.reshape(x, batch + (-1,)) for x in parts], -1)


def _backward_width(t: int, d: int, s: int, dv: int, with_scores: bool) -> int:
    return t * d + d * s + s * dv + (t * s if with_scores else 0)


def _infer_backward(g: Any, y: Any, q: Any, k_t: Any, v: Any, *mask: Any, scale: float, dropout_p: float,
                    with_scores: bool) -> tuple:
    shape, dt = _infer(q, k_t, v, *mask, scale=scale, dropout_p=dropout_p)
    if tuple(g.shape) != shape or tuple(y.shape) != shape:
        raise ShapeError(f"attention_backward: the output and its gradient need shape {shape}, got "
                         f"{tuple(y.shape)} and {tuple(g.shape)}")
    return tuple(q.shape[:-2]) + (_backward_width(*_sizes(q, k_t, v), with_scores),), dt


def _no_second_order(g: Any, out: Any, inputs: tuple, needs: tuple, **params: Any) -> tuple:
    raise GradError("attention_backward: gradients of the fused attention's gradients are not "
                    "offered (its backward is one kernel with no VJP); differentiate the composite "
                    "attention instead, e.g. on the CPU or with the fused kernel declined")


attention_backward = Op(
    "attention_backward", kind="attention", forward=_backward_forward, infer=_infer_backward,
    vjp=_no_second_order, saves=(),
    doc="[dQ | dK^T | dV | dScores] of fused_attention, flattened per batch element")


def _vjp(g: Any, out: Any, inputs: tuple, needs: tuple, scale: float, dropout_p: float) -> tuple:
    """Slices of one attention_backward call (dScores, summed to the mask's shape, is the
    gradient of an additive mask)."""
    q, k_t, v, *mask = inputs
    with_scores = bool(mask) and len(needs) > 3 and bool(needs[3]) and _mask_kind(mask[0]) == "add"
    packed = attention_backward(g, out, q, k_t, v, *mask, scale=scale, dropout_p=dropout_p,
                                with_scores=with_scores)
    t, d, s, dv = _sizes(q, k_t, v)
    batch = tuple(q.shape[:-2])
    axis = _last(packed)
    pre = tuple(("slice", None, None, None) for _ in range(axis))

    def part(start: int, shape: tuple) -> Any:
        stop = start + shape[0] * shape[1]
        return reshape(getitem(packed, index=pre + (("slice", start, stop, None),)), shape=batch + shape)

    grads = [part(0, (t, d)) if needs[0] else None,
             part(t * d, (d, s)) if needs[1] else None,
             part(t * d + d * s, (s, dv)) if needs[2] else None]
    if mask:
        grads.append(sum_to(part(t * d + d * s + s * dv, (t, s)), tuple(mask[0].shape)) if with_scores else None)
    return tuple(grads)


def _reference(q: np.ndarray, k_t: np.ndarray, v: np.ndarray, *mask: np.ndarray, scale: float,
               dropout_p: float) -> np.ndarray:
    """[weights | out] in NumPy (no dropout)."""
    s = q @ k_t * scale
    if mask and mask[0].dtype == bool:
        s = np.where(mask[0], s, -np.inf)
    elif mask:
        s = s + mask[0]
    m = np.max(s, axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(m), m, 0))
    tot = e.sum(-1, keepdims=True)
    p = e / np.where(tot == 0, 1, tot)
    return np.concatenate([p, p @ v], -1)


def _samples(rng: np.random.Generator) -> list:
    q, k_t, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 4, 5)), rng.standard_normal((2, 5, 3))
    causal = np.tril(np.ones((3, 5), bool))
    causal[0] = False                                   # a query with no allowed key
    return [([q, k_t, v], dict(scale=0.5, dropout_p=0.0)),
            ([q, k_t, v, causal], dict(scale=1 / math.sqrt(4), dropout_p=0.0)),
            ([q, k_t, v, rng.standard_normal((3, 5))], dict(scale=0.3, dropout_p=0.0))]


fused_attention = Op(
    "fused_attention", kind="attention", forward=_forward, infer=_infer, vjp=_vjp, saves=(0, 1, 2, 3, -1),
    random=True, sample=_samples, reference=_reference,
    doc="[softmax(q @ k_t * scale, masked), dropped out | ... @ v]: the offered form of the composite attention")


__all__ = ["fused_attention", "attention_backward"]
