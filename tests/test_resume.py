"""nn.train resumed from a checkpoint is bit-identical to the uninterrupted run: every
optimizer, with a schedule, clipping and evaluation, eager and jit."""
from __future__ import annotations

import numpy as np
import pytest

import engine as eg
from engine import nn

V, T, B, STEPS, CRASH_AT = 12, 6, 4, 8, 6


def _batch(i: int):
    r = np.random.default_rng([11, i])
    x = (r.integers(0, V, (B, 1)) + np.arange(T + 1)) % V
    return eg.tensor(x[:, :-1]), eg.tensor(x[:, 1:])


def _loss(m, b):
    x, y = b
    return nn.functional.cross_entropy(m(x).reshape(-1, V), y.reshape(-1))


def _evaluate(m):
    with eg.no_grad():
        return {"val_loss": float(_loss(m, _batch(1000)).item())}


def _build(optimizer: str, dropout: float, init_seed: int = 5):
    eg.manual_seed(init_seed)
    m = nn.CausalLM(V, d_model=8, nhead=2, num_layers=1, dim_feedforward=16, dropout=dropout,
                    max_len=T)
    lr = eg.tensor(0.05)
    if optimizer == "sgd":
        opt = nn.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
        sched = nn.optim.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    elif optimizer == "adam":
        opt = nn.optim.Adam(m.parameters(), lr=lr, capturable=True)
        sched = nn.optim.NoamLR(opt, d_model=8, warmup_steps=3)
    else:
        opt = nn.optim.AdamW(m.parameters(), lr=lr, capturable=True)
        sched = nn.optim.WarmupCosineLR(opt, warmup_steps=2, total_steps=STEPS)
    return m, opt, sched


class _Crash(Exception):
    pass


def _run(tmp_path, optimizer: str, jit: bool, dropout: float):
    kwargs = dict(steps=STEPS, clip_norm=0.5, eval_fn=_evaluate, eval_every=3, print_every=0,
                  jit=jit)
    m, opt, sched = _build(optimizer, dropout)
    full = nn.train(m, opt, _batch, _loss, scheduler=sched, **kwargs)
    final = [p.numpy().copy() for p in m.parameters()]

    def crashing(i: int):
        if i == CRASH_AT:
            raise _Crash
        return _batch(i)
    ckpt = str(tmp_path / "run.npz")
    m, opt, sched = _build(optimizer, dropout)
    with pytest.raises(_Crash):
        nn.train(m, opt, crashing, _loss, scheduler=sched, checkpoint=ckpt, checkpoint_every=4,
                 **kwargs)
    eg.manual_seed(999)                       # a fresh process: other weights, other stream
    m, opt, sched = _build(optimizer, dropout, init_seed=77)
    rest = nn.train(m, opt, _batch, _loss, scheduler=sched, checkpoint=ckpt, resume=True,
                    **kwargs)
    assert [r["step"] for r in rest] == list(range(5, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "val_loss"):
        assert [r.get(key) for r in rest] == [r.get(key) for r in full[4:]], key
    for p, q in zip(m.parameters(), final):
        np.testing.assert_array_equal(p.numpy(), q)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_resume_is_bit_identical_without_dropout(tmp_path, optimizer, jit):
    _run(tmp_path, optimizer, jit, dropout=0.0)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_resume_is_bit_identical_with_dropout(tmp_path, jit):
    _run(tmp_path, "adamw", jit, dropout=0.3)
