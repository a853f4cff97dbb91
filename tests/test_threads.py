"""Threads, as PyTorch has them: grad mode, autocast and the interpreter stack are per
thread; compiled programs are re-entrant; concurrent first calls trace once. Every
result computed with 4-8 threads switching every 10 us equals the single-threaded one."""
import sys
import threading

import numpy as np
import pytest

import engine as eg
from engine import nn


@pytest.fixture(autouse=True)
def fast_switching():
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def _in_threads(jobs):
    """Run each job in its own thread, started together; results in order, errors re-raised."""
    barrier = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def run(i, job):
        try:
            barrier.wait()
            results[i] = job()
        except BaseException as e:      # re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _inputs(n, shape=(16, 16)):
    rng = np.random.default_rng(3)
    return [eg.tensor(rng.standard_normal(shape)) for _ in range(n)]


def _program():
    w = eg.tensor(np.linspace(-1.0, 1.0, 256).reshape(16, 16))

    def f(x):           # several planned buffers, reused within one call
        h = eg.tanh(x @ w * 2.0 + 1.0)
        return (h * h - h).sum(axis=1) + eg.exp(-h).mean(axis=0)
    return f


def test_concurrent_calls_of_a_compiled_program_equal_single_threaded_calls():
    f = eg.jit(_program())
    xs = _inputs(8)
    expected = [f(x).numpy() for x in xs]
    got = _in_threads([lambda x=x: [f(x).numpy() for _ in range(30)] for x in xs])
    for want, runs in zip(expected, got):
        for r in runs:
            np.testing.assert_array_equal(r, want)


def test_concurrent_first_calls_trace_once_and_agree():
    xs = _inputs(8)
    expected = [_program()(x).numpy() for x in xs]
    f = eg.jit(_program())
    got = _in_threads([lambda x=x: f(x).numpy() for x in xs])
    assert f.traces == 1
    for want, r in zip(expected, got):
        np.testing.assert_allclose(r, want, rtol=1e-12)


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(self.a(x).tanh())


def _model(seed):
    """Values from a private generator: the engine's is process-wide (threads share it)."""
    m = _Mlp()
    rng = np.random.default_rng(seed)
    m.load_state_dict({k: rng.standard_normal(v.shape) * 0.3 for k, v in m.state_dict().items()})
    return m


def _eager_grads(seed, steps=20):
    m = _model(seed)
    x = _inputs(1, (5, 8))[0].to(dtype=eg.float32)
    for _ in range(steps):
        (m(x) ** 2).sum().backward()
    return [p.grad.numpy() for p in m.parameters()]


def _no_grad_loop(steps=200):
    m = _model(9)
    x = _inputs(1, (5, 8))[0].to(dtype=eg.float32)
    outs = []
    for _ in range(steps):
        with eg.no_grad():
            y = m(x)
            assert not y.requires_grad
        outs.append(y.numpy())
    return outs[-1]


def test_eager_backward_in_threads_while_another_thread_runs_without_grad():
    expected = [_eager_grads(s) for s in (1, 2)]
    quiet = _no_grad_loop()
    got = _in_threads([lambda: _eager_grads(1), lambda: _eager_grads(2), _no_grad_loop,
                       _no_grad_loop])
    for want, grads in zip(expected, got[:2]):
        for a, b in zip(want, grads):
            np.testing.assert_array_equal(b, a)
    np.testing.assert_array_equal(got[2], quiet)


def _train(jit, steps=6):
    m = _model(4)
    opt = nn.optim.AdamW(m.parameters(), lr=0.05, capturable=True)
    x = _inputs(1, (5, 8))[0].to(dtype=eg.float32)

    def step(x):
        opt.zero_grad()
        loss = (m(x) ** 2).mean()
        loss.backward()
        opt.step()
        return loss
    run = eg.jit(step) if jit else step
    losses = [run(x).item() for _ in range(steps)]
    return losses, [p.numpy() for p in m.parameters()]


def _generate_and_trace():
    """No-grad decoding-style work plus tracing a fresh function, in another thread."""
    m = _model(5)
    x = _inputs(1, (5, 8))[0].to(dtype=eg.float32)
    with eg.no_grad():
        outs = [m(x).numpy() for _ in range(20)]
    traced = eg.jit(lambda x: m(x).tanh())
    return outs[-1], traced(x).numpy(), eg.is_grad_enabled()


@pytest.mark.parametrize("jit", [False, True])
def test_training_in_one_thread_while_others_generate_and_trace(jit):
    want_losses, want_params = _train(jit)
    want_gen = _generate_and_trace()
    got = _in_threads([lambda: _train(jit), _generate_and_trace, _generate_and_trace])
    losses, params = got[0]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
    for a, b in zip(want_params, params):
        np.testing.assert_allclose(b, a, rtol=1e-6)
    for gen in got[1:]:
        np.testing.assert_array_equal(gen[0], want_gen[0])
        np.testing.assert_allclose(gen[1], want_gen[1], rtol=1e-6)
        assert gen[2] is True          # no_grad in this thread ended; grad is on again


def test_grad_mode_and_autocast_are_per_thread():
    seen = []
    inside = threading.Event()
    release = threading.Event()

    def holder():
        with eg.no_grad(), eg.autocast():
            inside.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(5)
    try:
        seen.append(eg.is_grad_enabled())
        from engine.state import autocast_state
        seen.append(autocast_state.dtype)
        w = eg.tensor([1.0, 2.0], requires_grad=True)
        seen.append((w * w).sum().requires_grad)
    finally:
        release.set()
        t.join()
    assert seen == [True, None, True]
