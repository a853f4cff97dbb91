"""The benchmark Transformer in plain PyTorch, written from the spec (the oracle the
engine's loss must match, and the eager baseline it is timed against)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .spec import BETAS, EPS, LR, WEIGHT_DECAY, Config, positional_encoding


def build(cfg: Config, params: dict[str, np.ndarray], batch: dict[str, np.ndarray],
          device: str = "cpu", compile: bool = False) -> tuple[Any, Any]:
    """(step, parameters): `step()` runs forward, loss, backward, AdamW and returns the loss;
    with `compile`, forward and loss run through torch.compile (backward by AOTAutograd)."""
    import torch
    F = torch.nn.functional
    P = {k: torch.tensor(v, device=device, requires_grad=True) for k, v in params.items()}
    data = {k: torch.tensor(v, device=device) for k, v in batch.items()}
    pe = torch.tensor(positional_encoding(cfg.seq, cfg.d), device=device)
    h, d = cfg.heads, cfg.d
    causal = torch.triu(torch.full((cfg.seq, cfg.seq), float("-inf"), device=device), diagonal=1)

    def linear(x: Any, name: str) -> Any:
        return x @ P[f"{name}.w"] + P[f"{name}.b"]

    def norm(x: Any, name: str) -> Any:
        return F.layer_norm(x, (d,), P[f"{name}.g"], P[f"{name}.b"], eps=1e-5)

    def heads(x: Any) -> Any:
        B, T, _ = x.shape
        return x.view(B, T, h, d // h).transpose(1, 2)

    def mha(x: Any, mem: Any, name: str, mask: Any) -> Any:
        q, k, v = heads(linear(x, f"{name}.q")), heads(linear(mem, f"{name}.k")), heads(linear(mem, f"{name}.v"))
        s = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        if mask is not None:
            s = s + mask
        o = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(x.shape)
        return linear(o, f"{name}.o")

    def ffn(x: Any, name: str) -> Any:
        return linear(torch.relu(linear(x, f"{name}.ff1")), f"{name}.ff2")

    def embed(tok: Any) -> Any:
        return P["emb"][tok] * math.sqrt(d) + pe[: tok.shape[1]]

    def loss_fn() -> Any:
        if cfg.kind == "encdec":
            x = embed(data["src"])
            for i in range(cfg.layers):
                x = norm(x + mha(x, x, f"enc{i}.self", None), f"enc{i}.ln1")
                x = norm(x + ffn(x, f"enc{i}"), f"enc{i}.ln2")
            y = embed(data["tgt_in"])
            for i in range(cfg.layers):
                y = norm(y + mha(y, y, f"dec{i}.self", causal), f"dec{i}.ln1")
                y = norm(y + mha(y, x, f"dec{i}.cross", None), f"dec{i}.ln2")
                y = norm(y + ffn(y, f"dec{i}"), f"dec{i}.ln3")
            target = data["tgt_out"]
        else:
            y = embed(data["inp"])
            for i in range(cfg.layers):
                y = norm(y + mha(y, y, f"blk{i}.self", causal), f"blk{i}.ln1")
                y = norm(y + ffn(y, f"blk{i}"), f"blk{i}.ln2")
            target = data["tgt"]
        logits = y @ P["emb"].T
        return F.cross_entropy(logits.reshape(-1, cfg.vocab), target.reshape(-1))

    if compile:
        loss_fn = torch.compile(loss_fn)
    opt = torch.optim.AdamW(list(P.values()), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss.item()
    return step, P
