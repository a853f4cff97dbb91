"""The engine's random generator: Philox4x32-10 (ops/random.py) on every device.

Known answers from Random123, randomgen as an independent oracle when installed, the
host C loop and the emulated CUDA kernel bit-identical to the NumPy path, streams
(layout, continuation, fold_in), generator state, and the jit drawing afresh."""
from __future__ import annotations

import ctypes
import threading
import time

import numpy as np
import pytest

import engine as eg
from backends import cbuild, cprint
from backends.base import Backend
from ops.random import (BERNOULLI, MANTISSA_BITS, NORMAL, UNIFORM, _NumpyWords, fold_in,
                        philox4x32, philox_words)
from tests import test_cuda_codegen as codegen
from tests.test_cuda import emulated_backend, fake_cupy  # noqa: F401  (fixtures)

FLOATS = [np.float16, np.float32, np.float64]

# Random123's kat_vectors for philox4x32 with 10 rounds: counter, key -> output.
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_matches_random123_known_answers(ctr, key, want):
    words = philox4x32(tuple(np.array([c], np.uint64) for c in ctr), key, _NumpyWords)
    assert tuple(int(w[0]) for w in words) == want
    assert philox4x32(ctr, key, _NumpyWords) == want           # the constant-folded path


def test_philox_stream_matches_randomgen():
    randomgen = pytest.importorskip("randomgen")
    key = (0x12345678, 0x9ABCDEF0)
    for start in (0, 2 ** 32 - 3):                  # across the carry into counter word 1
        # randomgen increments its 128-bit counter before each block
        g = randomgen.Philox(number=4, width=32, counter=(start - 1) % 2 ** 128,
                             key=key[0] | key[1] << 32)
        want = g.random_raw(4 * 6).reshape(6, 4)
        got = np.stack(philox_words(start, 6, key), axis=1)
        np.testing.assert_array_equal(got, want)


def _c_draw(draw, dtype, start, n, key, p=0.0):
    name, source = draw.host_c_source(dtype)
    out = np.empty(n, dtype)
    getattr(cbuild.build(source), name)(
        ctypes.c_longlong(n), ctypes.c_ulonglong(start), ctypes.c_uint(key[0]),
        ctypes.c_uint(key[1]), ctypes.c_uint(draw.threshold(p)), ctypes.c_void_p(out.ctypes.data))
    return out


def _ulps(a, b):
    i = np.int32 if a.dtype == np.float32 else np.int64
    return int(np.abs(a.view(i).astype(np.int64) - b.view(i).astype(np.int64)).max())


@pytest.mark.skipif(not cbuild.available(), reason="no C compiler")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_c_loop_equals_numpy_path(dtype):
    start, key = 2 ** 32 - 500, (7, 0xDEADBEEF)
    for draw in (UNIFORM, BERNOULLI):
        np.testing.assert_array_equal(_c_draw(draw, dtype, start, 1000, key, p=0.3),
                                      draw.host(start, 1000, key, dtype, p=0.3))
    assert _ulps(_c_draw(NORMAL, dtype, start, 1000, key), NORMAL.host(start, 1000, key, dtype)) <= 8


@pytest.mark.parametrize("dtype", FLOATS)
def test_uniform_uses_the_top_bits_exactly(dtype):
    dt = np.dtype(dtype)
    u = UNIFORM.host(0, 50000, (3, 4), dt)
    w = philox_words(0, 50000, (3, 4))
    b = MANTISSA_BITS[dt]
    top = (w[0] >> np.uint64(32 - b)) if b <= 32 else (w[0] << np.uint64(21)) | (w[1] >> np.uint64(11))
    np.testing.assert_array_equal(u.astype(np.float64) * 2.0 ** b, top.astype(np.float64))
    assert u.dtype == dt and u.min() >= 0 and u.max() < 1
    assert abs(u.astype(np.float64).mean() - 0.5) < 0.01


def test_bernoulli_is_the_float32_uniform_below_p():
    for p in (0.0, 0.1, 1 / 3, 0.5, 0.999, 1.0):
        keep = BERNOULLI.host(10, 20000, (1, 2), np.float32, p=p)
        u = UNIFORM.host(10, 20000, (1, 2), np.float32)
        np.testing.assert_array_equal(keep, (u < p).astype(np.float32))
    assert abs(BERNOULLI.host(0, 100000, (5, 6), np.float32, p=0.9).mean() - 0.9) < 0.005


