"""Multi-head attention, batch-first, with separate q, k, v and o projections.

Masks follow torch.nn.MultiheadAttention: a bool `attn_mask` or `key_padding_mask`
is True where attention is NOT allowed; a float mask is added to the scores
(0 / -inf, or a large negative). A query whose every key is masked by -inf gets
output 0 and weights 0 (torch gives NaN), in forward and backward.

`KVCache` keeps the projected keys and values between decoding steps (see
nn.generation): each step then projects only the new tokens.
"""
from __future__ import annotations

from typing import Any

import numpy as np

import engine as eg
from engine import Tensor
from engine.errors import ArgumentError, DTypeError, ShapeError
from ops import composite as C

from . import functional as F
from .layers import Linear
from .module import Module


class KVCache:
    """The keys and values one attention module has already projected, kept between
    decoding steps.

    Why: autoregressive decoding feeds one new token per step; without a cache each
    step re-projects the keys and values of every earlier token. A self-attention
    cache grows by the new tokens at each call (and remembers their key padding mask);
    a `static` cache (cross-attention) projects the encoder memory once, at the first
    call, and reuses it. The new queries are the last positions, which is what
    `causal_mask(T, S)` assumes.
    """

    def __init__(self, static: bool = False) -> None:
        self.static = bool(static)
        self.k_t: Tensor | None = None                 # (B, h, dh, S): K^T, as ops.composite.attention takes it
        self.v: Tensor | None = None                   # (B, h, S, dh)
        self.key_padding_mask: Tensor | None = None    # (B, S) bool, True = pad; None = no pad

    def __len__(self) -> int:
        return 0 if self.k_t is None else int(self.k_t.shape[-1])

    @property
    def filled(self) -> bool:
        """A static cache that holds its keys needs no projection any more."""
        return self.static and self.k_t is not None

    def update(self, k_t: Tensor, v: Tensor, key_padding_mask: Tensor | None
               ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Append the new keys/values (self-attention) or store them once (static);
        returns the keys, values and key padding mask to attend over."""
        if self.static:
            if self.k_t is None:
                self.k_t, self.v = k_t, v
            return self.k_t, self.v, key_padding_mask
        if self.k_t is None:
            self.k_t, self.v, self.key_padding_mask = k_t, v, key_padding_mask
            return k_t, v, key_padding_mask
        b, past, new = self.k_t.shape[0], self.k_t.shape[-1], k_t.shape[-1]
        if k_t.shape[0] != b:
            raise ShapeError(f"KVCache: the cache holds a batch of {b} but the new keys have "
                             f"batch {k_t.shape[0]}; reorder() the cache when the batch changes")
        if key_padding_mask is not None or self.key_padding_mask is not None:
            old = self.key_padding_mask if self.key_padding_mask is not None else \
                eg.zeros(b, past, dtype=eg.bool_, device=k_t.device)
            cur = key_padding_mask if key_padding_mask is not None else \
                eg.zeros(b, new, dtype=eg.bool_, device=k_t.device)
            self.key_padding_mask = eg.concatenate([old, cur], axis=1)
        self.k_t = eg.concatenate([self.k_t, k_t], axis=-1)
        self.v = eg.concatenate([self.v, v], axis=-2)
        return self.k_t, self.v, self.key_padding_mask

    def reorder(self, index: Any) -> None:
        """Keep (and repeat) batch rows `index`: beam search moves hypotheses between rows."""
        if self.k_t is None:
            return
        idx = index if isinstance(index, Tensor) else eg.tensor(np.asarray(index, dtype=np.int64),
                                                                 device=self.k_t.device)
        self.k_t, self.v = self.k_t[idx], self.v[idx]
        if self.key_padding_mask is not None:
            self.key_padding_mask = self.key_padding_mask[idx]


class MultiheadAttention(Module):
    """softmax(Q K^T / sqrt(d_k) + M) V per head, heads concatenated, then `o`.

    Parameters (in this order): q, k, v, o, each a Linear (in, out) with bias.
    `forward` returns (output, weights) like PyTorch; weights is None unless
    `need_weights=True` (then averaged over heads, or per head (B, h, T, S) with
    `average_attn_weights=False`).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = True,
                 dtype: Any = None, device: str = "cpu") -> None:
        super().__init__()
        if not batch_first:
            raise ArgumentError("MultiheadAttention: only batch_first=True (inputs (B, T, E)) is "
                                "supported")
        if embed_dim % num_heads:
            raise ArgumentError(f"MultiheadAttention: embed_dim {embed_dim} must be divisible by "
                                f"num_heads {num_heads}")
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else int(kdim)
        self.vdim = embed_dim if vdim is None else int(vdim)
        self.dropout = float(dropout)
        self.q = Linear(embed_dim, embed_dim, bias, dtype, device)
        self.k = Linear(self.kdim, embed_dim, bias, dtype, device)
        self.v = Linear(self.vdim, embed_dim, bias, dtype, device)
        self.o = Linear(embed_dim, embed_dim, bias, dtype, device)

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[int, int, int]:
        for name, x, d in (("query", query, self.embed_dim), ("key", key, self.kdim),
                           ("value", value, self.vdim)):
            if x.ndim != 3 or x.shape[-1] != d:
                raise ShapeError(f"MultiheadAttention: {name} must be (batch, time, {d}), got "
                                 f"shape {tuple(x.shape)}")
        b, t, _ = query.shape
        if key.shape[:2] != value.shape[:2] or key.shape[0] != b:
            raise ShapeError(f"MultiheadAttention: query {tuple(query.shape)}, key "
                             f"{tuple(key.shape)} and value {tuple(value.shape)} must share the "
                             f"batch size, and key/value the length")
        return b, t, key.shape[1]

    def _mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool,
              b: int, t: int, s: int, device: str) -> Tensor | None:
        """One mask broadcastable to the scores (B, h, T, S)."""
        h = self.num_heads
        mask = None
        if attn_mask is not None:
            _check_mask_dtype("attn_mask", attn_mask)
            shape = tuple(attn_mask.shape)
            if shape == (t, s):
                mask = attn_mask
            elif shape == (b * h, t, s):
                mask = attn_mask.reshape(b, h, t, s)
            elif len(shape) == 4 and all(d in (1, full) for d, full in zip(shape, (b, h, t, s))):
                mask = attn_mask
            else:
                raise ShapeError(f"MultiheadAttention: attn_mask of shape {shape} does not fit "
                                 f"scores (B={b}, heads={h}, T={t}, S={s}); expected ({t}, {s}), "
                                 f"({b * h}, {t}, {s}) or a shape broadcastable to ({b}, {h}, {t}, {s})")
        if key_padding_mask is not None:
            _check_mask_dtype("key_padding_mask", key_padding_mask)
            if tuple(key_padding_mask.shape) != (b, s):
                raise ShapeError(f"MultiheadAttention: key_padding_mask must be (batch, key length) "
                                 f"= ({b}, {s}), got {tuple(key_padding_mask.shape)}")
            mask = F.merge_masks(mask, key_padding_mask.reshape(b, 1, 1, s))
        if is_causal:
            mask = F.merge_masks(mask, F.causal_mask(t, s, device=device))
        return mask

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                key_padding_mask: Tensor | None = None, need_weights: bool = False,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False, cache: KVCache | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """query (B, T, E), key (B, S, kdim), value (B, S, vdim) -> ((B, T, E), weights).

        key and value default to query (self-attention), value to key. `is_causal`
        adds the causal mask itself (combined with any attn_mask). With a `cache`, the
        keys/values of earlier calls come first (S counts them; key_padding_mask covers
        only the new keys, attn_mask all of them).
        """
        key = query if key is None else key
        value = key if value is None else value
        b, t, s = self._check_inputs(query, key, value)
        h, dh = self.num_heads, self.head_dim
        q = self.q(query).reshape(b, t, h, dh).permute(0, 2, 1, 3)         # (B, h, T, dh)
        if cache is not None and cache.filled:
            k_t, v = cache.k_t, cache.v
        else:
            k_t = self.k(key).reshape(b, s, h, dh).permute(0, 2, 3, 1)     # (B, h, dh, S)
            v = self.v(value).reshape(b, s, h, dh).permute(0, 2, 1, 3)     # (B, h, S, dh)
        if cache is not None:
            if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, s):
                raise ShapeError(f"MultiheadAttention: key_padding_mask must be (batch, new key "
                                 f"length) = ({b}, {s}) with a cache, got "
                                 f"{tuple(key_padding_mask.shape)}")
            k_t, v, key_padding_mask = cache.update(k_t, v, key_padding_mask)
            s = k_t.shape[-1]
        mask = self._mask(attn_mask, key_padding_mask, is_causal, b, t, s, query.device)
        if mask is not None and np.dtype(mask.dtype) == np.dtype(bool):
            mask = ~mask                         # torch's True = blocked -> True = may attend
        out, weights = C.attention(q, k_t, v, mask, None, self.dropout, self.training)
        out = self.o(out.permute(0, 2, 1, 3).reshape(b, t, h * dh))
        if not need_weights:
            return out, None
        return out, (weights.mean(axis=1) if average_attn_weights else weights)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}"


def _check_mask_dtype(name: str, mask: Tensor) -> None:
    kind = np.dtype(mask.dtype).kind
    if kind not in "bf":
        raise DTypeError(f"MultiheadAttention: {name} must be bool (True = masked) or an "
                         f"additive float mask, got {mask.dtype}")
