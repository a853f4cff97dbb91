"""Token-level models: encoder-decoder, decoder-only causal LM, encoder-only masked LM.

All three share `TransformerEmbedding` (token table, optional sqrt(d) scaling,
sinusoidal or learned positions, optional LayerNorm) and can tie the output
projection to the token table (logits = h @ E^T). The benchmark models of
benchmarks/model_spec.md are, with dropout=0:
- enc-dec: Seq2SeqTransformer(V, d_model=d, nhead=h, num_encoder_layers=n,
  num_decoder_layers=n, dim_feedforward=f, dropout=0.0) (shared, scaled, tied
  embedding, sinusoidal positions, post-LN, no final LayerNorm: the defaults);
- LM: CausalLM(V, d_model=d, nhead=h, num_layers=n, dim_feedforward=f, dropout=0.0).
GPT-2 style: CausalLM(..., positional="learned", scale_embedding=False,
norm_first=True, activation="gelu") (a final LayerNorm comes with norm_first).

For generation, `new_cache()` gives a DecoderCache; pass it as `cache=` and feed only
the tokens not fed before (positions continue from `cache.length`).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

import engine as eg
from engine import Tensor
from engine.errors import ArgumentError, DTypeError, ShapeError

from .containers import ModuleList
from .functional import activation_fn
from .layers import Dropout, Embedding, LayerNorm, Linear
from .module import Module
from .parameter import Parameter
from .positional import LearnedPositionalEmbedding, PositionalEncoding
from .transformer import DecoderCache, Transformer, TransformerEncoder, TransformerEncoderLayer

_POSITIONAL = ("sinusoidal", "learned", "none")


class TransformerEmbedding(Module):
    """tokens -> dropout(norm(E[tokens] * scale + P[positions])).

    `scale=True` multiplies by sqrt(d_model) (the paper); a float gives that factor;
    False gives 1. `positional` is "sinusoidal", "learned" or "none". The token
    table is initialised N(0, init_std^2), by default init_std = d_model**-0.5
    (so that a scaled embedding has unit variance, and a tied output layer starts
    with small logits).
    """

    def __init__(self, vocab_size: int, d_model: int, max_len: int = 512,
                 positional: str = "sinusoidal", scale: bool | float = True, dropout: float = 0.0,
                 padding_idx: int | None = None, init_std: float | None = None, norm: bool = False,
                 layer_norm_eps: float = 1e-5, dtype: Any = None, device: str = "cpu") -> None:
        super().__init__()
        if positional not in _POSITIONAL:
            raise ArgumentError(f"TransformerEmbedding: positional must be one of {_POSITIONAL}, "
                                f"got {positional!r}")
        std = d_model ** -0.5 if init_std is None else init_std
        self.token = Embedding(vocab_size, d_model, padding_idx, std, dtype, device)
        if positional == "learned":
            self.pos = LearnedPositionalEmbedding(max_len, d_model, dtype=dtype, device=device)
        elif positional == "sinusoidal":
            self.pos = PositionalEncoding(d_model, max_len, dtype=dtype, device=device)
        else:
            self.pos = None
        self.norm = LayerNorm(d_model, layer_norm_eps, dtype=dtype, device=device) if norm else None
        self.dropout = Dropout(dropout)
        self.scale = math.sqrt(d_model) if scale is True else (1.0 if scale is False else float(scale))
        self.d_model, self.vocab_size = d_model, vocab_size

    @property
    def weight(self) -> Parameter:
        """The token table (V, d), which tied output layers multiply by."""
        return self.token.weight

    def forward(self, tokens: Tensor, offset: int = 0) -> Tensor:
        if tokens.ndim != 2:
            raise ShapeError(f"TransformerEmbedding: tokens must be (batch, time), got shape "
                             f"{tuple(tokens.shape)}")
        x = self.token(tokens)
        if self.scale != 1.0:
            x = x * self.scale
        if self.pos is not None:
            x = self.pos(x, offset)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}"


def _pad_mask(tokens: Tensor, pad_idx: int | None, given: Tensor | None) -> Tensor | None:
    if given is not None:
        return given
    return None if pad_idx is None else tokens == pad_idx


def _tied_logits(h: Tensor, table: Tensor) -> Tensor:
    return h @ table.T


def _cache_offset(model: str, cache: DecoderCache | None, offset: int) -> int:
    """With a cache the new tokens continue where the cache stops."""
    if cache is None:
        return offset
    if offset not in (0, cache.length):
        raise ArgumentError(f"{model}: offset={offset} contradicts the cache, which holds "
                            f"{cache.length} positions (leave offset at 0 with a cache)")
    return cache.length


def _check_tokens(model: str, tokens: Tensor, name: str) -> None:
    if np.dtype(tokens.dtype).kind not in "iu":
        raise DTypeError(f"{model}: {name} must be integer token ids, got {tokens.dtype}")
    if tokens.ndim != 2:
        raise ShapeError(f"{model}: {name} must be (batch, time), got shape {tuple(tokens.shape)}")


class Seq2SeqTransformer(Module):
    """Token-level encoder-decoder: logits = decoder(tgt, encoder(src)) @ E^T.

    Defaults follow the paper and the benchmark spec: one embedding shared by source,
    target and output (`share_embeddings`, `tie_output`), scaled by sqrt(d_model),
    sinusoidal positions, post-LN, no final LayerNorm. With `pad_idx`, padding masks
    are built from the tokens (source padding is masked in encoder self-attention and
    in cross-attention; target padding in decoder self-attention).
    """

    def __init__(self, src_vocab: int, tgt_vocab: int | None = None, d_model: int = 512,
                 nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, activation: Any = "relu",
                 max_len: int = 512, positional: str = "sinusoidal",
                 scale_embedding: bool | float = True, share_embeddings: bool = True,
                 tie_output: bool = True, norm_first: bool = False,
                 final_norm: bool | None = None, pad_idx: int | None = None,
                 layer_norm_eps: float = 1e-5, emb_init_std: float | None = None,
                 dtype: Any = None, device: str = "cpu") -> None:
        super().__init__()
        tgt_vocab = src_vocab if tgt_vocab is None else tgt_vocab
        if share_embeddings and src_vocab != tgt_vocab:
            raise ArgumentError(f"Seq2SeqTransformer: share_embeddings needs src_vocab == tgt_vocab, "
                                f"got {src_vocab} and {tgt_vocab}")

        def embedding(vocab: int) -> TransformerEmbedding:
            return TransformerEmbedding(vocab, d_model, max_len, positional, scale_embedding,
                                        dropout, pad_idx, emb_init_std, False, layer_norm_eps,
                                        dtype, device)

        self.src_embed = embedding(src_vocab)
        self.tgt_embed = self.src_embed if share_embeddings else embedding(tgt_vocab)
        self.transformer = Transformer(d_model, nhead, num_encoder_layers, num_decoder_layers,
                                       dim_feedforward, dropout, activation, layer_norm_eps,
                                       norm_first=norm_first, final_norm=final_norm, dtype=dtype,
                                       device=device)
        self.generator = None if tie_output else Linear(d_model, tgt_vocab, True, dtype, device)
        self.pad_idx = pad_idx
        self.src_vocab, self.tgt_vocab, self.d_model = src_vocab, tgt_vocab, d_model

    def encode(self, src: Tensor, src_key_padding_mask: Tensor | None = None) -> Tensor:
        """src tokens (B, S) -> memory (B, S, d)."""
        _check_tokens("Seq2SeqTransformer", src, "src")
        kpm = _pad_mask(src, self.pad_idx, src_key_padding_mask)
        return self.transformer.encode(self.src_embed(src), src_key_padding_mask=kpm)

    def new_cache(self) -> DecoderCache:
        """An empty key/value cache for `decode(..., cache=)` (self- and cross-attention)."""
        return DecoderCache(len(self.transformer.decoder.layers), cross_attention=True)

    def decode(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor | None = None,
               tgt_key_padding_mask: Tensor | None = None, offset: int = 0,
               cache: DecoderCache | None = None) -> Tensor:
        """tgt tokens (B, T) and memory -> logits (B, T, tgt_vocab), causal in tgt.
        Pass the source padding mask as memory_key_padding_mask (see `encode`). With a
        `cache`, tgt holds only the positions after those already fed."""
        _check_tokens("Seq2SeqTransformer", tgt, "tgt")
        offset = _cache_offset("Seq2SeqTransformer", cache, offset)
        kpm = _pad_mask(tgt, self.pad_idx, tgt_key_padding_mask)
        h = self.transformer.decode(self.tgt_embed(tgt, offset), memory,
                                    tgt_key_padding_mask=kpm,
                                    memory_key_padding_mask=memory_key_padding_mask,
                                    tgt_is_causal=True, cache=cache)
        if cache is not None:
            cache.length += tgt.shape[1]
        return self.generator(h) if self.generator is not None else _tied_logits(h, self.tgt_embed.weight)

    def forward(self, src: Tensor, tgt: Tensor, src_key_padding_mask: Tensor | None = None,
                tgt_key_padding_mask: Tensor | None = None) -> Tensor:
        """(src (B, S), tgt_in (B, T)) -> logits (B, T, tgt_vocab)."""
        _check_tokens("Seq2SeqTransformer", src, "src")
        src_kpm = _pad_mask(src, self.pad_idx, src_key_padding_mask)
        memory = self.encode(src, src_kpm)
        return self.decode(tgt, memory, src_kpm, tgt_key_padding_mask)


class CausalLM(Module):
    """Decoder-only language model (GPT-style): causal encoder layers over token embeddings,
    then logits = h @ E^T (`tie_weights`) or a separate bias-free `lm_head`.

    Defaults match the benchmark spec's LM (post-LN, scaled shared embedding,
    sinusoidal positions, no final LayerNorm); see the module docstring for GPT-2 style.
    """

    def __init__(self, vocab_size: int, d_model: int = 512, nhead: int = 8, num_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, activation: Any = "relu",
                 max_len: int = 1024, positional: str = "sinusoidal",
                 scale_embedding: bool | float = True, tie_weights: bool = True,
                 norm_first: bool = False, final_norm: bool | None = None,
                 pad_idx: int | None = None, layer_norm_eps: float = 1e-5,
                 emb_init_std: float | None = None, dtype: Any = None, device: str = "cpu") -> None:
        super().__init__()
        self.embed = TransformerEmbedding(vocab_size, d_model, max_len, positional, scale_embedding,
                                          dropout, pad_idx, emb_init_std, False, layer_norm_eps,
                                          dtype, device)
        self.layers = ModuleList(
            TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                    layer_norm_eps, norm_first=norm_first, dtype=dtype, device=device)
            for _ in range(num_layers))
        final_norm = norm_first if final_norm is None else final_norm
        self.norm = LayerNorm(d_model, layer_norm_eps, dtype=dtype, device=device) if final_norm else None
        self.lm_head = None if tie_weights else Linear(d_model, vocab_size, False, dtype, device)
        self.pad_idx, self.vocab_size, self.d_model = pad_idx, vocab_size, d_model
        self.max_len = max_len

    def new_cache(self) -> DecoderCache:
        """An empty key/value cache for `forward(..., cache=)`."""
        return DecoderCache(len(self.layers))

    def hidden(self, tokens: Tensor, key_padding_mask: Tensor | None = None,
               offset: int = 0, cache: DecoderCache | None = None) -> Tensor:
        """tokens (B, T) -> final hidden states (B, T, d). With a `cache`, tokens are
        only the positions after those already fed."""
        _check_tokens("CausalLM", tokens, "tokens")
        offset = _cache_offset("CausalLM", cache, offset)
        if cache is not None:
            cache.check("CausalLM", len(self.layers))
        kpm = _pad_mask(tokens, self.pad_idx, key_padding_mask)
        x = self.embed(tokens, offset)
        for i, layer in enumerate(self.layers):
            x = layer(x, src_key_padding_mask=kpm, is_causal=True,
                      cache=None if cache is None else cache.self_attn[i])
        if cache is not None:
            cache.length += tokens.shape[1]
        return x if self.norm is None else self.norm(x)

    def forward(self, tokens: Tensor, key_padding_mask: Tensor | None = None,
                offset: int = 0, cache: DecoderCache | None = None) -> Tensor:
        """tokens (B, T) -> next-token logits (B, T, V)."""
        h = self.hidden(tokens, key_padding_mask, offset, cache)
        return self.lm_head(h) if self.lm_head is not None else _tied_logits(h, self.embed.weight)


class MaskedLMHead(Module):
    """BERT's prediction transform: LayerNorm(act(dense(h)))."""

    def __init__(self, d_model: int, activation: Any = "gelu", layer_norm_eps: float = 1e-5,
                 dtype: Any = None, device: str = "cpu") -> None:
        super().__init__()
        self.dense = Linear(d_model, d_model, True, dtype, device)
        self.norm = LayerNorm(d_model, layer_norm_eps, dtype=dtype, device=device)
        self.activation = activation_fn(activation)

    def forward(self, h: Tensor) -> Tensor:
        return self.norm(self.activation(self.dense(h)))


