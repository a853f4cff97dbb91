"""nn.train: exact resume, jit == eager, logs, evaluation, checkpoints, argument checks."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import engine as eg
from engine import nn
from nn.training import plot_losses, read_log, step_seed

V, T, B = 16, 8, 6


def _model(capturable: bool = False, tensor_lr: bool = False, dropout: float = 0.2):
    eg.manual_seed(123)
    m = nn.CausalLM(V, d_model=16, nhead=2, num_layers=1, dim_feedforward=32, dropout=dropout,
                    max_len=T)
    lr = eg.tensor(1e-2) if tensor_lr else 1e-2
    opt = nn.optim.AdamW(m.parameters(), lr=lr, capturable=capturable)
    sched = nn.optim.WarmupCosineLR(opt, warmup_steps=4, total_steps=30)
    return m, opt, sched


def _batch(i: int):
    """Deterministic in the step: a repeated pattern plus noise, so the loss falls."""
    r = np.random.default_rng([7, i])
    start = r.integers(0, V, (B, 1))
    x = (start + np.arange(T + 1)) % V
    return eg.tensor(x[:, :-1]), eg.tensor(x[:, 1:])


def _loss(m, b):
    x, y = b
    return nn.functional.cross_entropy(m(x).reshape(-1, V), y.reshape(-1))


def _losses(records):
    return [r["loss"] for r in records]


def test_loss_falls_and_records_have_the_documented_fields(tmp_path):
    m, opt, sched = _model()
    hist = nn.train(m, opt, _batch, _loss, steps=30, scheduler=sched, clip_norm=1.0,
                    print_every=0, tokens_fn=lambda b: b[0].shape[0] * b[0].shape[1])
    assert [r["step"] for r in hist] == list(range(1, 31))
    assert all({"loss", "lr", "grad_norm", "tokens", "elapsed_s"} <= set(r) for r in hist)
    assert hist[0]["lr"] == 0.0 and hist[4]["lr"] == pytest.approx(1e-2)   # lr used by the update
    assert np.mean(_losses(hist[-5:])) < 0.6 * np.mean(_losses(hist[:3]))


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("log_name", ["log.jsonl", "log.csv"])
def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tmp_path, log_name):
    m, opt, sched = _model(dropout=0.2)       # dropout: the random stream must resume too
    full = nn.train(m, opt, _batch, _loss, steps=24, scheduler=sched, print_every=0,
                    log=str(tmp_path / ("full_" + log_name)))
    final = [p.numpy().copy() for p in m.parameters()]

    def crashing(i: int):
        if i == 17:
            raise _Interrupt
        return _batch(i)
    ckpt, log = str(tmp_path / "run.npz"), str(tmp_path / log_name)
    m, opt, sched = _model(dropout=0.2)
    with pytest.raises(_Interrupt):
        nn.train(m, opt, crashing, _loss, steps=24, scheduler=sched, checkpoint=ckpt,
                 checkpoint_every=5, log=log, print_every=0)
    assert [r["step"] for r in read_log(log)][-1] == 17        # logged past the checkpoint at 15
    eg.manual_seed(999)                                          # another process, other state
    m2 = nn.CausalLM(V, d_model=16, nhead=2, num_layers=1, dim_feedforward=32, dropout=0.2,
                     max_len=T)
    opt2 = nn.optim.AdamW(m2.parameters(), lr=1e-2)
    sched2 = nn.optim.WarmupCosineLR(opt2, warmup_steps=4, total_steps=30)
    rest = nn.train(m2, opt2, _batch, _loss, steps=24, scheduler=sched2, checkpoint=ckpt,
                    checkpoint_every=5, resume=True, log=log, print_every=0)
    assert [r["step"] for r in rest] == list(range(16, 25))
    assert _losses(read_log(log)) == _losses(full)               # bit for bit, eager on CPU
    assert [r["lr"] for r in read_log(log)] == pytest.approx([r["lr"] for r in full])
    for p, q in zip(m2.parameters(), final):
        np.testing.assert_array_equal(p.numpy(), q)


def test_resume_without_a_checkpoint_starts_fresh_and_a_finished_run_does_nothing(tmp_path):
    ckpt = str(tmp_path / "c.npz")
    m, opt, sched = _model()
    first = nn.train(m, opt, _batch, _loss, steps=3, scheduler=sched, checkpoint=ckpt,
                     resume=True, print_every=0)
    assert [r["step"] for r in first] == [1, 2, 3] and os.path.exists(ckpt)
    assert nn.train(m, opt, _batch, _loss, steps=3, scheduler=sched, checkpoint=ckpt,
                    resume=True, print_every=0) == []
    with pytest.raises(ValueError, match="seed"):
        nn.train(m, opt, _batch, _loss, steps=5, scheduler=sched, checkpoint=ckpt, resume=True,
                 seed=1, print_every=0)


def test_jit_step_gives_the_eager_losses():
    m, opt, sched = _model(capturable=True, tensor_lr=True, dropout=0.1)
    eager = nn.train(m, opt, _batch, _loss, steps=12, scheduler=sched, clip_norm=0.5,
                     print_every=0)
    m, opt, sched = _model(capturable=True, tensor_lr=True, dropout=0.1)
    jitted = nn.train(m, opt, _batch, _loss, steps=12, scheduler=sched, clip_norm=0.5,
                      print_every=0, jit=True)
    np.testing.assert_allclose(_losses(jitted), _losses(eager), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose([r["grad_norm"] for r in jitted],
                               [r["grad_norm"] for r in eager], rtol=2e-4)
    assert _losses(eager)[-1] < _losses(eager)[0] - 0.3


def test_jit_refuses_state_it_would_freeze():
    m, opt, sched = _model(capturable=False, tensor_lr=True)
    with pytest.raises(ValueError, match="capturable"):
        nn.train(m, opt, _batch, _loss, steps=2, scheduler=sched, jit=True, print_every=0)
    m, opt, sched = _model(capturable=True, tensor_lr=False)
    with pytest.raises(ValueError, match="lr=eg.tensor"):
        nn.train(m, opt, _batch, _loss, steps=2, scheduler=sched, jit=True, print_every=0)


def test_eval_checkpoint_and_print_cadence(tmp_path, capsys):
    calls = []

    def evaluate(model):
        calls.append(model.training)
        model.eval()
        return {"val_loss": 1.5, "acc": 0.25}
    m, opt, sched = _model()
    log = str(tmp_path / "l.jsonl")
    hist = nn.train(m, opt, _batch, _loss, steps=10, scheduler=sched, eval_fn=evaluate,
                    eval_every=4, checkpoint=str(tmp_path / "c.npz"), checkpoint_every=4,
                    log=log, print_every=5)
    assert calls == [True, True, True]                       # steps 4, 8 and the last (10)
    assert [r["step"] for r in hist if "val_loss" in r] == [4, 8, 10]
    assert m.training                                        # back in train mode after eval
    assert nn.load(str(tmp_path / "c.npz"), m, opt)["step"] == 10
    out = capsys.readouterr().out
    assert "step  5/10" in out and "step 10/10" in out and "eval @ 8: val_loss 1.5000" in out
    assert "ETA" in out and "steps/s" in out
    lines = open(log).read().splitlines()
    assert len(lines) == 10 and json.loads(lines[3])["acc"] == 0.25


def test_csv_log_widens_its_header_when_eval_metrics_appear(tmp_path):
    m, opt, sched = _model()
    log = str(tmp_path / "l.csv")
    nn.train(m, opt, _batch, _loss, steps=4, scheduler=sched, eval_fn=lambda _: {"val_loss": 2.0},
             eval_every=2, log=log, print_every=0)
    rows = read_log(log)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r.get("val_loss") for r in rows] == [None, 2.0, None, 2.0]
    assert open(log).readline().strip().split(",")[-1] == "val_loss"


def test_plot_losses_writes_a_png_when_matplotlib_is_present(tmp_path):
    log = tmp_path / "l.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 3.0 / s, **({"val_loss": 2.0 / s} if s % 2 == 0 else {})}) + "\n"
                           for s in range(1, 7)))
    png = tmp_path / "l.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert plot_losses(str(log), str(png)) is False and not png.exists()
        return
    assert plot_losses(str(log), str(png), baselines={"unigram": 2.5}) is True
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_seeds_differ_and_bad_arguments_are_refused():
    assert len({step_seed(0, i) for i in range(1000)}) == 1000
    assert step_seed(0, 5) != step_seed(1, 5)
    m, opt, _ = _model()
    with pytest.raises(ValueError, match="checkpoint path"):
        nn.train(m, opt, _batch, _loss, steps=2, checkpoint_every=1)
    with pytest.raises(ValueError, match="resume"):
        nn.train(m, opt, _batch, _loss, steps=2, resume=True)
    with pytest.raises(ValueError, match=">= 0"):
        nn.train(m, opt, _batch, _loss, steps=-1)
