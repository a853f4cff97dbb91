"""Transformer layers and stacks (batch-first), as in "Attention Is All You Need".

Post-LN by default, as in the paper: x = LN(x + Sublayer(x)); `norm_first=True`
gives pre-LN: x = x + Sublayer(LN(x)). Names follow torch.nn (self_attn,
multihead_attn, linear1, linear2, norm1..3) so torch weights map by name;
parameters are registered in the order of the benchmark spec (self-attention,
LN1, [cross-attention, LN2,] FFN, last LN).

Decoding with a key/value cache: pass `cache=` (a `DecoderCache`, or a `KVCache` to
a single layer) and feed only the new tokens; see nn.generation.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

from engine import Tensor
from engine.errors import ArgumentError, ShapeError

from . import functional as F
from .attention import KVCache, MultiheadAttention
from .containers import ModuleList
from .layers import Dropout, LayerNorm, Linear
from .module import Module


class TransformerEncoderLayer(Module):
    """Self-attention and a feed-forward network, each with residual and LayerNorm."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Any = "relu", layer_norm_eps: float = 1e-5, batch_first: bool = True,
                 norm_first: bool = False, bias: bool = True, dtype: Any = None,
                 device: str = "cpu") -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout, bias, batch_first=batch_first,
                                            dtype=dtype, device=device)
        self.norm1 = LayerNorm(d_model, layer_norm_eps, bias=bias, dtype=dtype, device=device)
        self.linear1 = Linear(d_model, dim_feedforward, bias, dtype, device)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias, dtype, device)
        self.norm2 = LayerNorm(d_model, layer_norm_eps, bias=bias, dtype=dtype, device=device)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.activation = F.activation_fn(activation)
        self.norm_first = bool(norm_first)

    def _sa(self, x: Tensor, mask: Tensor | None, kpm: Tensor | None, causal: bool,
            cache: KVCache | None = None) -> Tensor:
        return self.dropout1(self.self_attn(x, x, x, key_padding_mask=kpm, attn_mask=mask,
                                            is_causal=causal, cache=cache)[0])

    def _ff(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src: Tensor, src_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None) -> Tensor:
        """src (B, S, d) -> (B, S, d). Masks as in MultiheadAttention; `is_causal` adds
        the causal mask (the decoder-only LM block); `cache` keeps its keys/values."""
        x = src
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal, cache)
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self._sa(x, src_mask, src_key_padding_mask, is_causal, cache))
        return self.norm2(x + self._ff(x))

    def extra_repr(self) -> str:
        return f"norm_first={self.norm_first}"


