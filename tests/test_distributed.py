"""Data-parallel training over MPI: 2 processes (mpiexec) against 1, resume on another
world size, failures that end the job instead of hanging; and the parts that need no
second process (bucketing, sharding, hooks, the all_reduce op under the jit).

The multi-process tests start tests/distributed_worker.py with mpiexec; they skip when
mpi4py or mpiexec is missing (`pip install -e ".[dist]"`)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import engine as eg
from engine import autograd, distributed as dist, nn
import ops
from nn.parallel import _buckets
from nn.training import _shard
from ops.collective import SingleProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mpi_skip_reason() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return 'mpi4py is not installed (pip install -e ".[dist]")'
    if shutil.which("mpiexec") is None:
        return 'mpiexec is not on PATH (pip install -e ".[dist]" installs Open MPI)'
    return None


needs_mpi = pytest.mark.skipif(_mpi_skip_reason() is not None, reason=str(_mpi_skip_reason()))


def _mpiexec(n: int, case: str, out, timeout: float = 120, env: dict | None = None):
    cmd = ["mpiexec", "--allow-run-as-root", "--oversubscribe", "-n", str(n)]
    for k in (env or {}):
        cmd += ["-x", k]
    cmd += [sys.executable, "-m", "tests.distributed_worker", case, str(out)]
    full_env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """The "ddp" case on 1 and on 2 processes: {n: (rank 0's arrays, rank 1's or None)}."""
    runs = {}
    for n in (1, 2):
        out = tmp_path_factory.mktemp(f"ddp{n}")
        res = _mpiexec(n, "ddp", out)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        ranks = [dict(np.load(out / f"ddp_{n}_{r}.npz")) for r in range(n)]
        runs[n] = (out, ranks)
    return runs


@needs_mpi
@pytest.mark.slow
def test_two_processes_reach_the_one_process_parameters(ddp_runs):
    (_, one), (_, two) = ddp_runs[1], ddp_runs[2]
    arrays = [k for k in one[0] if k.startswith("arr_")]
    assert len(arrays) == 12                       # eager, jit, nn.train: 4 parameters each
    for k in arrays + ["losses"]:
        # the ranks agree bit for bit (same averaged gradients, same updates)
        np.testing.assert_array_equal(two[0][k], two[1][k], err_msg=k)
        # and match one process to float32 rounding: each rank's matmul sums its 4 rows,
        # one process sums all 8 in another order
        np.testing.assert_allclose(two[0][k], one[0][k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(two[0]["comm"]) > 0


@needs_mpi
@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_process(ddp_runs, tmp_path):
    out2, _ = ddp_runs[2]
    logged = [line for line in open(out2 / "run.jsonl")]
    assert len(logged) == 4                        # rank 0 alone logs
    res = _mpiexec(1, "resume", out2)              # steps 4..7 on one process
    assert res.returncode == 0, res.stderr[-3000:]
    res = _mpiexec(1, "resume", tmp_path)          # steps 0..7 on one process, no checkpoint
    assert res.returncode == 0, res.stderr[-3000:]
    resumed, straight = np.load(out2 / "resume_1_0.npz"), np.load(tmp_path / "resume_1_0.npz")
    for k in straight.files:
        np.testing.assert_allclose(resumed[k], straight[k], rtol=1e-5, atol=1e-6, err_msg=k)


@needs_mpi
@pytest.mark.slow
@pytest.mark.parametrize("case,message", [
    ("raise", "the data for rank 1 could not be read"),
    ("stuck", "all_reduce of (3,) float32 did not complete within 3 s")])
def test_a_failing_rank_ends_the_job_with_its_error(case, message, tmp_path):
    res = _mpiexec(2, case, tmp_path, timeout=90, env={"ENGINE_TEST_TIMEOUT": "3"})
    assert res.returncode != 0
    assert message in res.stderr, res.stderr[-3000:]
    assert "aborting every rank of the job" in res.stderr


# -- one process ------------------------------------------------------------------------------

def test_buckets_keep_order_cap_and_dtype():
    ps = [eg.zeros(n, dtype=d) for n, d in [(10, eg.float32), (10, eg.float32), (30, eg.float32),
                                            (5, eg.float64), (5, eg.float32)]]
    sizes = [[int(p.shape[0]) for p in b] for b in _buckets(ps, cap_bytes=80)]
    assert sizes == [[10, 10], [30], [5], [5]]
    assert [p for b in _buckets(ps, 80) for p in b] == ps


def test_shard_splits_rows_and_refuses_uneven_batches():
    x, y = eg.arange(12).reshape(6, 2), np.arange(6)
    sx, sy = _shard((x, y), 1, 3)
    assert sx.numpy().tolist() == [[4, 5], [6, 7]] and sy.tolist() == [2, 3]
    with pytest.raises(ValueError, match="6 rows does not split evenly over 4 processes"):
        _shard((x,), 0, 4)


def test_all_reduce_op_is_recorded_by_the_jit_and_runs_every_call():
    calls = []

    class Counting(SingleProcess):
        def all_reduce_array(self, backend, x, reduction):
            calls.append(reduction)
            return backend.copy(x) * 2

    group = Counting()
    f = eg.jit(lambda x: ops.REGISTRY["all_reduce"](x * 1.0, group=group, reduction="sum"))
    for _ in range(3):
        np.testing.assert_array_equal(f(eg.ones(3)).numpy(), [2, 2, 2])
    assert "all_reduce" in str(f.ir)
    assert len(calls) == 3          # once per call; tracing records it without communicating


def test_ddp_in_one_process_averages_nothing_and_flags_unused_parameters():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x, use_b=True):
            return self.a(x) + (self.b(x) if use_b else 0)

    model = Two()
    ddp = nn.DistributedDataParallel(model, group=SingleProcess())
    x = eg.ones(4, 3)
    ddp(x).sum().backward()
    assert np.allclose(model.a.weight.grad.numpy(), 4.0)
    model.zero_grad()
    with ddp.no_sync():
        ddp(x, use_b=False).sum().backward()       # no sync: unused parameters are fine
    with pytest.raises(dist.DistributedError, match=r"2 parameter\(s\) got no gradient.*b\.weight"):
        ddp(x, use_b=False).sum().backward()


def test_leaf_hooks_need_leaves_and_can_be_removed():
    x = eg.ones(2, requires_grad=True)
    with pytest.raises(eg.GradError, match="register_leaf_hook: needs a leaf"):
        autograd.register_leaf_hook(x * 2, lambda t: None)
    seen = []
    remove = autograd.register_leaf_hook(x, lambda t: seen.append(t.grad.numpy().copy()))
    (x * 3).sum().backward()
    remove()
    (x * 3).sum().backward()
    assert len(seen) == 1 and seen[0].tolist() == [3, 3]


def test_distributed_errors_before_init_and_on_bad_arguments():
    if not dist.is_initialized():
        with pytest.raises(dist.DistributedError, match="call engine.distributed.init"):
            dist.rank()
    with pytest.raises(ValueError, match="backend must be 'auto', 'mpi' or 'nccl', got 'gloo'"):
        dist.init("gloo")
    if not dist._has_gpu() and not dist.is_initialized():
        with pytest.raises(dist.DistributedError, match="backend='nccl'.*needs CuPy and a CUDA GPU"):
            dist.init("nccl")
    with pytest.raises(eg.OpError, match="reduction must be one of"):
        ops.REGISTRY["all_reduce"](eg.ones(2), group=SingleProcess(), reduction="max")
