"""Key/value cache speedup: greedy generation of 128 new tokens, cached vs recomputed.

    python -m benchmarks.kv_cache [--new-tokens 128] [--batch 1 8] [--device cpu] [--json out.json]

Models are the "base" encoder-decoder and the "medium" decoder-only LM of
benchmarks/model_spec.md (random weights: the work per token does not depend on them;
eos is disabled so every run produces exactly --new-tokens tokens). Without the cache
step t re-encodes all t earlier positions (O(T^2) work in total); with it, each step
feeds one token and attends over the stored keys/values. Both runs must produce the
same tokens; the table says so. Compare the ratios: absolute times vary with load (on a
busy machine OpenBLAS's spinning threads can slow everything down several times, which
is why the engine starts BLAS at one thread; eg.set_num_threads(n) asks for more).
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

import engine as eg
from engine import nn

CONFIGS = {
    # name: (kind, d_model, heads, d_ff, layers, vocab, source/prompt length)
    "base": ("enc-dec", 128, 4, 512, 2, 64, 32),
    "medium": ("lm", 256, 4, 1024, 4, 96, 16),
}


def build(name: str, device: str) -> tuple[Any, dict]:
    kind, d, h, f, n, vocab, _ = CONFIGS[name]
    eg.manual_seed(0)
    if kind == "enc-dec":
        model = nn.Seq2SeqTransformer(vocab, d_model=d, nhead=h, num_encoder_layers=n,
                                      num_decoder_layers=n, dim_feedforward=f, dropout=0.0,
                                      max_len=512, device=device)
        return model.eval(), {"bos": 0}
    model = nn.CausalLM(vocab, d_model=d, nhead=h, num_layers=n, dim_feedforward=f, dropout=0.0,
                        max_len=512, device=device)
    return model.eval(), {}


def run_case(name: str, batch: int, new_tokens: int, device: str, repeat: int) -> dict:
    model, kw = build(name, device)
    vocab, length = CONFIGS[name][5], CONFIGS[name][6]
    inputs = np.random.default_rng(1).integers(1, vocab, (batch, length))
    nn.generation.greedy(model, inputs, 4, use_cache=True, **kw)      # warm-up
    nn.generation.greedy(model, inputs, 4, use_cache=False, **kw)
    times, outs = {}, {}
    for use_cache in (True, False):
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            outs[use_cache] = nn.generation.greedy(model, inputs, new_tokens,
                                                   use_cache=use_cache, **kw)
            best = min(best, time.perf_counter() - t0)
        times[use_cache] = best
    return {"model": name, "kind": CONFIGS[name][0], "batch": batch, "new_tokens": new_tokens,
            "cached_s": times[True], "uncached_s": times[False],
            "speedup": times[False] / times[True],
            "cached_tok_per_s": batch * new_tokens / times[True],
            "same_tokens": outs[True] == outs[False]}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs per case")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)

    rows = []
    print(f"greedy generation of {args.new_tokens} new tokens on {args.device}")
    print(f"{'model':8} {'kind':8} {'batch':>5} {'cached s':>9} {'uncached s':>11} "
          f"{'speedup':>8} {'cached tok/s':>13} {'same tokens':>12}")
    for name in args.models:
        for batch in args.batch:
            r = run_case(name, batch, args.new_tokens, args.device, args.repeat)
            rows.append(r)
            print(f"{r['model']:8} {r['kind']:8} {r['batch']:5d} {r['cached_s']:9.3f} "
                  f"{r['uncached_s']:11.3f} {r['speedup']:7.1f}x {r['cached_tok_per_s']:13.0f} "
                  f"{'yes' if r['same_tokens'] else 'NO':>12}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