class TransformerDecoderLayer(Module):
    """Causal self-attention, cross-attention to the encoder output, feed-forward."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Any = "relu", layer_norm_eps: float = 1e-5, batch_first: bool = True,
                 norm_first: bool = False, bias: bool = True, dtype: Any = None,
                 device: str = "cpu") -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout, bias, batch_first=batch_first,
                                            dtype=dtype, device=device)
        self.norm1 = LayerNorm(d_model, layer_norm_eps, bias=bias, dtype=dtype, device=device)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout, bias,
                                                 batch_first=batch_first, dtype=dtype, device=device)
        self.norm2 = LayerNorm(d_model, layer_norm_eps, bias=bias, dtype=dtype, device=device)
        self.linear1 = Linear(d_model, dim_feedforward, bias, dtype, device)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias, dtype, device)
        self.norm3 = LayerNorm(d_model, layer_norm_eps, bias=bias, dtype=dtype, device=device)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)
        self.activation = F.activation_fn(activation)
        self.norm_first = bool(norm_first)

    def _sa(self, x: Tensor, mask: Tensor | None, kpm: Tensor | None, causal: bool,
            cache: KVCache | None = None) -> Tensor:
        return self.dropout1(self.self_attn(x, x, x, key_padding_mask=kpm, attn_mask=mask,
                                            is_causal=causal, cache=cache)[0])

    def _mha(self, x: Tensor, mem: Tensor, mask: Tensor | None, kpm: Tensor | None,
             causal: bool, cache: KVCache | None = None) -> Tensor:
        return self.dropout2(self.multihead_attn(x, mem, mem, key_padding_mask=kpm, attn_mask=mask,
                                                 is_causal=causal, cache=cache)[0])

    def _ff(self, x: Tensor) -> Tensor:
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False, cache: KVCache | None = None,
                memory_cache: KVCache | None = None) -> Tensor:
        """tgt (B, T, d), memory (B, S, d) -> (B, T, d). `tgt_is_causal` adds the causal
        mask to self-attention (or pass it as tgt_mask, as PyTorch requires). `cache`
        keeps the self-attention keys/values, `memory_cache` (static) the memory's."""
        x = tgt
        if memory.ndim != 3 or memory.shape[0] != x.shape[0] or memory.shape[-1] != x.shape[-1]:
            raise ShapeError(f"TransformerDecoderLayer: memory of shape {tuple(memory.shape)} does "
                             f"not fit tgt of shape {tuple(x.shape)} (expected (B, S, d) with the "
                             f"same B and d)")
        if self.norm_first:
            x = x + self._sa(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal, cache)
            x = x + self._mha(self.norm2(x), memory, memory_mask, memory_key_padding_mask,
                              memory_is_causal, memory_cache)
            return x + self._ff(self.norm3(x))
        x = self.norm1(x + self._sa(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal, cache))
        x = self.norm2(x + self._mha(x, memory, memory_mask, memory_key_padding_mask,
                                     memory_is_causal, memory_cache))
        return self.norm3(x + self._ff(x))

    def extra_repr(self) -> str:
        return f"norm_first={self.norm_first}"


def _layer_list(owner: str, layer: Module | Sequence[Module], num_layers: int | None) -> ModuleList:
    """Copies of one layer (PyTorch's semantics: identical initial weights), or the
    given layers as they are (independent initialisations)."""
    if isinstance(layer, Module):
        if num_layers is None or num_layers < 0:
            raise ArgumentError(f"{owner}: give num_layers >= 0 with a single layer to copy")
        return ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
    layers = list(layer)
    if num_layers is not None and num_layers != len(layers):
        raise ArgumentError(f"{owner}: num_layers={num_layers} but {len(layers)} layers were given")
    return ModuleList(layers)


class DecoderCache:
    """Key/value caches of a decoder stack while generating, one `KVCache` per layer for
    self-attention and (encoder-decoder) a static one per layer for cross-attention.

    `length` counts the positions fed so far: the models use it as the positional
    offset of the next tokens and advance it after each call.
    """

    def __init__(self, num_layers: int, cross_attention: bool = False) -> None:
        self.self_attn = [KVCache() for _ in range(num_layers)]
        self.cross_attn = [KVCache(static=True) for _ in range(num_layers)] if cross_attention \
            else None
        self.length = 0

    def layer(self, i: int) -> tuple[KVCache, KVCache | None]:
        return self.self_attn[i], None if self.cross_attn is None else self.cross_attn[i]

    def reorder(self, index: Any) -> None:
        """Keep (and repeat) batch rows `index` in every layer (beam search)."""
        for c in self.self_attn + (self.cross_attn or []):
            c.reorder(index)

    def check(self, owner: str, num_layers: int) -> None:
        if len(self.self_attn) != num_layers:
            raise ArgumentError(f"{owner}: the cache was made for {len(self.self_attn)} layers, "
                                f"the model has {num_layers}")


