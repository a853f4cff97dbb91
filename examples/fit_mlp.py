"""Fit a tiny MLP to a noisy sine with plain SGD: the smallest end-to-end use of the engine.

    python examples/fit_mlp.py --steps 2000
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

import engine as eg


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = ap.parse_args(argv)
    dev = args.device

    rng = np.random.default_rng(args.seed)
    x = rng.uniform(-math.pi, math.pi, (256, 1)).astype(np.float32)
    y = np.sin(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
    X, Y = eg.tensor(x, device=dev), eg.tensor(y, device=dev)

    h = args.hidden
    w1 = eg.tensor(rng.standard_normal((1, h)), dtype=eg.float32, device=dev, requires_grad=True)
    b1 = eg.zeros(h, device=dev, requires_grad=True)
    w2 = eg.tensor(rng.standard_normal((h, 1)) / math.sqrt(h), dtype=eg.float32, device=dev,
                   requires_grad=True)
    b2 = eg.zeros(1, device=dev, requires_grad=True)
    params = [w1, b1, w2, b2]

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        pred = eg.tanh(X @ w1 + b1) @ w2 + b2
        loss = ((pred - Y) ** 2).mean()
        loss.backward()
        with eg.no_grad():
            for p in params:
                p -= args.lr * p.grad
                p.grad = None
        if step % max(1, args.steps // 10) == 0 or step == 1:
            print(f"step {step:5d}  mse {loss.item():.5f}")
    print(f"done in {time.perf_counter() - start:.2f}s; final mse {loss.item():.5f} "
          f"(noise floor {0.05 ** 2:.4f})")
    return loss.item()


if __name__ == "__main__":
    main()