class MaskedLM(Module):
    """Encoder-only masked language model (BERT-style): embeddings (token + learned
    positions, LayerNorm), bidirectional encoder layers, the MLM head, and logits =
    head(h) @ E^T + output_bias (tied) or a separate `decoder` Linear.
    """

    def __init__(self, vocab_size: int, d_model: int = 256, nhead: int = 4, num_layers: int = 4,
                 dim_feedforward: int = 1024, dropout: float = 0.1, activation: Any = "gelu",
                 max_len: int = 512, positional: str = "learned",
                 scale_embedding: bool | float = False, embedding_norm: bool = True,
                 norm_first: bool = False, final_norm: bool | None = None,
                 tie_weights: bool = True, pad_idx: int | None = None,
                 layer_norm_eps: float = 1e-5, emb_init_std: float | None = None,
                 dtype: Any = None, device: str = "cpu") -> None:
        super().__init__()
        self.embed = TransformerEmbedding(vocab_size, d_model, max_len, positional, scale_embedding,
                                          dropout, pad_idx, emb_init_std, embedding_norm,
                                          layer_norm_eps, dtype, device)
        final_norm = norm_first if final_norm is None else final_norm
        self.encoder = TransformerEncoder(
            [TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                     layer_norm_eps, norm_first=norm_first, dtype=dtype,
                                     device=device) for _ in range(num_layers)],
            norm=LayerNorm(d_model, layer_norm_eps, dtype=dtype, device=device) if final_norm else None)
        self.head = MaskedLMHead(d_model, activation, layer_norm_eps, dtype, device)
        if tie_weights:
            self.decoder = None
            self.output_bias = Parameter(eg.zeros(vocab_size, dtype=dtype or eg.float32, device=device))
        else:
            self.decoder = Linear(d_model, vocab_size, True, dtype, device)
        self.pad_idx, self.vocab_size, self.d_model = pad_idx, vocab_size, d_model

    def hidden(self, tokens: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """tokens (B, T) -> contextual states (B, T, d), attending in both directions."""
        _check_tokens("MaskedLM", tokens, "tokens")
        kpm = _pad_mask(tokens, self.pad_idx, key_padding_mask)
        return self.encoder(self.embed(tokens), src_key_padding_mask=kpm)

    def forward(self, tokens: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """tokens (B, T) -> logits (B, T, V) at every position (the loss picks the masked
        ones, e.g. cross_entropy with ignore_index on the others)."""
        h = self.head(self.hidden(tokens, key_padding_mask))
        if self.decoder is not None:
            return self.decoder(h)
        return _tied_logits(h, self.embed.weight) + self.output_bias