class TransformerEncoder(Module):
    """A stack of encoder layers and an optional final LayerNorm (needed with pre-LN)."""

    def __init__(self, encoder_layer: Module | Sequence[Module], num_layers: int | None = None,
                 norm: Module | None = None) -> None:
        super().__init__()
        self.layers = _layer_list("TransformerEncoder", encoder_layer, num_layers)
        self.norm = norm

    def forward(self, src: Tensor, mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        x = src
        for layer in self.layers:
            x = layer(x, mask, src_key_padding_mask, is_causal)
        return x if self.norm is None else self.norm(x)


class TransformerDecoder(Module):
    """A stack of decoder layers and an optional final LayerNorm."""

    def __init__(self, decoder_layer: Module | Sequence[Module], num_layers: int | None = None,
                 norm: Module | None = None) -> None:
        super().__init__()
        self.layers = _layer_list("TransformerDecoder", decoder_layer, num_layers)
        self.norm = norm

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False, cache: DecoderCache | None = None) -> Tensor:
        """As TransformerDecoderLayer, through every layer; `cache` holds each layer's
        keys/values (feed only the new target positions; their causal mask is aligned
        to the last keys)."""
        x = tgt
        if cache is not None:
            cache.check("TransformerDecoder", len(self.layers))
        for i, layer in enumerate(self.layers):
            sc, mc = (None, None) if cache is None else cache.layer(i)
            x = layer(x, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                      memory_key_padding_mask, tgt_is_causal, memory_is_causal, sc, mc)
        return x if self.norm is None else self.norm(x)


class Transformer(Module):
    """The encoder-decoder of the paper, on embedded inputs (B, S, d) and (B, T, d).

    Each layer is initialised independently. `final_norm` (a LayerNorm after each
    stack) defaults to `norm_first`: pre-LN needs it, the paper's post-LN has none.
    (torch.nn.Transformer always adds both final norms: pass final_norm=True to match.)
    """

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Any = "relu", layer_norm_eps: float = 1e-5, batch_first: bool = True,
                 norm_first: bool = False, final_norm: bool | None = None, bias: bool = True,
                 dtype: Any = None, device: str = "cpu") -> None:
        super().__init__()
        final_norm = norm_first if final_norm is None else final_norm
        kw = dict(dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
                  layer_norm_eps=layer_norm_eps, batch_first=batch_first, norm_first=norm_first,
                  bias=bias, dtype=dtype, device=device)

        def norm() -> LayerNorm | None:
            return LayerNorm(d_model, layer_norm_eps, bias=bias, dtype=dtype, device=device) \
                if final_norm else None

        self.encoder = TransformerEncoder(
            [TransformerEncoderLayer(d_model, nhead, **kw) for _ in range(num_encoder_layers)],
            norm=norm())
        self.decoder = TransformerDecoder(
            [TransformerDecoderLayer(d_model, nhead, **kw) for _ in range(num_decoder_layers)],
            norm=norm())
        self.d_model, self.nhead = d_model, nhead

    def encode(self, src: Tensor, src_mask: Tensor | None = None,
               src_key_padding_mask: Tensor | None = None) -> Tensor:
        return self.encoder(src, src_mask, src_key_padding_mask)

    def decode(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
               memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
               memory_key_padding_mask: Tensor | None = None, tgt_is_causal: bool = False,
               cache: DecoderCache | None = None) -> Tensor:
        return self.decoder(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                            memory_key_padding_mask, tgt_is_causal, cache=cache)

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Tensor | None = None,
                tgt_mask: Tensor | None = None, memory_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None,
                tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None,
                tgt_is_causal: bool = False) -> Tensor:
        """As torch.nn.Transformer.forward (batch-first). The decoder is causal only if
        you pass tgt_mask (e.g. nn.causal_mask(T)) or tgt_is_causal=True."""
        if src.ndim != 3 or tgt.ndim != 3 or src.shape[0] != tgt.shape[0] \
                or src.shape[-1] != self.d_model or tgt.shape[-1] != self.d_model:
            raise ShapeError(f"Transformer: src and tgt must be (B, S, {self.d_model}) and "
                             f"(B, T, {self.d_model}) with the same B, got {tuple(src.shape)} and "
                             f"{tuple(tgt.shape)}")
        memory = self.encode(src, src_mask, src_key_padding_mask)
        return self.decode(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                           memory_key_padding_mask, tgt_is_causal)
