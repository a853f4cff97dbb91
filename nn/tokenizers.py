"""Tokenizers: characters, and byte-level byte-pair encoding (BPE, as GPT-2) trained here.

Both share five special tokens with fixed ids, so a model, the masking code and the
generation code can name them without knowing the tokenizer:

    0 <pad>   1 <bos>   2 <eos>   3 <unk>   4 <mask>

- `CharTokenizer`: one id per character seen in training. An unseen character becomes
  <unk> (decoded as U+FFFD, the Unicode replacement character), so it is lossless
  exactly on the alphabet it was trained on.
- `BPETokenizer`: ids 5..260 are the 256 byte values, so *every* string encodes
  losslessly (an unseen character is spelled as its UTF-8 bytes, never <unk>); then
  one id per learned merge. Text is first split into chunks (a leading space plus a
  word, a number, a run of punctuation, whitespace), merges never cross chunks, and
  merges are learned most-frequent-pair first with ties broken by the smaller pair of
  ids, so training is deterministic.

Special tokens are never produced from text: "<mask>" typed in a string encodes as
ordinary characters; they come only from `add_bos`/`add_eos` or from the caller.
Saved as JSON (`save`/`load`, or `load_tokenizer` for either kind).
"""
from __future__ import annotations

import heapq
import json
import os
import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from engine.errors import ArgumentError, ArgumentTypeError, EngineError
from engine.validate import validated

from .files import atomic_write

__all__ = ["SPECIAL_TOKENS", "PAD_ID", "BOS_ID", "EOS_ID", "UNK_ID", "MASK_ID", "Tokenizer",
           "CharTokenizer", "BPETokenizer", "load_tokenizer", "TokenizerError"]

class TokenizerError(EngineError, ValueError):
    """A tokenizer file that cannot be read: not JSON, not a tokenizer, or damaged."""


SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID = range(5)
_N_SPECIAL = len(SPECIAL_TOKENS)
_REPLACEMENT = "\ufffd"

