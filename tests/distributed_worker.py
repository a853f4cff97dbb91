"""One rank of the data-parallel tests (tests/test_distributed.py starts it with mpiexec).

    python -m tests.distributed_worker CASE OUT_DIR

Cases: "ddp" (eager and jit DDP steps, then nn.train(distributed=True) with a
checkpoint), "resume" (nn.train resuming that checkpoint), "raise" (rank 1 fails
before a collective), "stuck" (rank 1 never reaches it).
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import engine as eg  # noqa: E402
from engine import distributed as dist  # noqa: E402
from engine import nn  # noqa: E402

B, D, H = 8, 5, 7          # the global batch: 8 rows, so 2 processes take 4 each


def _model(seed: int):
    eg.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, 3))


def _batch(i: int):
    r = np.random.default_rng([3, i])
    return eg.tensor(r.standard_normal((B, D)).astype(np.float32)), eg.tensor(r.integers(0, 3, B))


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _shard(batch, rank, size):
    k = B // size
    return tuple(t[rank * k:(rank + 1) * k] for t in batch)


def _train_ddp(group, jit: bool) -> list[np.ndarray]:
    model = _model(seed=group.rank)               # differs per rank until DDP broadcasts
    ddp = nn.DistributedDataParallel(model, bucket_cap_mb=1e-4)   # several buckets
    opt = nn.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)   # sees the gradient's scale

    def step(batch):
        loss = _loss(ddp, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    compiled = eg.jit(step) if jit else step
    for i in range(6):
        (step if i == 0 else compiled)(_shard(_batch(i), group.rank, group.size))
    assert len(ddp.buckets) > 1
    return [p.numpy() for p in model.parameters()]


def case_ddp(group, out: str) -> None:
    eager = _train_ddp(group, jit=False)
    jitted = _train_ddp(group, jit=True)
    model = _model(seed=10 + group.rank)
    opt = nn.optim.Adam(model.parameters(), lr=0.05)
    hist = nn.train(model, opt, _batch, _loss, steps=4, print_every=0, distributed=True,
                    checkpoint=os.path.join(out, "run.npz"), log=os.path.join(out, "run.jsonl"))
    np.savez(os.path.join(out, f"ddp_{group.size}_{group.rank}.npz"),
             *eager, *[j for j in jitted], *[p.numpy() for p in model.parameters()],
             losses=np.array([r["loss"] for r in hist]), comm=np.array(group.comm_seconds))


def case_resume(group, out: str) -> None:
    model = _model(seed=10 + group.rank)         # rank 0 of the "ddp" case started from seed 10
    opt = nn.optim.Adam(model.parameters(), lr=0.05)
    nn.train(model, opt, _batch, _loss, steps=8, print_every=0, distributed=True,
             checkpoint=os.path.join(out, "run.npz"), resume=True)
    np.savez(os.path.join(out, f"resume_{group.size}_{group.rank}.npz"),
             *[p.numpy() for p in model.parameters()])


def case_raise(group, out: str) -> None:
    if group.rank == 1:
        raise ValueError("the data for rank 1 could not be read")
    dist.all_reduce(eg.ones(3))


def case_stuck(group, out: str) -> None:
    if group.rank == 1:
        time.sleep(120)
    dist.all_reduce(eg.ones(3))


if __name__ == "__main__":
    case, out = sys.argv[1], sys.argv[2]
    group = dist.init("mpi", timeout=float(os.environ.get("ENGINE_TEST_TIMEOUT", "60")))
    globals()[f"case_{case}"](group, out)
