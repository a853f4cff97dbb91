"""CUDA graphs for compiled programs (engine/compiler/capture.py, backends/cuda_graphs.py).

On the emulated device of tests/test_cuda.py a stream capture records launches and
copies with the memory and scalars they were recorded with and `Graph.launch` runs
them again, so stale static buffers, baked random counters and results overwritten
by a later replay give wrong numbers here as they would on a GPU. With CuPy and a
GPU the same tests run on the real device.
"""
from __future__ import annotations

import numpy as np
import pytest

import backends
import engine as eg
from backends import cuda_graphs
from engine import nn
from tests import test_cuda_codegen as codegen
from tests.test_cuda import DevArray, cuda, emulated_backend, fake_cupy  # noqa: F401 (fixtures)


def _graph_status(compiled) -> dict:
    return next(s for s in compiled.stats() if s["name"] == "cuda_graphs")


def _launches(device_backend) -> int:
    """Graph launches so far on the emulated device (the real one: -1, not counted)."""
    return getattr(device_backend.cp, "graph_launches", -1)


def test_replays_read_new_arguments_and_results_stay_the_callers(cuda, rng):
    """Each call's arguments reach the replay (copied into the graph's static buffers,
    the caller's arrays untouched), and a result the caller holds is never overwritten
    by a later replay."""
    def f(x, w):
        y = (x @ w).tanh() * 2.0
        return y, y.sum()

    compiled = eg.jit(f)
    w = eg.tensor(rng.standard_normal((4, 3)), device=cuda)
    xs = [rng.standard_normal((5, 4)) for _ in range(4)]
    held = []
    be = w._backend
    before = _launches(be)
    for a in xs:
        x = eg.tensor(a, device=cuda)
        held.append((x, compiled(x, w)))
    status = _graph_status(compiled)
    assert status["captured"] and status["replays"] == 3, status
    for a, (x, (y, s)) in zip(xs, held):
        want = np.tanh(a @ w.numpy()) * 2.0
        np.testing.assert_allclose(y.numpy(), want, rtol=1e-12)
        np.testing.assert_allclose(s.item(), want.sum(), rtol=1e-12)
        np.testing.assert_array_equal(x.numpy(), a)
    if before >= 0:                        # the emulation counts the graph launches
        assert _launches(be) - before == 3


def test_dropout_masks_are_new_each_replay_and_follow_eager(cuda):
    """The Philox counter is an input of the graph: replays draw new masks, the same
    ones eager draws in the same order, and a new seed (a new key) is seen."""
    def f(x):
        return eg.dropout(x, p=0.5) * 3.0

    x = eg.ones(64, device=cuda)
    eager, jitted = [], []
    compiled = eg.jit(f)
    for run, out in ((f, eager), (compiled, jitted)):
        eg.manual_seed(7)
        out += [run(x).numpy() for _ in range(4)]
        eg.manual_seed(8)
        out += [run(x).numpy() for _ in range(2)]
    assert _graph_status(compiled)["captured"]
    for e, j in zip(eager, jitted):
        np.testing.assert_array_equal(j, e)
    masks = {tuple(m != 0) for m in jitted}
    assert len(masks) == len(jitted), "a replay repeated an earlier dropout mask"


def _train(cuda, use_jit, graphs=True, steps=4):
    eg.manual_seed(0)
    model = nn.CausalLM(11, 16, 2, 1, 32, dropout=0.1).to(cuda)
    opt = nn.optim.AdamW(model.parameters(), lr=1e-2, capturable=use_jit)
    tokens = np.random.default_rng(3).integers(0, 11, (2, 7))
    inp, tgt = eg.tensor(tokens[:, :-1], device=cuda), eg.tensor(tokens[:, 1:], device=cuda)

    def step(inp, tgt):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(inp), tgt)
        loss.backward()
        opt.step()
        return loss

    run = eg.jit(step, cuda_graphs=graphs) if use_jit else step
    losses = [run(inp, tgt).item() for _ in range(steps)]
    return losses, {k: v.numpy() for k, v in model.state_dict().items()}, run


