"""Decoding: greedy, temperature / top-k / top-p sampling, and beam search, for the
encoder-decoder (`Seq2SeqTransformer`) and the decoder-only model (`CausalLM`).

    out = generate(model, src, 20, bos=1, eos=2)                           # greedy
    out = generate(lm, prompt, 50, do_sample=True, top_p=0.9, rng=np.random.default_rng(0))
    hyps = beam_search(model, src, 20, bos=1, eos=2, num_beams=4)         # scored hypotheses

Why it looks like this:
- The model runs on its device; the choice of the next token happens on the host in
  float64 NumPy (one (batch, vocab) row per step), so every strategy shares one code
  path and the tie-breaking rules below are exact.
- By default each step feeds only the new token and reuses the keys/values of earlier
  positions (`model.new_cache()`, nn.attention.KVCache); `use_cache=False` recomputes
  the whole prefix every step, which is the reference the cache is tested against.
- Sampling draws one uniform number per sequence and step, from the engine's generator
  (seeded by `eg.manual_seed`) or from an explicit `numpy.random.Generator`, and picks
  the token by inverse CDF: the same seed gives the same tokens, cached or not.
- Ties: greedy takes the lowest token id among equal maxima; top-k keeps every logit
  equal to the k-th largest; beam search ranks equal scores by beam rank, then token id.

Inputs are token ids (B, T) or (T,) as a list, NumPy array or Tensor. For the
encoder-decoder they are the source (padded with the model's pad_idx, or give
`src_key_padding_mask`) and decoding starts from `bos`; for the decoder-only model
they are the prompt (all rows the same length), with `bos` prepended when given.
Results are Python lists of the new tokens per row, ending with `eos` when it was
produced; generation stops at `eos` or after `max_new_tokens`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import engine as eg
from engine import Tensor
from engine.errors import ArgumentError, ShapeError
from engine.validate import RULES, positive_int, validated

__all__ = ["Hypothesis", "generate", "greedy", "sample", "beam_search", "top_k_filter",
           "top_p_filter", "sample_logits", "log_softmax_np"]


@dataclass
class Hypothesis:
    """One beam-search result: the new tokens, their total log-probability, and the
    length-normalised score it was ranked by (logprob / len(tokens) ** length_penalty)."""
    tokens: list[int]
    score: float
    logprob: float


# -- logits processing (host side) -------------------------------------------------------------

def log_softmax_np(logits: np.ndarray) -> np.ndarray:
    """Stable float64 log-softmax over the last axis (-inf entries stay -inf)."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th
    largest are kept, so more than k may survive only when values are equal)."""
    positive_int("k", k, "top_k_filter")
    x = np.asarray(logits, dtype=np.float64)
    if k >= x.shape[-1]:
        return x.copy()
    kth = np.partition(x, -k, axis=-1)[..., -k:].min(axis=-1, keepdims=True)
    return np.where(x < kth, -np.inf, x)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filtering: keep the smallest set of most probable tokens whose total
    probability reaches p (the most probable token always stays); others get -inf.
    Equal probabilities are taken in token-id order."""
    RULES["top_p"]("p", p, "top_p_filter")
    x = np.asarray(logits, dtype=np.float64)
    if p >= 1.0:
        return x.copy()
    probs = np.exp(log_softmax_np(x))
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    mass_before = np.cumsum(sorted_p, axis=-1) - sorted_p
    keep_sorted = mass_before < p
    keep_sorted[..., 0] = True
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return np.where(keep, x, -np.inf)


def _uniform(n: int, rng: np.random.Generator | None, device: str) -> np.ndarray:
    """n uniforms in [0, 1): from `rng`, else from the engine's (seedable) generator."""
    if rng is not None:
        return rng.random(n)
    return eg.rand(n, dtype=eg.float64, device=device).numpy().astype(np.float64)


