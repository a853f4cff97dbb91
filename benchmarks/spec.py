"""The benchmark workload (described in benchmarks/README.md): configs, the
canonical parameters and batch, FLOPs per step, and the NumPy matmul floor."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Config:
    name: str
    kind: str            # "encdec" | "lm"
    d: int
    heads: int
    d_ff: int
    layers: int
    vocab: int
    seq: int
    batch: int
    params: int
    step_flops: int


CONFIGS = {
    "small": Config("small", "encdec", 64, 4, 256, 1, 64, 16, 8, 120_832, 95_944_704),
    "base": Config("base", "encdec", 128, 4, 512, 2, 64, 32, 32, 933_888, 5_989_466_112),
    "medium": Config("medium", "lm", 256, 4, 1024, 4, 96, 128, 16, 3_183_616, 42_177_921_024),
}

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 0.01


def _linear(rng: np.random.Generator, name: str, n_in: int, n_out: int, out: dict) -> None:
    bound = 1 / math.sqrt(n_in)
    out[f"{name}.w"] = rng.uniform(-bound, bound, (n_in, n_out))
    out[f"{name}.b"] = np.zeros(n_out)


def _attention(rng: np.random.Generator, name: str, d: int, out: dict) -> None:
    for p in "qkvo":
        _linear(rng, f"{name}.{p}", d, d, out)


def _norm(name: str, d: int, out: dict) -> None:
    out[f"{name}.g"] = np.ones(d)
    out[f"{name}.b"] = np.zeros(d)


def canonical_params(cfg: Config) -> dict[str, np.ndarray]:
    """Parameters drawn with default_rng(0) in the spec's order, cast to float32."""
    rng = np.random.default_rng(0)
    d, f = cfg.d, cfg.d_ff
    p: dict = {"emb": rng.standard_normal((cfg.vocab, d)) * d ** -0.5}
    if cfg.kind == "encdec":
        for i in range(cfg.layers):
            _attention(rng, f"enc{i}.self", d, p)
            _norm(f"enc{i}.ln1", d, p)
            _linear(rng, f"enc{i}.ff1", d, f, p)
            _linear(rng, f"enc{i}.ff2", f, d, p)
            _norm(f"enc{i}.ln2", d, p)
        for i in range(cfg.layers):
            _attention(rng, f"dec{i}.self", d, p)
            _norm(f"dec{i}.ln1", d, p)
            _attention(rng, f"dec{i}.cross", d, p)
            _norm(f"dec{i}.ln2", d, p)
            _linear(rng, f"dec{i}.ff1", d, f, p)
            _linear(rng, f"dec{i}.ff2", f, d, p)
            _norm(f"dec{i}.ln3", d, p)
    else:
        for i in range(cfg.layers):
            _attention(rng, f"blk{i}.self", d, p)
            _norm(f"blk{i}.ln1", d, p)
            _linear(rng, f"blk{i}.ff1", d, f, p)
            _linear(rng, f"blk{i}.ff2", f, d, p)
            _norm(f"blk{i}.ln2", d, p)
    return {k: v.astype(np.float32) for k, v in p.items()}


def canonical_batch(cfg: Config) -> dict[str, np.ndarray]:
    """The one fixed batch every step trains on (default_rng(1))."""
    rng = np.random.default_rng(1)
    B, T, V = cfg.batch, cfg.seq, cfg.vocab
    if cfg.kind == "encdec":
        src = rng.integers(1, V, size=(B, T))
        tgt_out = src[:, ::-1].copy()
        tgt_in = np.concatenate([np.zeros((B, 1), np.int64), tgt_out[:, :-1]], axis=1)
        return dict(src=src, tgt_in=tgt_in, tgt_out=tgt_out)
    seq = rng.integers(0, V, size=(B, T + 1))
    return dict(inp=seq[:, :-1].copy(), tgt=seq[:, 1:].copy())


def positional_encoding(length: int, d: int) -> np.ndarray:
    pos = np.arange(length, dtype=np.float64)[:, None]
    i = np.arange(0, d, 2, dtype=np.float64)[None, :]
    angle = pos / np.power(10000.0, i / d)
    pe = np.zeros((length, d))
    pe[:, 0::2], pe[:, 1::2] = np.sin(angle), np.cos(angle)
    return pe.astype(np.float32)


def matmul_shapes(cfg: Config) -> list[tuple[tuple, tuple]]:
    """Every matmul of one training step, forward and backward (dA = dY B^T, dB = A^T dY)."""
    B, T, d, F, V, h = cfg.batch, cfg.seq, cfg.d, cfg.d_ff, cfg.vocab, cfg.heads
    dk = d // h
    fwd: list = []

    def attention(tq: int, tk: int) -> None:
        fwd.extend([((B * tq, d), (d, d))] * 2 + [((B * tk, d), (d, d))] * 2)   # q, o | k, v
        fwd.append(((B, h, tq, dk), (B, h, dk, tk)))
        fwd.append(((B, h, tq, tk), (B, h, tk, dk)))

    def ffn(t: int) -> None:
        fwd.extend([((B * t, d), (d, F)), ((B * t, F), (F, d))])

    if cfg.kind == "encdec":
        for _ in range(cfg.layers):
            attention(T, T)
            ffn(T)
        for _ in range(cfg.layers):
            attention(T, T)
            attention(T, T)
            ffn(T)
    else:
        for _ in range(cfg.layers):
            attention(T, T)
            ffn(T)
    fwd.append(((B * T, d), (d, V)))
    out = []
    for a, b in fwd:
        y = a[:-1] + b[-1:]
        out.append((a, b))
        out.append((y, b[:-2] + (b[-1], b[-2])))                    # dA = dY @ B^T
        out.append((a[:-2] + (a[-1], a[-2]), y))                    # dB = A^T @ dY
    return out


def step_flops(cfg: Config) -> int:
    """Matmul FLOPs of one training step, from the shapes above (checks the spec's table)."""
    total = 0
    for a, b in matmul_shapes(cfg):
        batch = int(np.prod(a[:-2])) if len(a) > 2 else 1
        total += 2 * batch * a[-2] * a[-1] * b[-1]
    return total
