"""The benchmark training step, data-parallel: the canonical global batch split over the
processes mpiexec starts, gradients averaged by nn.DistributedDataParallel.

    mpiexec -n 2 python -m benchmarks.data_parallel --config base [--jit] [--steps 20]

Rank 0 prints ms per step (median), the time per step spent inside collectives
(waiting for the other rank included), and tokens per second of the global batch.
Each process uses one thread (BLAS and the engine's kernels), so N processes use N cores.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

import engine as eg
from engine import nn

from .engine_model import build_model, spec_name
from .spec import BETAS, CONFIGS, EPS, LR, WEIGHT_DECAY, canonical_batch, canonical_params


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="base", choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=20, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--jit", action="store_true")
    args = ap.parse_args(argv)
    eg.set_num_threads(1)
    group = eg.distributed.init()
    cfg = CONFIGS[args.config]
    model = build_model(cfg)
    params = canonical_params(cfg)
    model.load_state_dict({n: params[spec_name(n)] for n, _ in model.named_parameters()})
    ddp = nn.DistributedDataParallel(model)
    opt = nn.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS,
                         weight_decay=WEIGHT_DECAY, capturable=args.jit)
    k = cfg.batch // group.size
    batch = {n: eg.tensor(v[group.rank * k:(group.rank + 1) * k]) for n, v in canonical_batch(cfg).items()}
    tokens = cfg.batch * cfg.seq * (2 if cfg.kind == "encdec" else 1)

    def step(data: dict) -> eg.Tensor:
        out = ddp(data["src"], data["tgt_in"]) if cfg.kind == "encdec" else ddp(data["inp"])
        loss = nn.functional.cross_entropy(out, data["tgt_out"] if cfg.kind == "encdec" else data["tgt"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    compiled = eg.jit(step) if args.jit else step
    times, comm = [], []
    for i in range(args.steps + 2):
        c0, t0 = group.comm_seconds, time.perf_counter()
        loss = (step if i == 0 else compiled)(batch).item()
        if i >= 2:
            times.append(time.perf_counter() - t0)
            comm.append(group.comm_seconds - c0)
    ms = float(np.median(times)) * 1e3
    result = {"config": cfg.name, "processes": group.size, "jit": args.jit, "ms_per_step": round(ms, 2),
              "comm_ms_per_step": round(float(np.median(comm)) * 1e3, 2),
              "tokens_per_s": round(tokens / (ms / 1e3)), "buckets": len(ddp.buckets),
              "last_loss": loss}
    if group.rank == 0:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