@validated
def sample_logits(logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, rng: np.random.Generator | None = None,
                  device: str = "cpu") -> np.ndarray:
    """One token per row of (N, V) logits: divide by temperature, filter (top-k then
    top-p), and invert the CDF at one uniform number per row."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    if top_k is not None:
        x = top_k_filter(x, top_k)
    if top_p is not None:
        x = top_p_filter(x, top_p)
    probs = np.exp(log_softmax_np(x))
    cdf = np.cumsum(probs, axis=-1)
    u = _uniform(x.shape[0], rng, device) * cdf[:, -1]
    idx = (cdf <= u[:, None]).sum(axis=-1)      # first index whose cdf exceeds u
    # never land on a filtered token through float round-off at the top of the cdf
    last_ok = x.shape[-1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)
    return np.minimum(idx, last_ok).astype(np.int64)


# -- the model behind one interface ------------------------------------------------------------

def _as_tokens(x: Any, name: str) -> np.ndarray:
    arr = x.numpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or (arr.size and np.asarray(arr).dtype.kind not in "iu"):
        raise ShapeError(f"generation: {name} must be integer token ids of shape (batch, time) "
                         f"or (time,), got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64)


def _device(model: Any) -> str:
    for p in model.parameters():
        return p.device
    return "cpu"


def _is_encoder_decoder(model: Any) -> bool:
    return hasattr(model, "encode") and hasattr(model, "decode")


def _max_positions(embedding: Any) -> int | None:
    pos = getattr(embedding, "pos", None)
    return None if pos is None else int(pos.max_len)


class _Decoder:
    """Next-token log-probabilities for a batch of prefixes, hiding the model kind and
    whether a key/value cache is used (the prefixes always come in whole; with a cache
    only the part not fed before reaches the model)."""

    def __init__(self, model: Any, inputs: Any, max_new_tokens: int, bos: int | None,
                 src_key_padding_mask: Any, use_cache: bool) -> None:
        self.model, self.device = model, _device(model)
        self.enc_dec = _is_encoder_decoder(model)
        tokens = _as_tokens(inputs, "inputs")
        if self.enc_dec:
            if bos is None:
                raise ArgumentError("generation: the encoder-decoder needs bos= (the first "
                                    "decoder input)")
            src = eg.tensor(tokens, device=self.device)
            kpm = src_key_padding_mask
            if kpm is not None and not isinstance(kpm, Tensor):
                kpm = eg.tensor(np.asarray(kpm, dtype=bool), device=self.device)
            if kpm is None and getattr(model, "pad_idx", None) is not None:
                kpm = src == model.pad_idx
            self.memory, self.memory_kpm = model.encode(src, kpm), kpm
            self.start = np.full((tokens.shape[0], 1), bos, dtype=np.int64)
            limit = _max_positions(model.tgt_embed)
        else:
            if src_key_padding_mask is not None:
                raise ArgumentError("generation: src_key_padding_mask is for the encoder-decoder")
            if bos is not None:
                tokens = np.concatenate([np.full((tokens.shape[0], 1), bos, np.int64), tokens], 1)
            if tokens.shape[1] == 0:
                raise ArgumentError("generation: the decoder-only model needs a non-empty prompt "
                                    "(or bos=)")
            self.start = tokens
            limit = _max_positions(model.embed)
        needed = self.start.shape[1] + max_new_tokens - 1     # the last token is never fed
        if limit is not None and needed > limit:
            raise ArgumentError(f"generation: {self.start.shape[1]} start tokens + {max_new_tokens} "
                                f"new tokens need {needed} positions, the model has max_len={limit}")
        self.cache = model.new_cache() if use_cache else None
        self.fed = 0

    def logprobs(self, prefixes: np.ndarray) -> np.ndarray:
        """prefixes (N, T) -> float64 log-probabilities of the next token (N, V)."""
        new = prefixes[:, self.fed:] if self.cache is not None else prefixes
        x = eg.tensor(new, device=self.device)
        if self.enc_dec:
            logits = self.model.decode(x, self.memory, self.memory_kpm, cache=self.cache)
        else:
            logits = self.model(x, cache=self.cache)
        self.fed = prefixes.shape[1]
        return log_softmax_np(logits[:, -1].numpy())

    def reorder(self, index: np.ndarray) -> None:
        """Keep (and repeat) rows `index`: for beams, and to widen the batch to B*K."""
        idx = eg.tensor(np.asarray(index, dtype=np.int64), device=self.device)
        if self.enc_dec:
            self.memory = self.memory[idx]
            if self.memory_kpm is not None:
                self.memory_kpm = self.memory_kpm[idx]
        if self.cache is not None:
            self.cache.reorder(idx)


class _EvalMode:
    """no_grad and eval() for the duration of decoding; restores the training flag."""

    def __init__(self, model: Any) -> None:
        self.model, self.was_training = model, bool(getattr(model, "training", False))
        self.no_grad = eg.no_grad()

    def __enter__(self) -> None:
        self.no_grad.__enter__()
        if self.was_training:
            self.model.eval()

    def __exit__(self, *exc: object) -> None:
        if self.was_training:
            self.model.train()
        self.no_grad.__exit__(*exc)


def _check_ids(model: Any, **ids: int | None) -> None:
    """bos / eos must be ids of the model's output vocabulary (checked before decoding)."""
    vocab = getattr(model, "tgt_vocab", None) or getattr(model, "vocab_size", None)
    for name, value in ids.items():
        if value is not None and vocab is not None and not 0 <= value < vocab:
            raise ArgumentError(f"generation: {name}={value} is not a token id of the model's "
                                f"vocabulary [0, {vocab})")


