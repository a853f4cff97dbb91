"""Encoder-decoder "translation" of dates written in words into ISO form.

    twenty-ninth of november 2026                   ->  2026-11-29
    the 3rd of mar, 1999                            ->  1999-03-03
    july fourth, nineteen seventy-six               ->  1976-07-04
    the first of may, two thousand and eight        ->  2008-05-01

The data is generated here (nothing is downloaded): every calendar date from 1900 to
2099, written in one of 13 English patterns (ordinal words, "29th", abbreviated
months, years in digits or as they are said, ...). The dates are split, seeded, into
training dates and held-out dates, so every held-out sentence is a date the model
never saw in any form. Source sentences
are word tokens (digits one token each, "-" and "," their own tokens); the target is
the ISO string, one character per token. An nn.Seq2SeqTransformer (post-LN, as in the
paper; shared, tied embedding) trains with AdamW and a warmup-cosine schedule through
nn.train, then greedy decoding (with the key/value cache) is scored on the held-out
sentences, and a few are translated with beam search.

    python examples/translate.py                      # about a minute on 2 CPU cores
    python examples/translate.py --translate "the first of may 2020" "dec 24 1999"
    python examples/translate.py --smoke             # a few steps of a tiny model

--translate sentences are checked before training: a word outside the vocabulary is
named and the run stops (the model would otherwise read it as <unk> and still answer
with a date). Writes the log (JSONL), the checkpoint and, with matplotlib, the loss
curve to --out-dir and lists them at the end, after the verdict against the 98% target.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time
from typing import Callable

import numpy as np

if __package__ in (None, ""):          # run as a script: make `engine`/`nn` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine as eg                                            # noqa: E402
from engine import nn                                          # noqa: E402
from examples.common import report_files, run_cli, warmup_cosine  # noqa: E402

PAD, BOS, EOS, UNK = 0, 1, 2, 3                  # the ids nn.tokenizers uses too
TARGET_EXACT = 0.98                              # held-out dates translated exactly
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]

MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august",
          "september", "october", "november", "december"]
ABBREV = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_UNITS = ["", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
          "ninth"]
_TEENS = ["tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth",
          "seventeenth", "eighteenth", "nineteenth"]


def ordinal_words(day: int) -> str:
    """1 -> "first", 22 -> "twenty-second", 30 -> "thirtieth"."""
    if day < 10:
        return _UNITS[day]
    if day < 20:
        return _TEENS[day - 10]
    tens, unit = divmod(day, 10)
    word = ["twenty", "thirty"][tens - 2]
    return word[:-1] + "ieth" if unit == 0 else f"{word}-{_UNITS[unit]}"


_ONES = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """0 < n < 100 in words: 7 -> "seven", 42 -> "forty-two"."""
    if n < 20:
        return _ONES[n]
    tens, unit = divmod(n, 10)
    return _TENS[tens] + (f"-{_ONES[unit]}" if unit else "")


def year_words(year: int) -> str:
    """As years are said: 1984 -> "nineteen eighty-four", 1905 -> "nineteen oh five",
    1900 -> "nineteen hundred", 2006 -> "two thousand and six", 2026 -> "twenty twenty-six"."""
    century, rest = divmod(year, 100)
    if century == 20 and rest < 10:
        return "two thousand" + (f" and {_ONES[rest]}" if rest else "")
    head = number_words(century)
    if rest == 0:
        return f"{head} hundred"
    return f"{head} oh {_ONES[rest]}" if rest < 10 else f"{head} {number_words(rest)}"


def ordinal_suffix(day: int) -> str:
    """1 -> "1st", 12 -> "12th", 23 -> "23rd"."""
    if 11 <= day % 100 <= 13:
        return f"{day}th"
    return f"{day}" + {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


# Each pattern gets (day, month index 0..11, year) and writes one sentence.
FORMATS: list[Callable[[int, int, int], str]] = [
    lambda d, m, y: f"{ordinal_words(d)} of {MONTHS[m]} {y}",
    lambda d, m, y: f"the {ordinal_words(d)} of {MONTHS[m]}, {y}",
    lambda d, m, y: f"{MONTHS[m]} {ordinal_words(d)}, {y}",
    lambda d, m, y: f"{MONTHS[m]} the {ordinal_words(d)} {y}",
    lambda d, m, y: f"{MONTHS[m]} {d}, {y}",
    lambda d, m, y: f"{d} {MONTHS[m]} {y}",
    lambda d, m, y: f"the {ordinal_suffix(d)} of {ABBREV[m]}, {y}",
    lambda d, m, y: f"{ordinal_suffix(d)} {MONTHS[m]} {y}",
    lambda d, m, y: f"{ABBREV[m]} {d} {y}",
    lambda d, m, y: f"{y}, {ABBREV[m]} {ordinal_words(d)}",
    lambda d, m, y: f"the {ordinal_words(d)} of {MONTHS[m]}, {year_words(y)}",
    lambda d, m, y: f"{MONTHS[m]} {ordinal_words(d)}, {year_words(y)}",
    lambda d, m, y: f"{ordinal_suffix(d)} of {MONTHS[m]} {year_words(y)}",
]

_TOKEN = re.compile(r"\d|[a-z]+|[-,]")


def tokenize(text: str) -> list[str]:
    """Words, single digits, "-" and ","; other characters are dropped."""
    return _TOKEN.findall(text.lower())


def build_vocab() -> list[str]:
    """Every token the patterns can produce (and so every target character), sorted."""
    words = set("0123456789-,")
    words.update(MONTHS + ABBREV + ["the", "of", "st", "nd", "rd", "th", "twenty", "thirty"])
    for d in range(1, 32):
        words.update(tokenize(ordinal_words(d)))
    for y in range(1900, 2100):
        words.update(tokenize(year_words(y)))
    return SPECIALS + sorted(words)


class Vocab:
    def __init__(self) -> None:
        self.itos = build_vocab()
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode_source(self, text: str) -> list[int]:
        return [self.stoi.get(t, UNK) for t in tokenize(text)]

    def unknown_words(self, text: str) -> list[str]:
        """The words of `text` the model has no token for (it would read them as <unk>)."""
        return [t for t in tokenize(text) if t not in self.stoi]

    def encode_target(self, iso: str) -> list[int]:
        return [self.stoi[c] for c in iso] + [EOS]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids if i not in (PAD, BOS, EOS))


def all_dates() -> list[datetime.date]:
    start, end = datetime.date(1900, 1, 1), datetime.date(2099, 12, 31)
    return [start + datetime.timedelta(days=i) for i in range((end - start).days + 1)]


def sentence(date: datetime.date, fmt: int) -> str:
    return FORMATS[fmt](date.day, date.month - 1, date.year)


def split_dates(seed: int, n_heldout: int) -> tuple[list[datetime.date], list[datetime.date]]:
    """Disjoint training and held-out dates (a seeded permutation of all of them)."""
    dates = all_dates()
    order = np.random.default_rng([seed, 1]).permutation(len(dates))
    held = sorted(dates[i] for i in order[:n_heldout])
    train = [dates[i] for i in order[n_heldout:]]
    return train, held


def pad_batch(seqs: list[list[int]]) -> np.ndarray:
    out = np.full((len(seqs), max(len(s) for s in seqs)), PAD, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=64, help="sentences per step")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2, help="encoder and decoder layers (each)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="0 by default: fresh sentences every step, nothing to overfit")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--heldout", type=int, default=1000, help="held-out dates (one sentence each)")
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--beams", type=int, default=4, help="beam width for the printed samples")
    ap.add_argument("--samples", type=int, default=8, help="held-out sentences to show")
    ap.add_argument("--translate", nargs="*", default=[], metavar="SENTENCE",
                    help="also translate these sentences after training")
    ap.add_argument("--out-dir", default="runs/translate", help="log, checkpoint, plot")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    ap.add_argument("--jit", action="store_true", help="compile the training step (eg.jit)")
    ap.add_argument("--distributed", action="store_true",
                    help="train data-parallel over the processes mpiexec starts, e.g. "
                         "`mpiexec -n 2 python examples/translate.py --distributed` (needs mpi4py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, few steps (what the tests run)")
    return ap


def check_sentences(vocab: Vocab, sentences: list[str]) -> None:
    """Refuse --translate sentences with words outside the vocabulary, before training:
    the model would read each as <unk> and answer something that looks like a date."""
    for text in sentences:
        unknown = vocab.unknown_words(text)
        if unknown:
            known = [w for w in vocab.itos[4:] if w.isalpha() and len(w) > 1]
            raise ValueError(f"--translate {text!r}: unknown words {', '.join(map(repr, unknown))}"
                             f"; the model reads dates written with words such as "
                             f"{', '.join(known[:12])}, ... and digits")


def main(argv: list[str] | None = None) -> dict:
    return run_cli(_parser(), argv, train_and_translate)


def train_and_translate(args: argparse.Namespace) -> dict:
    check_sentences(Vocab(), args.translate)
    if args.smoke:
        args.steps, args.batch, args.d_model, args.layers, args.heads = 6, 8, 16, 1, 2
        args.heldout, args.eval_every, args.samples, args.warmup = 40, 3, 2, 2
    if args.distributed:
        eg.distributed.init()
        eg.distributed.silence_other_ranks()
    os.makedirs(args.out_dir, exist_ok=True)
    t_start = time.perf_counter()
    vocab = Vocab()
    V = len(vocab)
    train_dates, held_dates = split_dates(args.seed, args.heldout)
    held_rng = np.random.default_rng([args.seed, 2])
    held_fmt = [int(held_rng.integers(len(FORMATS))) for _ in held_dates]
    held = [(sentence(d, f), d.isoformat()) for d, f in zip(held_dates, held_fmt)]
    held_src = [vocab.encode_source(s) for s, _ in held]
    print(f"data: {len(train_dates):,} training dates and {len(held_dates):,} held-out dates "
          f"(disjoint), {len(FORMATS)} ways of writing each; vocabulary {V} tokens")
    print(f"  e.g. {held[0][0]!r} -> {held[0][1]!r}")

    eg.manual_seed(args.seed)
    model = nn.Seq2SeqTransformer(V, d_model=args.d_model, nhead=args.heads,
                                  num_encoder_layers=args.layers, num_decoder_layers=args.layers,
                                  dim_feedforward=4 * args.d_model, dropout=args.dropout,
                                  max_len=64, pad_idx=PAD, device=args.device)
    n_params = model.num_parameters()
    lr = eg.tensor(args.lr, device=args.device) if args.jit else args.lr
    opt = nn.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01,
                         capturable=args.jit)
    sched = warmup_cosine(opt, args.warmup, args.steps, min_ratio=0.05)
    print(f"model: Seq2SeqTransformer d_model={args.d_model}, {args.layers}+{args.layers} layers, "
          f"{args.heads} heads, {n_params:,} parameters; {args.steps} steps of {args.batch} "
          f"sentences")

    def batch_fn(step: int) -> tuple:
        """Fresh sentences of training dates, a function of (seed, step) only."""
        r = np.random.default_rng([args.seed, 3, step])
        picks = r.integers(0, len(train_dates), args.batch)
        fmts = r.integers(0, len(FORMATS), args.batch)
        src = pad_batch([vocab.encode_source(sentence(train_dates[i], f))
                         for i, f in zip(picks, fmts)])
        tgt = np.array([[BOS] + vocab.encode_target(train_dates[i].isoformat()) for i in picks])
        dev = args.device
        return (eg.tensor(src, device=dev), eg.tensor(tgt[:, :-1], device=dev),
                eg.tensor(tgt[:, 1:], device=dev))

    def loss_fn(m: nn.Module, batch: tuple) -> eg.Tensor:
        src, tgt_in, tgt_out = batch
        return nn.functional.cross_entropy(m(src, tgt_in), tgt_out, ignore_index=PAD)

    def translate(sources: list[list[int]], beams: int = 1) -> list[str]:
        out = []
        for i in range(0, len(sources), 500):
            src = pad_batch(sources[i:i + 500])
            out += nn.generation.generate(model, src, 12, bos=BOS, eos=EOS, num_beams=beams)
        return [vocab.decode(o) for o in out]

    def evaluate(m: nn.Module) -> dict:
        """Greedy decoding of every held-out sentence: exact-match accuracy."""
        m.eval()
        pred = translate(held_src)
        return {"heldout_exact": float(np.mean([p == t for p, (_, t) in zip(pred, held)]))}

    log = os.path.join(args.out_dir, "log.jsonl")
    ckpt = os.path.join(args.out_dir, "checkpoint.npz")
    hist = nn.train(model, opt, batch_fn, loss_fn, steps=args.steps, scheduler=sched,
                    clip_norm=1.0, eval_fn=evaluate, eval_every=args.eval_every,
                    checkpoint=ckpt,
                    checkpoint_every=args.eval_every, resume=args.resume, log=log,
                    print_every=max(1, args.eval_every // 3), seed=args.seed, jit=args.jit,
                    distributed=args.distributed,
                    tokens_fn=lambda b: int(b[0].shape[0] * (b[0].shape[1] + b[1].shape[1])))
    train_s = time.perf_counter() - t_start
    model.eval()
    pred = translate(held_src)
    exact = float(np.mean([p == t for p, (_, t) in zip(pred, held)]))
    by_format: dict[int, list[bool]] = {}
    for p, (_, t), f in zip(pred, held, held_fmt):
        by_format.setdefault(f, []).append(p == t)
    print(f"\nheld-out exact match (greedy): {exact:.2%} of {len(held)} sentences")
    worst = min(sorted(by_format), key=lambda f: np.mean(by_format[f]))
    example = sentence(datetime.date(2026, 11, 29), worst)
    if np.mean(by_format[worst]) < 1.0:
        print(f"  weakest of the {len(FORMATS)} patterns: {np.mean(by_format[worst]):.1%} "
              f"(written like {example!r})")
    else:
        print(f"  every one of the {len(FORMATS)} ways of writing a date: 100%")
    wrong = [(s, t, p) for p, (s, t) in zip(pred, held) if p != t]
    for s, t, p in wrong[:3]:
        print(f"  miss: {s!r} -> {p!r} (want {t!r})")

    show = [held[i] for i in np.linspace(0, len(held) - 1, args.samples).astype(int)]
    extra = [(s, "") for s in args.translate]
    hyps_src = [vocab.encode_source(s) for s, _ in show + extra]
    beams = nn.generation.beam_search(model, pad_batch(hyps_src), 12, num_beams=args.beams,
                                      bos=BOS, eos=EOS)
    print(f"\nheld-out sentences, beam search (width {args.beams}):")
    for (s, t), hs in zip(show + extra, beams):
        out = vocab.decode(hs[0].tokens)
        mark = "" if not t else ("  ok" if out == t else f"  (want {t})")
        print(f"  {s:40s} -> {out}   log p = {hs[0].logprob:.3f}{mark}")
    png = os.path.join(args.out_dir, "loss.png")
    drawn = nn.plot_losses(log, png, title="date translation (enc-dec)")
    elapsed = time.perf_counter() - t_start
    print(f"total time {elapsed:.0f}s (training {train_s:.0f}s)")
    report_files({"checkpoint": ckpt, "training log": log, "loss curve": png if drawn else None})
    print(f"ours: {'pass' if exact >= TARGET_EXACT else 'MISS'}: {exact:.2%} of {len(held)} "
          f"held-out dates translated exactly (target >= {TARGET_EXACT:.0%})")
    return {"exact": exact, "history": hist, "params": n_params, "seconds": elapsed,
            "train_seconds": train_s, "predictions": pred, "heldout": held,
            "beam": [(s, t, vocab.decode(h[0].tokens)) for (s, t), h in zip(show + extra, beams)]}


if __name__ == "__main__":
    main()
