"""Masked-LM corruption (BERT, Devlin et al. 2019, section 3.1 and appendix A.1).

In every sequence, 15% of the tokens that are not special (padding, <bos>, ...) are
chosen, as in BERT's own data pipeline: exactly round(0.15 * n) of the n eligible
positions (at least one when n > 0), so no batch row is without a target. Of the
chosen positions, independently, 80% become <mask>, 10% a random non-special token
and 10% keep their token; the model must predict the original at every chosen
position (the unchanged and random ones stop it from trusting the input blindly).
Labels hold the original token at chosen positions and `ignore_index` elsewhere, so
`cross_entropy(logits, labels, ignore_index=...)` scores only those.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from engine.validate import validated
from engine.errors import ArgumentError

from .tokenizers import MASK_ID, SPECIAL_TOKENS

__all__ = ["mask_tokens"]


@validated
def mask_tokens(tokens: Any, vocab_size: int, *, rng: np.random.Generator | int | None = None,
                mask_prob: float = 0.15, mask_token_prob: float = 0.8,
                random_token_prob: float = 0.1, mask_id: int = MASK_ID,
                special_ids: Iterable[int] = range(len(SPECIAL_TOKENS)),
                ignore_index: int = -100) -> tuple[np.ndarray, np.ndarray]:
    """tokens (batch, time) integer array -> (inputs, labels), both int64 NumPy arrays.

    `rng` is a NumPy Generator or a seed (the same seed gives the same corruption).
    Random replacements are drawn uniformly from the non-special ids below vocab_size.
    """
    tok = np.asarray(tokens.numpy() if hasattr(tokens, "numpy") else tokens)
    if tok.ndim != 2 or tok.dtype.kind not in "iu":
        raise ArgumentError(f"mask_tokens: expected a (batch, time) integer array, got shape "
                            f"{tok.shape} and dtype {tok.dtype}")
    if mask_token_prob + random_token_prob > 1.0:      # each in [0, 1]: checked by name
        raise ArgumentError(f"mask_tokens: need mask_token_prob + random_token_prob <= 1, got "
                            f"{mask_token_prob} + {random_token_prob}")
    special = np.array(sorted(set(int(s) for s in special_ids)), dtype=np.int64)
    if tok.size and (tok.min() < 0 or tok.max() >= vocab_size):
        raise ArgumentError(f"mask_tokens: token ids must be in [0, {vocab_size}), got "
                         f"[{tok.min()}, {tok.max()}]")
    normal = np.setdiff1d(np.arange(vocab_size), special)
    if normal.size == 0:
        raise ArgumentError(f"mask_tokens: no non-special ids below vocab_size={vocab_size}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    tok = tok.astype(np.int64)
    eligible = ~np.isin(tok, special)
    n = eligible.sum(axis=1)
    k = np.where(n > 0, np.maximum(1, np.rint(mask_prob * n)), 0).astype(np.int64)
    k = np.minimum(k, n) if mask_prob > 0 else np.zeros_like(k)
    # k positions per row uniformly at random: the k smallest random keys among eligible ones
    keys = np.where(eligible, gen.random(tok.shape), np.inf)
    rank = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1, kind="stable")
    chosen = rank < k[:, None]

    action = gen.random(tok.shape)
    to_mask = chosen & (action < mask_token_prob)
    to_random = chosen & (action >= mask_token_prob) & (action < mask_token_prob + random_token_prob)
    inputs = tok.copy()
    inputs[to_mask] = mask_id
    inputs[to_random] = normal[gen.integers(0, normal.size, int(to_random.sum()))]
    labels = np.where(chosen, tok, ignore_index).astype(np.int64)
    return inputs, labels