def _decode_loop(model: Any, inputs: Any, max_new_tokens: int, choose: Any, bos: int | None,
                 eos: int | None, src_key_padding_mask: Any, use_cache: bool) -> list[list[int]]:
    """Shared loop of greedy decoding and sampling: choose(logprobs) -> tokens (N,)."""
    _check_ids(model, bos=bos, eos=eos)
    with _EvalMode(model):
        dec = _Decoder(model, inputs, max_new_tokens, bos, src_key_padding_mask, use_cache)
        prefixes = dec.start
        n = prefixes.shape[0]
        out: list[list[int]] = [[] for _ in range(n)]
        done = np.zeros(n, dtype=bool)
        for step in range(max_new_tokens):
            nxt = np.asarray(choose(dec.logprobs(prefixes)), dtype=np.int64)
            for i in np.flatnonzero(~done):
                out[i].append(int(nxt[i]))
            if eos is not None:
                done |= nxt == eos
                nxt = np.where(done, eos, nxt)       # finished rows keep feeding eos
            if done.all() or step == max_new_tokens - 1:
                break
            prefixes = np.concatenate([prefixes, nxt[:, None]], axis=1)
    return out


@validated
def greedy(model: Any, inputs: Any, max_new_tokens: int, *, bos: int | None = None,
           eos: int | None = None, src_key_padding_mask: Any = None,
           use_cache: bool = True) -> list[list[int]]:
    """The most probable token at every step (lowest id among equal maxima)."""
    return _decode_loop(model, inputs, max_new_tokens, lambda lp: np.argmax(lp, axis=-1), bos,
                        eos, src_key_padding_mask, use_cache)


@validated
def sample(model: Any, inputs: Any, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None,
           rng: np.random.Generator | None = None, bos: int | None = None,
           eos: int | None = None, src_key_padding_mask: Any = None,
           use_cache: bool = True) -> list[list[int]]:
    """Ancestral sampling with temperature, top-k and/or top-p filtering. Seeded by
    `rng` or, when None, by the engine's generator (eg.manual_seed)."""
    device = _device(model)

    def choose(lp: np.ndarray) -> np.ndarray:
        return sample_logits(lp, temperature, top_k, top_p, rng, device)
    return _decode_loop(model, inputs, max_new_tokens, choose, bos, eos, src_key_padding_mask,
                        use_cache)