def test_graphed_training_step_with_dropout_equals_eager(cuda):
    """A whole step (dropout, backward, AdamW) replayed from a graph leaves the state
    eager leaves; parameters and optimizer state are updated in their own arrays."""
    eager_losses, eager_state, _ = _train(cuda, False)
    plain_losses, plain_state, _ = _train(cuda, True, graphs=False)
    losses, state, compiled = _train(cuda, True)
    status = _graph_status(compiled)
    assert status["captured"] and status["replays"] >= 2 and status["recaptures"] == 0, status
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-5)
    assert losses == plain_losses                   # the same kernels on the same values
    for name, value in eager_state.items():
        np.testing.assert_array_equal(state[name], plain_state[name], err_msg=name)
        if name.endswith("k.bias"):
            # softmax ignores a key bias: its gradient is rounding noise that Adam scales to
            # full steps of lr, bounded rather than equal (as in the other jit tests)
            assert np.abs(state[name] - value).max() <= 2 * 4 * 1e-2 + 1e-6, name
            continue
        np.testing.assert_allclose(state[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_gradients_accumulate_across_replays_like_eager(cuda):
    """Captured gradients (.grad read and replaced each call) are copied into the
    graph's buffers: accumulation continues across replays."""
    w = eg.tensor(np.ones(3), device=cuda, requires_grad=True)

    def f(x):
        loss = (w * x).sum()
        loss.backward()
        return loss

    x = eg.tensor(np.arange(3.0), device=cuda)
    compiled = eg.jit(f)
    losses = [compiled(x) for _ in range(5)]
    np.testing.assert_allclose(w.grad.numpy(), 5 * np.arange(3.0))
    assert [loss.item() for loss in losses] == [3.0] * 5
    assert _graph_status(compiled)["captured"]
    if isinstance(x._data, DevArray):       # a kept loss does not keep a gradient block alive
        assert _memory(losses[-1]._data.a) is not _memory(w.grad._data.a)


def _memory(a: np.ndarray) -> np.ndarray:
    while a.base is not None:
        a = a.base
    return a


def test_a_rebound_captured_tensor_is_recorded_again(cuda, rng):
    w = eg.tensor(rng.standard_normal(4), device=cuda)

    def f(x):
        return x * w

    compiled = eg.jit(f)
    x = eg.tensor(np.ones(4), device=cuda)
    for _ in range(3):
        compiled(x)
    new = rng.standard_normal(4)
    w._data = w._backend.asarray(new)          # the tensor now holds other memory
    np.testing.assert_allclose(compiled(x).numpy(), new)
    status = _graph_status(compiled)
    assert status["captured"] and status["recaptures"] == 1, status


def test_opting_out_and_uncapturable_programs_launch_plainly(cuda, monkeypatch, capsys):
    def f(x):
        return (x * 2).sum()

    x = eg.tensor(np.arange(4.0), device=cuda)
    off = eg.jit(f, cuda_graphs=False)
    for _ in range(3):
        assert off(x).item() == 12.0
    assert "turned off" in _graph_status(off)["reason"]
    monkeypatch.setenv("ENGINE_CUDA_GRAPHS", "0")
    env_off = eg.jit(f)
    env_off(x)
    assert not _graph_status(env_off)["captured"]
    monkeypatch.delenv("ENGINE_CUDA_GRAPHS")

    identity = eg.jit(lambda t: t)
    for _ in range(3):
        assert identity(x) is x or np.array_equal(identity(x).numpy(), x.numpy())
    assert "launches nothing" in _graph_status(identity)["reason"]

    # a backend function that reads a device value on the host while running
    be = x._backend
    real_sum = be.sum
    monkeypatch.setattr(be, "sum", lambda a, axis, keepdims: (a.item() if a.size == 1 else None,
                                                              real_sum(a, axis, keepdims))[1])
    monkeypatch.setenv("ENGINE_DEBUG", "1")
    syncing = eg.jit(lambda t: t.sum(axis=0, keepdims=True) + 1.0)
    one = eg.tensor(np.array([2.0]), device=cuda)
    for _ in range(3):
        assert syncing(one).numpy().tolist() == [3.0]
    status = _graph_status(syncing)
    assert not status["captured"] and "capture failed" in status["reason"], status
    assert "running without a CUDA graph" in capsys.readouterr().out


def test_train_and_eval_programs_keep_their_own_graphs(cuda, rng):
    """Guards and retracing are the CPU's: switching modes picks the other program
    (recorded again when it comes back, as only the program in use keeps buffers)."""
    eg.manual_seed(1)
    layer = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).to(cuda)
    compiled = eg.jit(lambda t: layer(t))
    x = eg.tensor(rng.standard_normal((3, 4)), device=cuda)
    layer.eval()
    want = layer(x).numpy()
    for mode in ("train", "eval", "train", "eval"):
        layer.train(mode == "train")
        outs = [compiled(x).numpy() for _ in range(3)]
        if mode == "eval":
            for o in outs:
                np.testing.assert_allclose(o, want, rtol=1e-12)
        else:
            assert not np.array_equal(outs[1], outs[2])
    assert compiled.traces == 2


@pytest.mark.skipif(codegen.NVCC is None, reason="nvcc is not installed")
def test_graph_draw_kernels_compile_with_nvcc(tmp_path):
    from backends import cprint
    from ops.random import BERNOULLI, NORMAL, UNIFORM
    kernels = [(f"engine_philox_graph_{d.name}_{dt}", *cuda_graphs.draw_kernel_source(d, np.dtype(dt)))
               for d in (UNIFORM, NORMAL, BERNOULLI) for dt in ("float32", "float64")]
    src = tmp_path / "graph_draws.cu"
    src.write_text(cprint.cuda_translation_unit(kernels))
    res = codegen._run([codegen.NVCC, "-c", str(src), "-o", str(tmp_path / "graph_draws.o")])
    assert res.returncode == 0, res.stderr[:3000]
