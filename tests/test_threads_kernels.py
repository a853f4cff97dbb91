"""eg.set_num_threads and the C kernels' thread pool: results identical on any number
of threads, the size threshold honoured, BLAS sized through threadpoolctl."""
import os
import subprocess
import sys
import threading
import time

import numpy as np
from ops.fused import LAYER_NORM, LOG_SOFTMAX, SOFTMAX
import pytest

import engine as eg
from backends import cbuild, cparallel, host_kernels

pytestmark = pytest.mark.skipif(not cbuild.available(), reason="no C compiler: no C kernels to thread")


@pytest.fixture
def pool():
    """Kernels split at any size (grain 1); the thread count and grain restored after."""
    threads = eg.get_num_threads()
    grain = cparallel.set_grain(1)
    yield
    cparallel.set_grain(grain)
    eg.set_num_threads(threads)


def _at_threads(fn, counts=(1, 2, 3)):
    """fn()'s arrays at each thread count, and how many kernel calls ran on several threads."""
    results, parallel = [], []
    for n in counts:
        eg.set_num_threads(n)
        before = cparallel.parallel_loops()
        results.append([np.array(a) for a in fn()])
        parallel.append(cparallel.parallel_loops() - before)
    return results, parallel


def _assert_bit_identical(results):
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def _layer_norm_grads(x, w, b, g):
    return eg.grad(lambda x, w, b: (eg.layer_norm(x, w, b) * g).sum(), argnums=(0, 1, 2))(x, w, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_group_column_sums_are_bit_identical_across_thread_counts(pool, dtype, rng):
    """Layer norm's backward: a row group whose weight and bias gradients sum 1200 rows,
    split in several blocks; on 1, 2 and 3 threads every bit agrees, and with eager mode
    to rounding."""
    x, g = (eg.tensor(rng.standard_normal((40, 30, 32)).astype(dtype)) for _ in range(2))
    w, b = (eg.tensor(rng.standard_normal(32).astype(dtype)) for _ in range(2))
    j = eg.jit(_layer_norm_grads)
    results, parallel = _at_threads(lambda: [t.numpy() for t in j(x, w, b, g)])
    assert "# C: rows[" in j.source
    assert parallel[0] == 0 and all(p > 0 for p in parallel[1:])
    _assert_bit_identical(results)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for got, want in zip(results[0], _layer_norm_grads(x, w, b, g)):
        np.testing.assert_allclose(got, want.numpy(), rtol=tol, atol=tol)


def test_fused_groups_and_reductions_are_bit_identical_across_thread_counts(pool, rng):
    """A long one-dimensional group (cut in chunks), a broadcast group, row sums, column
    sums and a masked softmax row kernel: the same bits on 1, 2 and 3 threads."""
    flat = [eg.tensor(rng.standard_normal(40_000).astype(np.float32)) for _ in range(2)]
    x, y = (eg.tensor(rng.standard_normal((300, 64)).astype(np.float32)) for _ in range(2))
    s = eg.tensor(rng.standard_normal((4, 2, 50, 50)).astype(np.float32))
    keep = eg.tensor(np.tril(np.ones((50, 50), bool)))

    def f(a, b, x, y, s):
        return (eg.sqrt(a * a + b * b) * 0.5 + a, x * y[0] + 1.0, (x * y - x).sum(-1), (x * y + y).sum(0),
                eg.softmax(eg.where(keep, s * 0.125, float("-inf")), -1))
    j = eg.jit(f)
    results, parallel = _at_threads(lambda: [t.numpy() for t in j(*flat, x, y, s)])
    assert j.stats()[-1]["c_kernels"] >= 4
    assert parallel[0] == 0 and all(p >= 4 for p in parallel[1:])
    _assert_bit_identical(results)
    for got, want in zip(results[0], f(*flat, x, y, s)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_host_row_kernels_and_scatter_are_bit_identical_across_thread_counts(pool, rng):
    """softmax, log_softmax, layer_norm and the scatter-add of rows (repeated indices
    accumulate in index order) give the same bits on any number of threads."""
    x = rng.standard_normal((257, 96)).astype(np.float32)
    w, b = rng.standard_normal(96).astype(np.float32), rng.standard_normal(96).astype(np.float32)
    idx = rng.integers(-50, 50, 3000)
    values = rng.standard_normal((3000, 96)).astype(np.float32)

    def run():
        return (host_kernels.run_rows(SOFTMAX, (x,), {"axis": 1}),
                host_kernels.run_rows(LOG_SOFTMAX, (x,), {"axis": 1}),
                host_kernels.run_rows(LAYER_NORM, (x, w, b), {"axis": 1, "eps": 1e-5}),
                host_kernels.scatter_add_rows((50, 96), idx, values))
    results, parallel = _at_threads(run)
    assert parallel[0] == 0 and all(p == 4 for p in parallel[1:])
    _assert_bit_identical(results)
    want = np.zeros((50, 96), np.float32)
    np.add.at(want, (idx,), values)
    np.testing.assert_allclose(results[1][3], want, rtol=1e-5, atol=1e-5)


def test_kernels_below_the_threshold_stay_serial(rng):
    """Work under `grain` elements per thread runs on the calling thread only."""
    threads = eg.get_num_threads()
    x = rng.standard_normal((64, 256)).astype(np.float32)        # 16384 elements
    try:
        eg.set_num_threads(2)
        grain = cparallel.set_grain(x.size)                      # two threads need 2 * grain
        before = cparallel.parallel_loops()
        host_kernels.run_rows(SOFTMAX, (x,), {"axis": 1})
        assert cparallel.parallel_loops() == before
        cparallel.set_grain(x.size // 2)
        host_kernels.run_rows(SOFTMAX, (x,), {"axis": 1})
        assert cparallel.parallel_loops() == before + 1
    finally:
        cparallel.set_grain(grain)
        eg.set_num_threads(threads)


def test_set_num_threads_sizes_blas_through_threadpoolctl():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    threads = eg.get_num_threads()

    def blas_threads():
        return {p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"}
    np.ones((4, 4)) @ np.ones((4, 4))                         # BLAS loaded
    try:
        for n in (1, 2):
            eg.set_num_threads(n)
            assert eg.get_num_threads() == n
            assert blas_threads() <= {n}
    finally:
        eg.set_num_threads(threads)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None])
def test_set_num_threads_rejects_what_is_not_a_positive_int(bad):
    with pytest.raises(ValueError, match="set_num_threads: n must be a positive int"):
        eg.set_num_threads(bad)


def test_python_threads_calling_kernels_at_once_get_right_results(pool, rng):
    """Two Python threads calling kernels together: one runs on the pool, the other
    serially, neither waits on the other's work or sees its numbers."""
    eg.set_num_threads(2)
    xs = [rng.standard_normal((128, 256)).astype(np.float32) for _ in range(2)]
    wants = [host_kernels.run_rows(SOFTMAX, (x,), {"axis": 1}) for x in xs]
    errors = []

    def work(k):
        try:
            for _ in range(200):
                if not np.array_equal(host_kernels.run_rows(SOFTMAX, (xs[k],), {"axis": 1}), wants[k]):
                    errors.append(k)
        except Exception as e:          # a dying thread must fail the test, not warn
            errors.append(e)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and not errors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_runs_parallel_kernels(pool, rng):
    """The pool's workers do not survive fork: a child starts its own instead of
    waiting forever on threads that are not there."""
    eg.set_num_threads(2)
    x = rng.standard_normal((128, 256)).astype(np.float32)
    want = host_kernels.run_rows(SOFTMAX, (x,), {"axis": 1})      # workers started in the parent
    pid = os.fork()
    if pid == 0:
        before = cparallel.parallel_loops()
        got = host_kernels.run_rows(SOFTMAX, (x,), {"axis": 1})
        ok = np.array_equal(got, want) and cparallel.parallel_loops() == before + 1
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung in a parallel kernel")


def test_blas_starts_at_one_thread_unless_the_user_set_a_thread_variable():
    """OpenBLAS's workers spin: by default the engine keeps BLAS at one thread (the C
    kernels use every core); a user's OMP_NUM_THREADS is left alone."""
    pytest.importorskip("threadpoolctl")
    probe = ("import engine as eg, threadpoolctl; "
             "print(eg.get_num_threads(), sorted({p['num_threads'] for p in threadpoolctl.threadpool_info() "
             "if p['user_api'] == 'blas'}))")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    cores = len(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split(None, 1) == [str(cores), "[1]\n"]
    env["OMP_NUM_THREADS"] = "3"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    kernels, blas = out.stdout.split(None, 1)
    assert kernels == "3"
    if os.cpu_count() > 1:
        assert blas != "[1]\n"                  # OpenBLAS took the user's value, not ours


def test_benchmark_thread_counts_parse_all_and_reject_junk():
    from benchmarks.run import thread_counts
    cores = len(os.sched_getaffinity(0))
    assert thread_counts("1,all") == ([1, cores] if cores > 1 else [1])
    assert thread_counts("2, 1 ,2") == [2, 1]
    for bad in ("0", "x", "1,,2", "-1"):
        with pytest.raises(ValueError, match="--threads"):
            thread_counts(bad)


def test_busy_core_benchmark_child_reports_a_time():
    from benchmarks import busy_core
    threads = eg.get_num_threads()
    try:
        r = busy_core.child("small", "eager", 1, 2, 1)
    finally:
        eg.set_num_threads(threads)
    assert r["ms"] > 0 and r["parallel_loops"] >= 0