def test_normal_moments_and_no_infinities():
    for dtype in FLOATS:
        z = NORMAL.host(0, 100000, (9, 9), dtype).astype(np.float64)
        assert np.isfinite(z).all()
        assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02, dtype
        assert abs(((z - z.mean()) ** 3).mean()) < 0.05          # symmetric


def test_draws_depend_on_the_global_index_only():
    eg.manual_seed(5)
    whole = eg.rand(4, 6).numpy()
    eg.manual_seed(5)
    parts = np.concatenate([eg.rand(10).numpy(), eg.rand(2, 7).numpy().ravel()])
    np.testing.assert_array_equal(whole.ravel(), parts)
    eg.manual_seed(6)
    assert not np.array_equal(eg.rand(24).numpy(), whole.ravel())


def test_fold_in_gives_distinct_reproducible_streams():
    assert fold_in((1, 2), 3) == fold_in((1, 2), 3)
    keys = {fold_in((1, 2), d) for d in range(1000)} | {fold_in((1, 3), 0), fold_in((2, 2), 0)}
    assert len(keys) == 1002
    eg.manual_seed(0)
    eg.fold_in_rng(1)
    a = eg.rand(100).numpy()
    eg.manual_seed(0)
    b = eg.rand(100).numpy()
    eg.fold_in_rng(1)
    np.testing.assert_array_equal(a, eg.rand(100).numpy())       # a fold restarts the counter
    assert np.abs(a - b).max() > 0.1


def test_fold_in_keys_are_never_element_draws_of_the_parent_key():
    """A folded key comes from a counter no element draw uses (word 2 is the fold's
    tag), so a sub-stream's key never equals a value the parent stream hands out."""
    key = (12345, 678)
    for d in (0, 1, 7, 2 ** 32 + 5):
        words = philox_words(d, 1, key)
        assert fold_in(key, d) != (int(words[0][0]), int(words[1][0]))


class _SlowCounter:
    """A stream whose counter read yields to other threads (the window a lock must cover)."""
    name = "slow"

    def __init__(self) -> None:
        self._n = 0

    @property
    def rng_counter(self) -> int:
        n = self._n
        time.sleep(1e-4)
        return n

    @rng_counter.setter
    def rng_counter(self, value: int) -> None:
        self._n = value


def test_threads_claiming_counters_at_once_get_disjoint_ranges():
    stream, starts = _SlowCounter(), []

    def claim() -> None:
        for _ in range(25):
            starts.append(Backend.claim_counters(stream, 3))
    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(starts) == list(range(0, 4 * 25 * 3, 3))
    assert stream._n == 4 * 25 * 3


def test_rng_state_round_trip_and_errors():
    eg.manual_seed(3)
    eg.rand(7)
    state = eg.get_rng_state()
    assert state["devices"]["cpu"]["counter"] == 7
    first = eg.randn(5).numpy()
    eg.manual_seed(99)
    eg.set_rng_state(state)
    np.testing.assert_array_equal(first, eg.randn(5).numpy())
    with pytest.raises(ValueError, match="set_rng_state.*get_rng_state"):
        eg.set_rng_state({"seed": 1})
    with pytest.raises(ValueError, match="key of 2 words"):
        eg.set_rng_state({"seed": 1, "folds": [], "devices": {"cpu": {"key": [1], "counter": 0}}})


def test_random_ops_refuse_integer_dtypes():
    with pytest.raises(eg.DTypeError, match="random_uniform.*int64"):
        eg.rand(3, dtype=eg.int64)


def test_jit_draws_afresh_on_every_call_like_eager():
    def f(x):
        return eg.dropout(x, 0.5) + eg.rand(4)

    x = eg.ones(4)
    eg.manual_seed(1)
    eager = [f(x).numpy() for _ in range(3)]
    compiled = eg.jit(f)
    eg.manual_seed(1)
    jitted = [compiled(x).numpy() for _ in range(3)]
    for e, j in zip(eager, jitted):
        np.testing.assert_array_equal(e, j)
    assert not np.array_equal(jitted[1], jitted[2])
    assert eg.get_rng_state()["devices"]["cpu"]["counter"] == 3 * 8


