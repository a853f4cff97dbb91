"""Eager per-op overhead against raw NumPy (and PyTorch when installed) on small arrays.

    python -m benchmarks.op_overhead [--json out.json]

Each row times the same computation in one run; the "overhead" column is the engine's
time minus NumPy's, i.e. what dispatch, shape handling and tape recording cost.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

import engine as eg

from .timing import median_time


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def cases() -> list[tuple[str, dict]]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 64)).astype(np.float32)
    b = rng.standard_normal((64, 64)).astype(np.float32)
    x = rng.standard_normal((32, 64)).astype(np.float32)
    w1 = (rng.standard_normal((64, 64)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((64, 10)) * 0.1).astype(np.float32)
    ta, tb, tx = eg.tensor(a), eg.tensor(b), eg.tensor(x)
    tw1, tw2 = eg.tensor(w1, requires_grad=True), eg.tensor(w2, requires_grad=True)

    def np_mlp() -> None:
        h = np.tanh(x @ w1)
        y = h @ w2
        gy = np.full_like(y, 1.0 / y.size)
        gw2 = h.T @ gy
        gh = gy @ w2.T * (1 - h * h)
        gw1 = x.T @ gh
        return gw1, gw2

    def eg_mlp() -> None:
        y = (eg.tanh(tx @ tw1) @ tw2).mean()
        y.backward()
        tw1.grad = tw2.grad = None

    out = [
        ("add 64x64", dict(numpy=lambda: a + b, engine=lambda: ta + tb)),
        ("matmul 64x64", dict(numpy=lambda: a @ b, engine=lambda: ta @ tb)),
        ("softmax 64x64", dict(numpy=lambda: _np_softmax(a), engine=lambda: eg.softmax(ta, -1))),
        ("MLP fwd+bwd 32x64x64x10", dict(numpy=np_mlp, engine=eg_mlp)),
    ]
    try:
        import torch
        torch.set_num_threads(2)
        pa, pb, px = (torch.from_numpy(v) for v in (a, b, x))
        pw1 = torch.tensor(w1, requires_grad=True)
        pw2 = torch.tensor(w2, requires_grad=True)

        def torch_mlp() -> None:
            y = (torch.tanh(px @ pw1) @ pw2).mean()
            y.backward()
            pw1.grad = pw2.grad = None

        out[0][1]["torch"] = lambda: pa + pb
        out[1][1]["torch"] = lambda: pa @ pb
        out[2][1]["torch"] = lambda: torch.softmax(pa, -1)
        out[3][1]["torch"] = torch_mlp
    except ImportError:
        pass
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--repeat", type=int, default=300)
    args = ap.parse_args(argv)
    rows = []
    print(f"{'case':28s} {'numpy us':>9s} {'engine us':>10s} {'overhead us':>12s} "
          f"{'engine/numpy':>13s} {'torch us':>9s} {'engine/torch':>13s}")
    for name, fns in cases():
        t = {k: median_time(f, repeat=args.repeat) * 1e6 for k, f in fns.items()}
        row = dict(case=name, **{f"{k}_us": round(v, 2) for k, v in t.items()})
        row["engine_over_numpy"] = round(t["engine"] / t["numpy"], 2)
        tt = t.get("torch")
        if tt:
            row["engine_over_torch"] = round(t["engine"] / tt, 2)
        rows.append(row)
        print(f"{name:28s} {t['numpy']:9.1f} {t['engine']:10.1f} {t['engine'] - t['numpy']:12.1f} "
              f"{t['engine'] / t['numpy']:13.2f} {tt or float('nan'):9.1f} "
              f"{(t['engine'] / tt) if tt else float('nan'):13.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
