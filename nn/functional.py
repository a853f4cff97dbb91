"""Stateless functions of nn: losses, masks, attention and activations.

Everything is written with engine ops, so it runs on any backend and under the
jit. Conventions that differ from PyTorch are stated where they occur:
- classes are on the LAST axis of `logits` (torch uses axis 1): logits (..., C),
  targets (...), which is the natural layout of (batch, time, vocab).
- `linear` takes the weight as (in, out): y = x @ W + b.
"""
from __future__ import annotations

from typing import Any

import numpy as np

import engine as eg
from engine import Tensor
from engine.dispatch import check_values
from engine.errors import ArgumentError, DTypeError, ShapeError
from engine.tensor import torch_names
from engine.validate import validated
from ops import composite as C

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

def _loss_dtype(x: Tensor) -> Tensor:
    """Losses run in float32 at least (PyTorch's autocast does the same): float16 logits
    that fit their dtype still have differences (x - max) and sums of squares that do
    not, so a float16 loss path turns representable logits into inf / NaN. The
    gradient flows back cast to the logits' dtype; where that overflows, GradScaler
    sees it and skips the step."""
    return x.to(dtype=eg.float32) if np.dtype(x.dtype).kind == "f" and \
        np.dtype(x.dtype).itemsize < 4 else x


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / float(max(loss.size, 1))



def _check_targets(name: str, scores: Tensor, target: Tensor, ignore_index: int) -> None:
    """A target outside [0, C) that is not ignore_index is an error, checked on the
    values eagerly and, under eg.jit, at every call before the program runs."""
    if scores.ndim < 1 or np.dtype(target.dtype).kind not in "iu":
        return                                  # the op names the dtype or shape error
    classes = scores.shape[-1]

    def check(values: np.ndarray) -> None:
        bad = (values != ignore_index) & ((values < 0) | (values >= classes))
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ShapeError(f"{name}: target value {int(values[where])} at position {where} is "
                             f"outside [0, {classes}) (the {classes} classes on the last axis of "
                             f"shape {tuple(scores.shape)}) and is not ignore_index={ignore_index}")
    check_values(target, check)


@validated
def nll_loss(log_probs: Tensor, target: Tensor, ignore_index: int = -100,
             reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Negative log-likelihood of integer targets given log-probabilities (..., C):
    `ops.composite.nll_loss` (ignore_index, label smoothing, reductions, the
    all-ignored batch) after checking the target values."""
    _check_targets("nll_loss", log_probs, target, ignore_index)
    return C.nll_loss(_loss_dtype(log_probs), target, ignore_index, reduction, label_smoothing)


@validated
def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Cross-entropy of integer targets (...) against unnormalised logits (..., C):
    `ops.composite.cross_entropy` (stable for any logits; an ignored row's values
    never reach the loss or a gradient) after checking the target values. Float16
    logits are computed in float32 (as PyTorch's autocast does)."""
    if logits.ndim < 1 or np.dtype(logits.dtype).kind != "f":
        raise DTypeError(f"cross_entropy: logits must be a floating tensor with a class axis, got "
                         f"dtype {logits.dtype} shape {tuple(logits.shape)}")
    _check_targets("cross_entropy", logits, target, ignore_index)
    return C.cross_entropy(_loss_dtype(logits), target, ignore_index, label_smoothing, reduction)


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
def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None, training: bool = True) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention: a bool attn_mask is True where
    a query MAY attend (the convention of `ops.composite.attention`, which this calls),
    a float one is added; `is_causal` blocks the keys after each query."""
    mask = attn_mask
    if is_causal:
        allowed = ~causal_mask(q.shape[-2], k.shape[-2], device=q.device)
        if mask is None:
            mask = allowed
        elif np.dtype(mask.dtype) == np.dtype(bool):
            mask = mask & allowed
        else:
            mask = mask + eg.where(allowed, 0.0, NEG_INF).to(dtype=mask.dtype)
    return C.attention(q, k.swapaxes(-1, -2), v, mask, scale, dropout_p, training)[0]


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
