"""Masked-LM corruption: the 15% / 80-10-10 statistics, specials untouched, seeding."""
from __future__ import annotations

import numpy as np
import pytest

import engine as eg
from nn.masking import mask_tokens
from nn.tokenizers import BOS_ID, EOS_ID, MASK_ID, PAD_ID

V = 1000


def _batch(rows: int = 400, length: int = 128, seed: int = 0) -> np.ndarray:
    r = np.random.default_rng(seed)
    tok = r.integers(5, V, (rows, length))
    lengths = r.integers(length // 2, length + 1, rows)
    tok[np.arange(length)[None, :] >= lengths[:, None]] = PAD_ID
    tok[:, 0] = BOS_ID
    tok[np.arange(rows), lengths - 1] = EOS_ID
    return tok


def test_fifteen_percent_of_real_tokens_split_80_10_10():
    tok = _batch()
    inputs, labels = mask_tokens(tok, V, rng=0)
    eligible = tok >= 5
    chosen = labels != -100
    n = eligible.sum(1)
    assert (chosen.sum(1) == np.maximum(1, np.rint(0.15 * n))).all()        # exact per row
    assert not (chosen & ~eligible).any()                                   # specials never
    np.testing.assert_array_equal(labels[chosen], tok[chosen])
    np.testing.assert_array_equal(inputs[~chosen], tok[~chosen])            # the rest untouched
    c = inputs[chosen]
    total = chosen.sum()                                                     # ~7000 positions
    masked = (c == MASK_ID).mean()
    kept = (c == tok[chosen]).mean()
    replaced = 1.0 - masked - kept
    sd = np.sqrt(0.1 * 0.9 / total)
    assert abs(masked - 0.8) < 5 * np.sqrt(0.8 * 0.2 / total)
    assert abs(kept - 0.1) < 5 * sd + 1.0 / (V - 5)          # a random draw may hit the original
    assert abs(replaced - 0.1) < 5 * sd
    rand = c[(c != MASK_ID) & (c != tok[chosen])]
    assert rand.min() >= 5 and rand.max() < V                              # no special, in range


def test_random_replacements_are_uniform_over_normal_ids():
    tok = np.full((2000, 200), 7)
    inputs, labels = mask_tokens(tok, 15, rng=1, mask_token_prob=0.0, random_token_prob=1.0)
    draws = inputs[labels != -100]
    counts = np.bincount(draws, minlength=15)
    assert counts[:5].sum() == 0
    expected = draws.size / 10
    chi2 = ((counts[5:] - expected) ** 2 / expected).sum()
    assert chi2 < 30                                      # 9 degrees of freedom: p ~ 4e-4


def test_positions_are_uniform_over_the_sequence():
    tok = np.full((4000, 20), 9)
    _, labels = mask_tokens(tok, 50, rng=2)
    freq = (labels != -100).mean(0)
    assert np.abs(freq - 0.15).max() < 0.02


def test_seeded_and_accepts_tensors_and_generators():
    tok = _batch(20, 32)
    a = mask_tokens(tok, V, rng=5)
    b = mask_tokens(eg.tensor(tok), V, rng=np.random.default_rng(5))
    c = mask_tokens(tok, V, rng=6)
    assert all((x == y).all() for x, y in zip(a, b))
    assert not (a[1] == c[1]).all()
    assert a[0].dtype == np.int64 and a[1].dtype == np.int64


def test_edge_cases_and_errors():
    only_pad = np.zeros((2, 5), dtype=np.int64)
    inputs, labels = mask_tokens(only_pad, V, rng=0)
    assert (labels == -100).all() and (inputs == 0).all()
    one = np.array([[BOS_ID, 42, EOS_ID]])
    _, labels = mask_tokens(one, V, rng=0, ignore_index=-1)
    assert labels.tolist() == [[-1, 42, -1]]                  # at least one target per row
    with pytest.raises(ValueError, match="integer"):
        mask_tokens(np.zeros(4, dtype=np.int64), V)
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        mask_tokens(np.array([[11]]), 10)
    with pytest.raises(ValueError, match="mask_token_prob"):
        mask_tokens(one, V, mask_token_prob=0.95, random_token_prob=0.1)
