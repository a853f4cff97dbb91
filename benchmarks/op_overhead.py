"""Eager per-op overhead against the raw array library (and PyTorch when installed) on
small arrays.

    python -m benchmarks.op_overhead [--device cpu|cuda] [--json out.json] [--threads 1]

Each row times the same computation in one run; the "overhead" column is the engine's
time minus the raw library's (NumPy on the CPU, CuPy on "cuda"), i.e. what dispatch,
shape handling and tape recording cost. On "cuda" every call is followed by a device
synchronisation, so a row is the latency of one small launch-bound computation.
The engine and PyTorch get the same thread count (--threads, default 1: the arrays
are too small to split).
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable

import numpy as np

import engine as eg

from .timing import median_time


def _softmax(xp: Any, x: Any) -> Any:
    e = xp.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _synced(fns: dict[str, Callable[[], object]], syncs: dict[str, Callable[[], None]]) -> dict:
    """Each callable followed by its library's device synchronisation (if any)."""
    def wrap(f: Callable[[], object], sync: Callable[[], None]) -> Callable[[], None]:
        return lambda: (f(), sync())
    return {k: wrap(f, syncs[k]) if k in syncs else f for k, f in fns.items()}


def _jitted_step(tx: Any, tw1: Any, tw2: Any) -> Callable[[], None]:
    """The MLP's forward and backward as one compiled call (its guards checked each call)."""
    def fwd_bwd() -> None:
        y = (eg.tanh(tx @ tw1) @ tw2).mean()
        y.backward()

    compiled = eg.jit(fwd_bwd)

    def step() -> None:
        compiled()
        tw1.grad = tw2.grad = None
    return step


def guard_cost(repeat: int = 2000) -> tuple[int, float]:
    """(comparisons, µs per check) of the guard of a jitted small Transformer training
    step (forward, cross-entropy, backward, AdamW): what every compiled call pays
    before it runs."""
    from engine import nn
    eg.manual_seed(0)
    model = nn.CausalLM(vocab_size=50, d_model=32, nhead=2, num_layers=2, dim_feedforward=64, max_len=16, dropout=0.0)
    opt = nn.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
    tokens = eg.tensor(np.random.default_rng(0).integers(0, 50, (4, 16)))

    def train_step() -> None:
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()

    step = eg.jit(train_step)
    for _ in range(3):
        step()
    entry = step._entry()
    seconds = median_time(lambda: entry.guard.failed(entry.checked), repeat=repeat)
    return entry.guard.count, seconds * 1e6


def cases(device: str = "cpu", threads: int = 1) -> list[tuple[str, dict]]:
    """[(case, {"raw": fn, "engine": fn, "torch": fn?})] on `device`."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 64)).astype(np.float32)
    b = rng.standard_normal((64, 64)).astype(np.float32)
    x = rng.standard_normal((32, 64)).astype(np.float32)
    w1 = (rng.standard_normal((64, 64)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((64, 10)) * 0.1).astype(np.float32)
    syncs: dict[str, Callable[[], None]] = {}
    xp: Any = np
    if device != "cpu":
        import cupy
        xp = cupy
        syncs["raw"] = syncs["engine"] = cupy.cuda.Device().synchronize
    ra, rb, rx, rw1, rw2 = (xp.asarray(v) for v in (a, b, x, w1, w2))
    ta, tb, tx = (eg.tensor(v, device=device) for v in (a, b, x))
    tw1, tw2 = (eg.tensor(v, requires_grad=True, device=device) for v in (w1, w2))

    def raw_mlp() -> None:
        h = xp.tanh(rx @ rw1)
        y = h @ rw2
        gy = xp.full_like(y, 1.0 / y.size)
        gw2 = h.T @ gy
        gh = gy @ rw2.T * (1 - h * h)
        gw1 = rx.T @ gh
        return gw1, gw2

    def eg_mlp() -> None:
        y = (eg.tanh(tx @ tw1) @ tw2).mean()
        y.backward()
        tw1.grad = tw2.grad = None

    step = _jitted_step(tx, tw1, tw2)
    out = [
        ("add 64x64", dict(raw=lambda: ra + rb, engine=lambda: ta + tb)),
        ("matmul 64x64", dict(raw=lambda: ra @ rb, engine=lambda: ta @ tb)),
        ("softmax 64x64", dict(raw=lambda: _softmax(xp, ra), engine=lambda: eg.softmax(ta, -1))),
        ("MLP fwd+bwd 32x64x64x10", dict(raw=raw_mlp, engine=eg_mlp)),
        ("jit MLP fwd+bwd 32x64x64x10", dict(raw=raw_mlp, engine=step)),
    ]
    try:
        import torch
        torch.set_num_threads(threads)
        tdev = "cuda" if device != "cpu" else "cpu"
        if tdev == "cuda":
            syncs["torch"] = torch.cuda.synchronize
        pa, pb, px = (torch.tensor(v, device=tdev) for v in (a, b, x))
        pw1 = torch.tensor(w1, requires_grad=True, device=tdev)
        pw2 = torch.tensor(w2, requires_grad=True, device=tdev)

        def torch_mlp() -> None:
            y = (torch.tanh(px @ pw1) @ pw2).mean()
            y.backward()
            pw1.grad = pw2.grad = None

        out[0][1]["torch"] = lambda: pa + pb
        out[1][1]["torch"] = lambda: pa @ pb
        out[2][1]["torch"] = lambda: torch.softmax(pa, -1)
        out[3][1]["torch"] = torch_mlp
        out[4][1]["torch"] = torch_mlp
    except ImportError:
        pass
    return [(name, _synced(fns, syncs)) for name, fns in out]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--repeat", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="threads for the engine and PyTorch")
    args = ap.parse_args(argv)
    eg.set_num_threads(args.threads)
    raw = "numpy" if args.device == "cpu" else "cupy"
    rows = []
    print(f"{'case':28s} {raw + ' us':>9s} {'engine us':>10s} {'overhead us':>12s} "
          f"{'engine/' + raw:>13s} {'torch us':>9s} {'engine/torch':>13s}")
    for name, fns in cases(args.device, args.threads):
        t = {k: median_time(f, repeat=args.repeat) * 1e6 for k, f in fns.items()}
        t[raw] = t.pop("raw")
        row = dict(case=name, device=args.device, **{f"{k}_us": round(v, 2) for k, v in t.items()})
        row[f"engine_over_{raw}"] = round(t["engine"] / t[raw], 2)
        tt = t.get("torch")
        if tt:
            row["engine_over_torch"] = round(t["engine"] / tt, 2)
        rows.append(row)
        print(f"{name:28s} {t[raw]:9.1f} {t['engine']:10.1f} {t['engine'] - t[raw]:12.1f} "
              f"{t['engine'] / t[raw]:13.2f} {tt or float('nan'):9.1f} "
              f"{(t['engine'] / tt) if tt else float('nan'):13.2f}")
    if args.device == "cpu":
        count, us = guard_cost()
        rows.append(dict(case="jit guard check, small Transformer step", comparisons=count, us=round(us, 2)))
        print(f"jit guard check of a small Transformer training step: {count} comparisons, {us:.1f} us per call")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
