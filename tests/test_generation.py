"""Decoding strategies and the key/value cache (nn.generation, nn.attention.KVCache)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engine as eg
from engine import nn
from nn.generation import (beam_search, generate, greedy, log_softmax_np, sample, sample_logits,
                           top_k_filter, top_p_filter)

V, PAD, BOS, EOS = 7, 0, 1, 2


def _lm(seed: int = 0, vocab: int = V, pad_idx: int | None = None, **kw: object) -> nn.CausalLM:
    eg.manual_seed(seed)
    cfg = dict(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, dropout=0.0, max_len=64)
    cfg.update(kw)
    return nn.CausalLM(vocab, pad_idx=pad_idx, **cfg).eval()


def _s2s(seed: int = 0, vocab: int = V, pad_idx: int | None = PAD,
         **kw: object) -> nn.Seq2SeqTransformer:
    eg.manual_seed(seed)
    cfg = dict(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
               dim_feedforward=64, dropout=0.0, max_len=64)
    cfg.update(kw)
    return nn.Seq2SeqTransformer(vocab, pad_idx=pad_idx, **cfg).eval()


def _src(rng: np.random.Generator, b: int = 3, s: int = 6) -> np.ndarray:
    src = rng.integers(3, V, (b, s))
    src[1, 4:] = PAD                     # a padded row: the memory mask must follow it
    return src


# -- logits filters -------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_top_k_keeps_the_k_largest(k: int, seed: int) -> None:
    logits = np.random.default_rng(seed).standard_normal((4, 10))
    out = top_k_filter(logits, k)
    for row, orow in zip(logits, out):
        kept = set(np.flatnonzero(np.isfinite(orow)))
        assert kept == set(np.argsort(-row)[:min(k, 10)])
        np.testing.assert_array_equal(orow[list(kept)], row[list(kept)])


def test_top_k_keeps_ties_with_the_kth() -> None:
    out = top_k_filter(np.array([[1.0, 3.0, 2.0, 2.0, 0.0]]), 2)
    np.testing.assert_array_equal(np.isfinite(out[0]), [False, True, True, True, False])


@settings(max_examples=60, deadline=None)
@given(st.floats(0.01, 0.99), st.integers(0, 2**31 - 1))
def test_top_p_keeps_the_smallest_nucleus(p: float, seed: int) -> None:
    logits = np.random.default_rng(seed).standard_normal((3, 9)) * 2
    out = top_p_filter(logits, p)
    probs = np.exp(log_softmax_np(logits))
    for row_p, orow in zip(probs, out):
        kept = np.flatnonzero(np.isfinite(orow))
        by_prob = np.argsort(-row_p)
        # the kept set is a prefix of the tokens sorted by probability ...
        assert set(kept) == set(by_prob[:len(kept)])
        # ... that reaches p, and is minimal: without its least likely token it would not
        assert row_p[kept].sum() >= p - 1e-12
        assert row_p[by_prob[:len(kept) - 1]].sum() < p


def test_top_p_one_and_tiny_p() -> None:
    x = np.array([[0.5, 2.0, -1.0]])
    np.testing.assert_array_equal(top_p_filter(x, 1.0), x)
    assert np.isfinite(top_p_filter(x, 1e-9)).tolist() == [[False, True, False]]
    with pytest.raises(ValueError):
        top_p_filter(x, 0.0)
    with pytest.raises(ValueError):
        top_k_filter(x, 0)


def test_sampling_follows_the_filtered_distribution() -> None:
    logits = np.log(np.array([0.05, 0.4, 0.3, 0.15, 0.1]))
    rows = np.tile(logits, (40000, 1))
    rng = np.random.default_rng(0)
    draws = sample_logits(rows, top_k=3, rng=rng)
    freq = np.bincount(draws, minlength=5) / len(draws)
    want = np.array([0, 0.4, 0.3, 0.15, 0]) / 0.85
    assert freq[0] == 0 and freq[4] == 0
    np.testing.assert_allclose(freq, want, atol=0.01)
    draws = sample_logits(rows, top_p=0.65, rng=rng)        # nucleus {1, 2}
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, [0, 0.4 / 0.7, 0.3 / 0.7, 0, 0], atol=0.01)
    draws = sample_logits(rows, temperature=0.25, rng=rng)  # p^4, renormalised
    sharp = np.exp(logits * 4) / np.exp(logits * 4).sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=5) / len(draws), sharp, atol=0.01)


# -- the key/value cache -------------------------------------------------------------------------

def test_cached_logits_equal_full_forward_both_models() -> None:
    rng = np.random.default_rng(1)
    toks = rng.integers(0, V, (3, 9))
    toks[0, 3] = PAD                                   # a pad token among the keys
    lm = _lm(pad_idx=PAD)
    full = lm(eg.tensor(toks)).numpy()
    cache = lm.new_cache()
    parts = [lm(eg.tensor(toks[:, :4]), cache=cache).numpy()]
    parts += [lm(eg.tensor(toks[:, i:i + 1]), cache=cache).numpy() for i in range(4, 9)]
    assert cache.length == 9 and len(cache.self_attn[0]) == 9
    np.testing.assert_allclose(np.concatenate(parts, 1), full, atol=2e-5)

    s2s = _s2s()
    src = eg.tensor(_src(rng))
    mem, kpm = s2s.encode(src), src == PAD
    full = s2s.decode(eg.tensor(toks), mem, kpm).numpy()
    cache = s2s.new_cache()
    parts = [s2s.decode(eg.tensor(toks[:, i:i + 1]), mem, kpm, cache=cache).numpy()
             for i in range(9)]
    assert len(cache.cross_attn[0]) == 6            # the memory's K/V, projected once
    np.testing.assert_allclose(np.concatenate(parts, 1), full, atol=2e-5)


def test_cache_rejects_a_contradicting_offset_and_wrong_batch() -> None:
    lm = _lm()
    cache = lm.new_cache()
    lm(eg.tensor(np.ones((2, 3), np.int64)), cache=cache)
    with pytest.raises(ValueError, match="offset"):
        lm(eg.tensor(np.ones((2, 1), np.int64)), offset=7, cache=cache)
    with pytest.raises(eg.ShapeError, match="batch"):
        lm(eg.tensor(np.ones((3, 1), np.int64)), cache=cache)


@pytest.mark.parametrize("kind", ["lm", "s2s"])
def test_cached_generation_equals_recomputation(kind: str) -> None:
    rng = np.random.default_rng(2)
    if kind == "lm":
        model, inputs, kw = _lm(seed=3), rng.integers(3, V, (4, 5)), {}
    else:
        model, inputs, kw = _s2s(seed=3), _src(rng, b=4), {"bos": BOS}
    for eos in (None, EOS):
        a = greedy(model, inputs, 20, eos=eos, use_cache=True, **kw)
        b = greedy(model, inputs, 20, eos=eos, use_cache=False, **kw)
        assert a == b
        for seed in (0, 1):
            eg.manual_seed(seed)
            a = sample(model, inputs, 20, eos=eos, temperature=1.3, use_cache=True, **kw)
            eg.manual_seed(seed)
            b = sample(model, inputs, 20, eos=eos, temperature=1.3, use_cache=False, **kw)
            assert a == b
            c = sample(model, inputs, 20, eos=eos, top_k=4, top_p=0.9, use_cache=True,
                       rng=np.random.default_rng(seed), **kw)
            d = sample(model, inputs, 20, eos=eos, top_k=4, top_p=0.9, use_cache=False,
                       rng=np.random.default_rng(seed), **kw)
            assert c == d
        a = beam_search(model, inputs, 12, num_beams=3, eos=eos, use_cache=True, **kw)
        b = beam_search(model, inputs, 12, num_beams=3, eos=eos, use_cache=False, **kw)
        assert [[h.tokens for h in r] for r in a] == [[h.tokens for h in r] for r in b]


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    model, prompt = _lm(seed=4), np.array([[3, 4, 5]])
    runs = []
    for seed in (0, 0, 1):
        eg.manual_seed(seed)
        runs.append(sample(model, prompt, 30)[0])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    a = sample(model, prompt, 30, rng=np.random.default_rng(5))
    assert a == sample(model, prompt, 30, rng=np.random.default_rng(5))


# -- stopping ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lm", "s2s"])
def test_greedy_stops_at_eos_per_row_and_at_max_length(kind: str) -> None:
    rng = np.random.default_rng(6)
    if kind == "lm":
        model, inputs, kw = _lm(seed=7, vocab=20), rng.integers(3, 20, (4, 3)), {}
    else:
        model, inputs, kw = _s2s(seed=7, vocab=20), _src(rng, b=4), {"bos": BOS}
    free = greedy(model, inputs, 15, **kw)
    assert all(len(r) == 15 for r in free)
    # pick as eos a token that some rows produce and others (maybe) later or never
    eos = free[0][3]
    stopped = greedy(model, inputs, 15, eos=eos, **kw)
    for row_free, row in zip(free, stopped):
        cut = row_free.index(eos) + 1 if eos in row_free else 15
        assert row == row_free[:cut]
    assert stopped[0][-1] == eos and len(stopped[0]) <= 4


def test_generation_checks_lengths_and_restores_training_mode() -> None:
    model = _lm(max_len=10)
    with pytest.raises(ValueError, match="max_len=10"):
        greedy(model, [[3, 4, 5]], 9)
    assert len(greedy(model, [[3, 4, 5]], 8)[0]) == 8        # 3 + 8 - 1 = 10 positions
    with pytest.raises(ValueError, match="bos"):
        greedy(_s2s(), [[3, 4]], 3)
    model.train()
    greedy(model, [3, 4, 5], 3)
    assert model.training


# -- beam search -------------------------------------------------------------------------------

def _sequence_logprob(model: nn.Module, inputs: np.ndarray, seq: list[int]) -> float:
    """log p(seq | input) by one teacher-forced forward pass."""
    if isinstance(model, nn.Seq2SeqTransformer):
        src = eg.tensor(inputs[None])
        tgt = eg.tensor(np.array([[BOS] + seq[:-1]]))
        logits = model.decode(tgt, model.encode(src), src == PAD).numpy()[0]
    else:
        x = np.concatenate([inputs, np.array(seq[:-1], dtype=np.int64)])[None]
        logits = model(eg.tensor(x)).numpy()[0, len(inputs) - 1:]
    lp = log_softmax_np(logits)
    return float(sum(lp[i, t] for i, t in enumerate(seq)))


def _exhaustive(model: nn.Module, inputs: np.ndarray, vocab: int, eos: int, max_new: int,
                alpha: float) -> list[tuple[float, list[int]]]:
    others = [t for t in range(vocab) if t != eos]
    hyps = [list(p) + [eos] for n in range(max_new) for p in itertools.product(others, repeat=n)]
    hyps += [list(p) for p in itertools.product(others, repeat=max_new)]
    with eg.no_grad():
        scored = [(_sequence_logprob(model, inputs, h) / len(h) ** alpha, h) for h in hyps]
    return sorted(scored, key=lambda x: -x[0])


@pytest.mark.parametrize("kind,alpha", [("lm", 0.0), ("lm", 1.0), ("s2s", 0.6), ("s2s", 1.0)])
def test_beam_search_with_full_width_equals_exhaustive_search(kind: str, alpha: float) -> None:
    vocab, eos, max_new = 5, 4, 3
    rng = np.random.default_rng(8)
    if kind == "lm":
        model, inputs, kw = _lm(seed=9, vocab=vocab, d_model=16), rng.integers(0, vocab, 3), {}
    else:
        model = _s2s(seed=9, vocab=vocab, d_model=16)
        inputs, kw = rng.integers(2, vocab, 4), {"bos": BOS}
    best = _exhaustive(model, inputs, vocab, eos, max_new, alpha)
    hyps = beam_search(model, inputs, max_new, num_beams=(vocab - 1) ** max_new,
                       length_penalty=alpha, num_return=5, eos=eos, **kw)[0]
    assert [h.tokens for h in hyps] == [h for _, h in best[:5]]
    np.testing.assert_allclose([h.score for h in hyps], [s for s, _ in best[:5]], atol=1e-5)
    for h in hyps:
        assert h.score == pytest.approx(h.logprob / len(h.tokens) ** alpha)
    # a narrow beam can only do as well as the exhaustive optimum
    narrow = beam_search(model, inputs, max_new, num_beams=2, length_penalty=alpha, eos=eos, **kw)
    assert narrow[0][0].score <= best[0][0] + 1e-6


def test_beam_search_is_batch_consistent_and_width_one_without_eos_is_greedy() -> None:
    rng = np.random.default_rng(10)
    model, src = _s2s(seed=11), _src(rng, b=3)
    batched = beam_search(model, src, 8, num_beams=3, num_return=3, bos=BOS, eos=EOS)
    for i in range(3):
        single = beam_search(model, src[i:i + 1][:, src[i] != PAD], 8, num_beams=3,
                             num_return=3, bos=BOS, eos=EOS)[0]
        assert [h.tokens for h in single] == [h.tokens for h in batched[i]]
        np.testing.assert_allclose([h.score for h in single], [h.score for h in batched[i]],
                                   atol=1e-5)
    one = beam_search(model, src, 8, num_beams=1, bos=BOS)
    assert [h[0].tokens for h in one] == greedy(model, src, 8, bos=BOS)
    assert generate(model, src, 8, bos=BOS, eos=EOS, num_beams=3) == \
        [h[0].tokens for h in batched]
    with pytest.raises(ValueError):
        generate(model, src, 8, bos=BOS, num_beams=2, do_sample=True)


def test_kv_cache_benchmark_runs_and_agrees() -> None:
    from benchmarks import kv_cache
    rows = kv_cache.main(["--new-tokens", "3", "--batch", "2", "--models", "base"])
    assert len(rows) == 1 and rows[0]["same_tokens"] and rows[0]["cached_s"] > 0
