"""Stateless functions of nn: losses, masks, attention and activations.

Everything is written with engine ops, so it runs on any backend and under the
jit. Conventions that differ from PyTorch are stated where they occur:
- classes are on the LAST axis of `logits` (torch uses axis 1): logits (..., C),
  targets (...), which is the natural layout of (batch, time, vocab).
- `linear` takes the weight as (in, out): y = x @ W + b.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

import engine as eg
from engine import Tensor
from engine.errors import ArgumentError, DTypeError, ShapeError, TraceError
from engine.tensor import torch_names
from engine.validate import validated

NEG_INF = float("-inf")


# -- activations and basic layers -------------------------------------------------------------

# nn takes Tensors (a list or array is refused, naming the argument), as PyTorch's nn does;
# the engine's NumPy-style functions (eg.relu, ...) convert array-likes instead.
@validated
def relu(x: Tensor) -> Tensor:
    return eg.relu(x)


@validated
def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    return eg.gelu(x, approximate)


@validated
def tanh(x: Tensor) -> Tensor:
    return eg.tanh(x)


@validated
def sigmoid(x: Tensor) -> Tensor:
    return eg.sigmoid(x)


@torch_names
@validated
def softmax(x: Tensor, axis: int | None = None) -> Tensor:
    return eg.softmax(x, axis)


@torch_names
@validated
def log_softmax(x: Tensor, axis: int | None = None) -> Tensor:
    return eg.log_softmax(x, axis)


@validated
def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    return eg.layer_norm(x, weight, bias, eps)


@validated
def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    return eg.dropout(x, p, training)


@validated
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ W (+ b) with W of shape (in_features, out_features)."""
    if x.shape[-1:] != weight.shape[:1]:
        raise ShapeError(f"linear: input of shape {tuple(x.shape)} has {x.shape[-1] if x.ndim else 0} "
                         f"features, the weight of shape {tuple(weight.shape)} expects "
                         f"{weight.shape[0]} (weights are stored (in, out))")
    y = x @ weight
    return y if bias is None else y + bias


def activation_fn(name: Any) -> Any:
    """'relu' | 'gelu' | 'gelu_tanh' | a callable -> the function."""
    if callable(name):
        return name
    table = {"relu": eg.relu, "gelu": eg.gelu,
             "gelu_tanh": lambda x: eg.gelu(x, approximate="tanh")}
    if name not in table:
        raise ArgumentError(f"activation must be one of {sorted(table)} or a callable, got {name!r}")
    return table[name]


# -- masks --------------------------------------------------------------------------------------

@validated
def causal_mask(tq: int, tk: int | None = None, device: str = "cpu") -> Tensor:
    """Bool (tq, tk) mask, True where a query may NOT look (a key in its future).

    Query i sits at absolute position i + (tk - tq): with tq == tk this is the usual
    upper triangle; with fewer queries than keys (decoding with a key/value cache)
    the queries are the last positions and see every earlier key.
    """
    tk = tq if tk is None else tk
    if tq > tk:
        raise ShapeError(f"causal_mask: {tq} queries cannot be the last positions of only "
                         f"{tk} keys")
    rows = eg.arange(tq, device=device).reshape(tq, 1)
    cols = eg.arange(tk, device=device).reshape(1, tk)
    return cols > rows + (tk - tq)


@validated
def padding_mask(tokens: Tensor, pad_idx: int) -> Tensor:
    """Bool mask of the pad tokens (True = pad), the key_padding_mask convention."""
    return tokens == pad_idx


# -- losses --------------------------------------------------------------------------------------

def _host_values(t: Tensor) -> np.ndarray | None:
    """Concrete values for validation, or None while tracing (checks then happen never)."""
    try:
        return t.numpy()
    except TraceError:
        return None


def _loss_dtype(x: Tensor) -> Tensor:
    """Losses run in float32 at least (PyTorch's autocast does the same): float16 logits
    that fit their dtype still have differences (x - max) and sums of squares that do
    not, so a float16 loss path turns representable logits into inf / NaN. The
    gradient flows back cast to the logits' dtype; where that overflows, GradScaler
    sees it and skips the step."""
    return x.to(dtype=eg.float32) if np.dtype(x.dtype).kind == "f" and \
        np.dtype(x.dtype).itemsize < 4 else x


def _reduce(loss: Tensor, reduction: str, count: Tensor | None = None) -> Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / count if count is not None else total / float(max(loss.size, 1))