@validated
def beam_search(model: Any, inputs: Any, max_new_tokens: int, *, num_beams: int = 4,
                length_penalty: float = 1.0, num_return: int = 1, bos: int | None = None,
                eos: int | None = None, src_key_padding_mask: Any = None,
                use_cache: bool = True) -> list[list[Hypothesis]]:
    """Length-normalised beam search; per input row, the best `num_return` hypotheses.

    A hypothesis is finished when it ends in eos or has max_new_tokens tokens; its
    score is logprob / len ** length_penalty (len counts the new tokens, eos included).
    At each step every live beam's eos extension is offered to the finished pool, and
    the num_beams best other extensions (by log-probability; ties by beam rank, then
    token id) stay live. A row stops early only when no live beam can still beat its
    pool: with length_penalty >= 0 a live beam's final score is at most
    logprob / max_new_tokens ** length_penalty. With num_beams at least the number of
    possible prefixes this is exhaustive search.
    """
    _check_ids(model, bos=bos, eos=eos)
    if num_return > num_beams:
        raise ArgumentError(f"beam_search: need num_return <= num_beams, "
                            f"got num_beams={num_beams}, num_return={num_return}")
    if length_penalty < 0:
        raise ArgumentError(f"beam_search: length_penalty must be >= 0, got {length_penalty}")
    k_beams = int(num_beams)
    with _EvalMode(model):
        dec = _Decoder(model, inputs, max_new_tokens, bos, src_key_padding_mask, use_cache)
        b_rows = dec.start.shape[0]
        widen = np.repeat(np.arange(b_rows), k_beams)
        dec.reorder(widen)
        prefixes = dec.start[widen]
        start_len = prefixes.shape[1]
        beam_lp = np.full((b_rows, k_beams), -np.inf)
        beam_lp[:, 0] = 0.0                    # one live beam per row to begin with
        pools: list[list[tuple[float, int, float, list[int]]]] = [[] for _ in range(b_rows)]
        done = np.zeros(b_rows, dtype=bool)
        counter = 0

        def offer(b: int, lp: float, toks: list[int]) -> None:
            nonlocal counter
            score = lp / (len(toks) ** length_penalty)
            pools[b].append((score, counter, lp, toks))
            counter += 1
            pools[b].sort(key=lambda h: (-h[0], h[1]))
            del pools[b][k_beams:]

        for step in range(max_new_tokens):
            length = step + 1
            last = length == max_new_tokens
            lp = dec.logprobs(prefixes).reshape(b_rows, k_beams, -1)
            vocab = lp.shape[-1]
            cand = beam_lp[:, :, None] + lp                              # (B, K, V)
            parents = np.zeros((b_rows, k_beams), dtype=np.int64)
            tokens = np.full((b_rows, k_beams), 0 if eos is None else eos, dtype=np.int64)
            new_lp = np.full((b_rows, k_beams), -np.inf)
            for b in range(b_rows):
                if done[b]:
                    continue
                live = np.flatnonzero(np.isfinite(beam_lp[b]))
                hist = [prefixes[b * k_beams + k, start_len:].tolist() for k in range(k_beams)]
                if eos is not None:
                    for k in live:
                        if np.isfinite(cand[b, k, eos]):
                            offer(b, float(cand[b, k, eos]), hist[k] + [eos])
                flat = cand[b].reshape(-1).copy()
                if eos is not None:
                    flat[eos::vocab] = -np.inf
                order = np.lexsort((np.arange(flat.size), -flat))
                chosen = [j for j in order[:k_beams] if np.isfinite(flat[j])]
                if last:
                    for j in chosen:
                        offer(b, float(flat[j]), hist[j // vocab] + [int(j % vocab)])
                    done[b] = True
                    continue
                for slot, j in enumerate(chosen):
                    parents[b, slot], tokens[b, slot] = j // vocab, j % vocab
                    new_lp[b, slot] = flat[j]
                bound = (new_lp[b].max() / max_new_tokens ** length_penalty
                         if chosen else -np.inf)
                if not chosen or (len(pools[b]) >= k_beams and pools[b][-1][0] >= bound):
                    done[b] = True
                    new_lp[b] = -np.inf
            if done.all():
                break
            index = (np.arange(b_rows)[:, None] * k_beams + parents).reshape(-1)
            dec.reorder(index)
            prefixes = np.concatenate([prefixes[index], tokens.reshape(-1, 1)], axis=1)
            beam_lp = new_lp
    return [[Hypothesis(list(map(int, h[3])), float(h[0]), float(h[2]))
             for h in pool[:num_return]] for pool in pools]


@validated
def generate(model: Any, inputs: Any, max_new_tokens: int, *, bos: int | None = None,
             eos: int | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, num_beams: int = 1,
             length_penalty: float = 1.0, rng: np.random.Generator | None = None,
             src_key_padding_mask: Any = None, use_cache: bool = True) -> list[list[int]]:
    """One entry point: beam search when num_beams > 1, sampling when do_sample, else
    greedy. Returns the new tokens of each input row."""
    if num_beams > 1:
        if do_sample:
            raise ArgumentError("generate: choose beam search (num_beams > 1) or sampling, not both")
        hyps = beam_search(model, inputs, max_new_tokens, num_beams=num_beams,
                           length_penalty=length_penalty, bos=bos, eos=eos,
                           src_key_padding_mask=src_key_padding_mask, use_cache=use_cache)
        return [h[0].tokens for h in hyps]
    if do_sample:
        return sample(model, inputs, max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, rng=rng, bos=bos, eos=eos,
                      src_key_padding_mask=src_key_padding_mask, use_cache=use_cache)
    return greedy(model, inputs, max_new_tokens, bos=bos, eos=eos,
                  src_key_padding_mask=src_key_padding_mask, use_cache=use_cache)