# Chunks: contractions, [space]word (letters and "_", so identifiers stay whole),
# [space]digits, [space]punctuation run, whitespace (a run before a word leaves its
# last space to the word). Every character falls in exactly one class, so the
# chunks always concatenate back to the text.
CHUNK_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+"""


class Tokenizer:
    """What every tokenizer offers: the special ids, encode/decode, padding, save."""

    kind = ""
    pad_id, bos_id, eos_id, unk_id, mask_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID
    special_ids = tuple(range(_N_SPECIAL))

    @property
    def vocab_size(self) -> int:
        raise TypeError(f"{type(self).__name__} does not define vocab_size")

    def __len__(self) -> int:
        return self.vocab_size

    def _encode(self, text: str) -> list[int]:
        raise TypeError(f"{type(self).__name__} does not define _encode")

    def _piece(self, i: int) -> bytes:
        raise TypeError(f"{type(self).__name__} does not define _piece")

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """text -> token ids, optionally framed by <bos> ... <eos>."""
        if not isinstance(text, str):
            raise ArgumentTypeError(f"{type(self).__name__}.encode: expected str, got {type(text).__name__}")
        ids = self._encode(text)
        return ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """ids -> text. With skip_special, <pad>/<bos>/<eos>/<mask> are dropped and <unk>
        becomes U+FFFD; otherwise specials are written out ("<mask>"). Byte sequences that
        are not valid UTF-8 (a model may emit half a character) decode to U+FFFD."""
        out = bytearray()
        n = self.vocab_size
        for i in (int(t) for t in ids):
            if not 0 <= i < n:
                raise ArgumentError(f"{type(self).__name__}.decode: id {i} outside the vocabulary "
                                    f"[0, {n})")
            if i < _N_SPECIAL:
                if not skip_special:
                    out += SPECIAL_TOKENS[i].encode()
                elif i == UNK_ID:
                    out += _REPLACEMENT.encode()
            else:
                out += self._piece(i)
        return out.decode("utf-8", errors="replace")

    def token(self, i: int) -> str:
        """A readable form of one token (for vocab listings and attention maps)."""
        if i < _N_SPECIAL:
            return SPECIAL_TOKENS[i]
        return self._piece(i).decode("utf-8", errors="backslashreplace")

    def encode_batch(self, texts: Sequence[str], length: int | None = None,
                     add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """Encode and right-pad with <pad> to `length` (default: the longest), truncating
        longer sequences; returns an int64 array (batch, length)."""
        return self.pad([self.encode(t, add_bos, add_eos) for t in texts], length)

    def pad(self, seqs: Sequence[Sequence[int]], length: int | None = None) -> np.ndarray:
        length = max((len(s) for s in seqs), default=0) if length is None else length
        out = np.full((len(seqs), length), PAD_ID, dtype=np.int64)
        for r, s in enumerate(seqs):
            s = list(s)[:length]
            out[r, :len(s)] = s
        return out

    # -- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        raise TypeError(f"{type(self).__name__} does not define to_dict")

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON (atomically: a temp file renamed over the target)."""
        path = os.fspath(path)
        data = {"type": self.kind, "version": 1, "special_tokens": list(SPECIAL_TOKENS),
                **self.to_dict()}
        # ensure_ascii: lone surrogates survive
        atomic_write(path, lambda f: json.dump(data, f, ensure_ascii=True, indent=0), binary=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        tok = load_tokenizer(path)
        if not isinstance(tok, cls):
            raise TokenizerError(f"{os.fspath(path)!r} holds a {type(tok).__name__}, not a "
                                 f"{cls.__name__}")
        return tok


class CharTokenizer(Tokenizer):
    """One token per character of the training alphabet (sorted by code point)."""

    kind = "char"

    def __init__(self, chars: Iterable[str]) -> None:
        alphabet = sorted(set(chars))
        bad = [c for c in alphabet if len(c) != 1]
        if bad:
            raise ArgumentError(f"CharTokenizer: expected single characters, got {bad[:3]}")
        self.chars = alphabet
        self._ids = {c: i + _N_SPECIAL for i, c in enumerate(alphabet)}
        self._pieces = [c.encode("utf-8", errors="surrogatepass") for c in alphabet]

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls(seen)

    @property
    def vocab_size(self) -> int:
        return _N_SPECIAL + len(self.chars)

    def _encode(self, text: str) -> list[int]:
        get = self._ids.get
        return [get(c, UNK_ID) for c in text]

    def _piece(self, i: int) -> bytes:
        return self._pieces[i - _N_SPECIAL]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """As Tokenizer.decode, but character by character (an alphabet may hold lone
        surrogates, which have no UTF-8 form)."""
        n, parts = self.vocab_size, []
        for i in (int(t) for t in ids):
            if not 0 <= i < n:
                raise ArgumentError(f"CharTokenizer.decode: id {i} outside the vocabulary [0, {n})")
            if i >= _N_SPECIAL:
                parts.append(self.chars[i - _N_SPECIAL])
            elif not skip_special:
                parts.append(SPECIAL_TOKENS[i])
            elif i == UNK_ID:
                parts.append(_REPLACEMENT)
        return "".join(parts)

    def token(self, i: int) -> str:
        return SPECIAL_TOKENS[i] if i < _N_SPECIAL else self.chars[i - _N_SPECIAL]

    def to_dict(self) -> dict:
        return {"chars": "".join(self.chars)}


def _chunks(text: str) -> list[str]:
    return re.findall(CHUNK_PATTERN, text)


class BPETokenizer(Tokenizer):
    """Byte-level BPE: 256 byte tokens plus learned merges (see the module docstring)."""

    kind = "bpe"
    _BYTE0 = _N_SPECIAL

    def __init__(self, merges: Sequence[tuple[int, int]]) -> None:
        self.merges = [(int(a), int(b)) for a, b in merges]
        self._pieces = [b""] * _N_SPECIAL + [bytes([v]) for v in range(256)]
        self._ranks: dict[tuple[int, int], int] = {}
        for rank, (a, b) in enumerate(self.merges):
            new = len(self._pieces)
            if not (_N_SPECIAL <= a < new and _N_SPECIAL <= b < new):
                raise ArgumentError(f"BPETokenizer: merge {rank} ({a}, {b}) refers to an id that is "
                                    f"special or not yet defined (< {new})")
            if (a, b) in self._ranks:
                raise ArgumentError(f"BPETokenizer: merge ({a}, {b}) appears twice")
            self._ranks[(a, b)] = rank
            self._pieces.append(self._pieces[a] + self._pieces[b])
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def _piece(self, i: int) -> bytes:
        return self._pieces[i]

    # -- training ---------------------------------------------------------------------------
    @classmethod
    @validated
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "BPETokenizer":
        """Learn merges until the vocabulary (5 specials + 256 bytes + merges) has
        `vocab_size` tokens, or no pair occurs `min_frequency` times.

        The classic incremental algorithm: pair counts are kept for the unique chunks
        (weighted by frequency) and updated only in the chunks a merge touches; a heap
        with lazy deletion finds the next pair.
        """
        base = _N_SPECIAL + 256
        if vocab_size < base:
            raise ArgumentError(f"BPETokenizer.train: vocab_size must be >= {base} (5 specials + 256 "
                                f"bytes), got {vocab_size}")
        counts: Counter[str] = Counter()
        for t in texts:
            counts.update(_chunks(t))
        words = [[b + cls._BYTE0 for b in w.encode("utf-8", errors="surrogatepass")]
                 for w in counts]
        freqs = list(counts.values())
        pair_count: dict[tuple[int, int], int] = {}
        where: dict[tuple[int, int], set[int]] = {}
        for wi, (w, f) in enumerate(zip(words, freqs)):
            for p in zip(w, w[1:]):
                pair_count[p] = pair_count.get(p, 0) + f
                where.setdefault(p, set()).add(wi)
        heap = [(-c, p) for p, c in pair_count.items()]
        heapq.heapify(heap)
        merges: list[tuple[int, int]] = []
        while base + len(merges) < vocab_size and heap:
            negc, pair = heapq.heappop(heap)
            if pair_count.get(pair, 0) != -negc:       # stale entry; the fresh one is queued
                continue
            if -negc < min_frequency:
                break
            new = base + len(merges)
            merges.append(pair)
            changed: set[tuple[int, int]] = set()
            for wi in where.pop(pair, ()):
                w, f = words[wi], freqs[wi]
                if len(w) < 2:
                    continue
                merged, i = [], 0
                while i < len(w):
                    if i + 1 < len(w) and w[i] == pair[0] and w[i + 1] == pair[1]:
                        merged.append(new)
                        i += 2
                    else:
                        merged.append(w[i])
                        i += 1
                if len(merged) == len(w):
                    continue
                for p in zip(w, w[1:]):
                    pair_count[p] -= f
                    changed.add(p)
                for p in zip(merged, merged[1:]):
                    pair_count[p] = pair_count.get(p, 0) + f
                    where.setdefault(p, set()).add(wi)
                    changed.add(p)
                words[wi] = merged
            pair_count.pop(pair, None)
            for p in changed:
                c = pair_count.get(p, 0)
                if c > 0 and p != pair:
                    heapq.heappush(heap, (-c, p))
                elif c <= 0:
                    pair_count.pop(p, None)
        return cls(merges)

    # -- encoding ---------------------------------------------------------------------------
    def _bpe(self, chunk: str) -> list[int]:
        """Apply merges to one chunk, lowest rank first (the order they were learned)."""
        w = [b + self._BYTE0 for b in chunk.encode("utf-8", errors="surrogatepass")]
        ranks = self._ranks
        base = _N_SPECIAL + 256
        while len(w) > 1:
            best, best_rank = None, None
            for p in zip(w, w[1:]):
                r = ranks.get(p)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = p, r
            if best is None:
                break
            new, merged, i = base + best_rank, [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == best[0] and w[i + 1] == best[1]:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(w[i])
                    i += 1
            w = merged
        return w

    def _encode(self, text: str) -> list[int]:
        out: list[int] = []
        cache = self._cache
        for chunk in _chunks(text):
            ids = cache.get(chunk)
            if ids is None:
                ids = self._bpe(chunk)
                if len(cache) < 200_000:
                    cache[chunk] = ids
            out += ids
        return out

    def to_dict(self) -> dict:
        return {"pattern": CHUNK_PATTERN, "merges": [list(m) for m in self.merges],
                "tokens": [self.token(i) for i in range(self.vocab_size)]}


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read a tokenizer saved by `save`, whichever kind it is."""
    path = os.fspath(path)
    with open(path, "rb") as f:                 # a missing file stays FileNotFoundError
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise TokenizerError(f"load_tokenizer: {path!r} is not a tokenizer file: not valid "
                             f"JSON ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or data.get("type") not in ("char", "bpe"):
        raise TokenizerError(f"load_tokenizer: {path!r} is not a tokenizer file (expected a JSON "
                             f"object with type 'char' or 'bpe')")
    if data.get("special_tokens") != list(SPECIAL_TOKENS):
        raise TokenizerError(f"load_tokenizer: {path!r}: special tokens "
                             f"{data.get('special_tokens')} differ from {list(SPECIAL_TOKENS)}")
    if data["type"] == "bpe" and data.get("pattern") != CHUNK_PATTERN:
        raise TokenizerError(f"load_tokenizer: {path!r}: saved with another chunk pattern; its "
                             f"merges would split text differently")
    try:
        if data["type"] == "char":
            return CharTokenizer(data["chars"])
        return BPETokenizer([tuple(m) for m in data["merges"]])
    except (KeyError, TypeError, ValueError) as e:
        raise TokenizerError(f"load_tokenizer: {path!r} is a damaged {data['type']} tokenizer "
                             f"file: {type(e).__name__}: {e}") from e