@validated
def nll_loss(log_probs: Tensor, target: Tensor, ignore_index: int = -100,
             reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Negative log-likelihood of integer targets given log-probabilities (..., C).

    With label smoothing e the target distribution is (1-e)*onehot + e/C (as in
    torch). Positions whose target equals `ignore_index` contribute 0 and get zero
    gradient; "mean" divides by the number of other positions, and a batch in which
    every target is ignored gives a loss of 0 with gradient 0 (torch gives NaN).
    A target outside [0, C) that is not ignore_index raises ShapeError.
    """
    if np.dtype(log_probs.dtype).kind != "f":
        raise DTypeError(f"nll_loss: log-probabilities must be floating, got {log_probs.dtype}")
    if np.dtype(target.dtype).kind not in "iu":
        raise DTypeError(f"nll_loss: targets must be integer class indices, got {target.dtype} "
                         f"(shape {tuple(target.shape)})")
    if log_probs.ndim < 1 or tuple(target.shape) != tuple(log_probs.shape[:-1]):
        raise ShapeError(f"nll_loss: logits of shape {tuple(log_probs.shape)} (classes on the last "
                         f"axis) need targets of shape {tuple(log_probs.shape[:-1])}, got "
                         f"{tuple(target.shape)}")
    classes = log_probs.shape[-1]
    log_probs = _loss_dtype(log_probs)
    values = _host_values(target)
    if values is not None:
        bad = (values != ignore_index) & ((values < 0) | (values >= classes))
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ShapeError(f"nll_loss: target value {int(values[where])} at position {where} is "
                             f"outside [0, {classes}) (the {classes} classes on the last axis of "
                             f"shape {tuple(log_probs.shape)}) and is not ignore_index={ignore_index}")
    weights = eg.one_hot(target, classes, dtype=log_probs.dtype)
    if label_smoothing:
        weights = weights * (1.0 - label_smoothing) + label_smoothing / classes
    loss = -(weights * log_probs).sum(axis=-1)
    valid = target != ignore_index
    if label_smoothing or 0 <= ignore_index < classes:
        loss = eg.where(valid, loss, 0.0)      # an out-of-range ignore_index has a zero one-hot row
    count = None
    if reduction == "mean":
        count = eg.maximum(valid.to(dtype=log_probs.dtype).sum(), 1.0)
    return _reduce(loss, reduction, count)


@validated
def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Cross-entropy of integer targets (...) against unnormalised logits (..., C).

    Computed as nll_loss(log_softmax(logits)), which is stable for any finite
    logits (the softmax is max-shifted). See nll_loss for ignore_index, label
    smoothing, reductions and the all-ignored batch (loss 0, gradient 0).
    """
    if logits.ndim < 1 or np.dtype(logits.dtype).kind != "f":
        raise DTypeError(f"cross_entropy: logits must be a floating tensor with a class axis, got "
                         f"dtype {logits.dtype} shape {tuple(logits.shape)}")
    return nll_loss(eg.log_softmax(_loss_dtype(logits), -1), target, ignore_index, reduction,
                    label_smoothing)


@validated
def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Mean squared error; shapes must match exactly (a broadcast here is usually a bug)."""
    if tuple(input.shape) != tuple(target.shape):
        raise ShapeError(f"mse_loss: input of shape {tuple(input.shape)} and target of shape "
                         f"{tuple(target.shape)} must have the same shape")
    d = _loss_dtype(input) - _loss_dtype(target)
    return _reduce(d * d, reduction)


# -- attention -------------------------------------------------------------------------------------

@validated
def attend(q: Tensor, k_t: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None,
           dropout_p: float = 0.0, training: bool = False) -> tuple[Tensor, Tensor]:
    """softmax(q @ k_t * scale + mask) @ v over the last two axes -> (out, weights).

    `k_t` is K already transposed (..., d, S), so the matmul needs no transposed view.
    `mask` is bool (True = blocked, set to -inf) or additive float, broadcast to the
    scores (..., T, S). A row with every key blocked gives weights 0 and output 0
    (never NaN, also in backward). Dropout acts on the weights, as in the paper.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k_t) * scale
    if mask is not None:
        if np.dtype(mask.dtype) == np.dtype(bool):
            scores = eg.where(mask, NEG_INF, scores)
        else:
            scores = scores + mask
    weights = eg.softmax(scores, -1)
    used = eg.dropout(weights, dropout_p, training) if dropout_p and training else weights
    return used @ v, used


@validated
def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None, training: bool = True) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention: a bool attn_mask is True where
    a query MAY attend (the opposite of MultiheadAttention's masks), a float one is added."""
    mask = None
    if attn_mask is not None:
        mask = ~attn_mask if np.dtype(attn_mask.dtype) == np.dtype(bool) else attn_mask
    if is_causal:
        c = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
        mask = c if mask is None else merge_masks(mask, c)
    return attend(q, k.swapaxes(-1, -2), v, mask, scale, dropout_p, training)[0]


@validated
def merge_masks(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """Combine two attention masks (bool True = blocked, or additive float) by broadcasting:
    bool with bool stays bool (logical or); otherwise both become additive floats."""
    if a is None or b is None:
        return b if a is None else a
    a_bool = np.dtype(a.dtype) == np.dtype(bool)
    b_bool = np.dtype(b.dtype) == np.dtype(bool)
    if a_bool and b_bool:
        return a | b
    dtype = a.dtype if not a_bool else b.dtype
    if a_bool:
        a = eg.where(a, NEG_INF, 0.0).to(dtype=dtype)
    if b_bool:
        b = eg.where(b, NEG_INF, 0.0).to(dtype=dtype)
    return a + b
