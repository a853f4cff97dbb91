"""The benchmark Transformer built from the engine's `nn` modules, loaded with the
canonical parameters: eager and jit-compiled training steps."""
from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np

import engine as eg
from engine import nn

from .spec import BETAS, EPS, LR, WEIGHT_DECAY, Config


def spec_name(name: str) -> str:
    """Our parameter name -> the spec's (a renaming: same order, same (in, out) layout)."""
    if name.endswith("token.weight"):
        return "emb"
    name = re.sub(r"transformer\.encoder\.layers\.(\d+)", r"enc\1", name)
    name = re.sub(r"transformer\.decoder\.layers\.(\d+)", r"dec\1", name)
    name = re.sub(r"^layers\.(\d+)", r"blk\1", name)
    for a, b in [("self_attn", "self"), ("multihead_attn", "cross"), ("linear1", "ff1"),
                 ("linear2", "ff2"), ("norm", "ln")]:
        name = name.replace(a, b)
    stem, kind = name.rsplit(".", 1)
    return f"{stem}.{ {'weight': 'g' if '.ln' in name else 'w', 'bias': 'b'}[kind] }"


def build_model(cfg: Config, device: str = "cpu") -> nn.Module:
    if cfg.kind == "encdec":
        return nn.Seq2SeqTransformer(cfg.vocab, d_model=cfg.d, nhead=cfg.heads,
                                     num_encoder_layers=cfg.layers, num_decoder_layers=cfg.layers,
                                     dim_feedforward=cfg.d_ff, dropout=0.0, device=device)
    return nn.CausalLM(cfg.vocab, d_model=cfg.d, nhead=cfg.heads, num_layers=cfg.layers,
                       dim_feedforward=cfg.d_ff, dropout=0.0, max_len=max(cfg.seq, 512),
                       device=device)


def build(cfg: Config, params: dict[str, np.ndarray], batch: dict[str, np.ndarray],
          device: str = "cpu", jit: bool = False) -> tuple[Callable[[], float], nn.Module]:
    """(step, model): `step()` runs forward, loss, backward, AdamW and returns the loss."""
    model = build_model(cfg, device)
    model.load_state_dict({n: params[spec_name(n)] for n, _ in model.named_parameters()})
    model.to(device)
    opt = nn.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                         capturable=jit)
    data = {k: eg.tensor(v, device=device) for k, v in batch.items()}
    loss_fn = nn.functional.cross_entropy

    def train_step(data: dict) -> Any:
        opt.zero_grad()
        if cfg.kind == "encdec":
            loss = loss_fn(model(data["src"], data["tgt_in"]), data["tgt_out"])
        else:
            loss = loss_fn(model(data["inp"]), data["tgt"])
        loss.backward()
        opt.step()
        return loss

    compiled = eg.jit(train_step) if jit else train_step

    def step() -> float:
        return compiled(data).item()
    step.compiled = compiled if jit else None       # stats() says whether it runs as a CUDA graph
    return step, model