# -- the CUDA kernel ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS)
def test_emulated_cuda_draws_equal_the_cpu(emulated_backend, monkeypatch, dtype):  # noqa: F811
    import backends
    monkeypatch.setitem(backends._instances, "cuda", emulated_backend)
    eg.manual_seed(21)
    eg.rand(3, device="cuda"), eg.rand(3)                  # both streams move on alike
    for draw in (lambda d: eg.rand(5, 40, dtype=dtype, device=d),
                 lambda d: eg.dropout(eg.ones(333, dtype=dtype, device=d), 0.3)):
        np.testing.assert_array_equal(draw("cuda").numpy(), draw("cpu").numpy())
    z_gpu, z_cpu = eg.randn(1000, dtype=dtype, device="cuda").numpy(), eg.randn(1000, dtype=dtype).numpy()
    np.testing.assert_allclose(z_gpu, z_cpu, rtol=4 * np.finfo(dtype).eps, atol=4 * np.finfo(dtype).eps)


@pytest.mark.skipif(codegen.NVCC is None, reason="nvcc not on PATH")
def test_nvcc_compiles_every_philox_kernel(tmp_path):
    for draw in (UNIFORM, NORMAL, BERNOULLI):
        low = [(f"philox_{draw.name}_{np.dtype(d).name}", *draw.kernel_source(d))
               for d in (np.float16, np.float32)]
        # cosf's slow path for huge arguments is double precision in CUDA's math library
        # (never taken here: the argument is below 2 pi), so only the others are checked
        codegen._nvcc(tmp_path, f"philox_{draw.name}_low", cprint.cuda_translation_unit(low),
                      no_double=draw is not NORMAL)
        high = [(f"philox_{draw.name}_float64", *draw.kernel_source(np.float64))]
        codegen._nvcc(tmp_path, f"philox_{draw.name}_f64", cprint.cuda_translation_unit(high),
                      no_double=False)


# -- exact resume -----------------------------------------------------------------------------

def _dropout_model():
    from engine import nn
    m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    return m, nn.optim.SGD(m.parameters(), lr=0.1)


def _steps(m, opt, start, stop):
    from engine import nn
    for i in range(start, stop):
        x = eg.tensor(np.random.default_rng(i).standard_normal((8, 6)).astype(np.float32))
        loss = nn.functional.mse_loss(m(x), eg.zeros(8, 2))
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_nn_load_resumes_the_dropout_stream_bit_for_bit(tmp_path):
    from engine import nn
    eg.manual_seed(4)
    m, opt = _dropout_model()
    _steps(m, opt, 0, 6)
    want = [p.numpy().copy() for p in m.parameters()]
    eg.manual_seed(4)
    m, opt = _dropout_model()
    _steps(m, opt, 0, 3)
    nn.save(tmp_path / "c.npz", m, opt)
    eg.manual_seed(77)                                  # another process: other model, other stream
    m2, opt2 = _dropout_model()
    nn.load(tmp_path / "c.npz", m2, opt2)
    _steps(m2, opt2, 3, 6)
    for p, q in zip(m2.parameters(), want):
        np.testing.assert_array_equal(p.numpy(), q)
    eg.manual_seed(77)
    m3, opt3 = _dropout_model()
    nn.load(tmp_path / "c.npz", m3, opt3, rng=False)   # without the stream: other masks
    _steps(m3, opt3, 3, 6)
    assert any(not np.array_equal(p.numpy(), q) for p, q in zip(m3.parameters(), want))


def test_jit_training_resumed_with_dropout_is_bit_identical(tmp_path):
    from engine import nn
    from tests.test_training import _batch, _loss, _model
    m, opt, sched = _model(capturable=True, tensor_lr=True, dropout=0.3)
    full = nn.train(m, opt, _batch, _loss, steps=8, scheduler=sched, print_every=0, jit=True)
    want = [p.numpy().copy() for p in m.parameters()]
    ckpt = str(tmp_path / "run.npz")
    m, opt, sched = _model(capturable=True, tensor_lr=True, dropout=0.3)
    nn.train(m, opt, _batch, _loss, steps=5, scheduler=sched, print_every=0, jit=True,
             checkpoint=ckpt)
    eg.manual_seed(42)                                  # another process
    m, opt, sched = _model(capturable=True, tensor_lr=True, dropout=0.3)
    rest = nn.train(m, opt, _batch, _loss, steps=8, scheduler=sched, print_every=0, jit=True,
                    checkpoint=ckpt, resume=True)
    assert [r["loss"] for r in rest] == [r["loss"] for r in full[5:]]
    for p, q in zip(m.parameters(), want):
        np.testing.assert_array_equal(p.numpy(), q)
