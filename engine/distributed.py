"""Processes that train together: MPI (mpi4py) for CPU arrays, NCCL (CuPy) for GPU arrays.

    mpiexec -n 4 python train.py          # in train.py: engine.distributed.init()

`init(backend="auto"|"mpi"|"nccl")` joins the job mpiexec started; `rank()`,
`world_size()`, `all_reduce`, `broadcast` and `barrier` follow. No transport is home
made: MPI moves host arrays (CUDA-aware MPI is not assumed), NCCL moves device arrays
and is bootstrapped over MPI (rank 0 makes the NCCL id, MPI broadcasts it).

Failure never hangs: MPI errors raise Python exceptions, and every collective waits
with a deadline (`timeout` seconds) by polling a non-blocking request, so a rank whose
partner died or is stuck raises DistributedError naming the collective. An uncaught
exception on any rank aborts the whole job (MPI_Abort from sys.excepthook), so the
others stop at once instead of waiting for the deadline.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

import ops
from ops.errors import EngineError

from .tensor import Tensor

INSTALL_HINT = 'install mpi4py and Open MPI with `pip install -e ".[dist]"` and start with mpiexec'
DEFAULT_TIMEOUT = 300.0


class DistributedError(EngineError, RuntimeError):
    """A collective failed or timed out, or the process group is not set up."""


class _Poll:
    """Wait for a request with a deadline, sleeping a little longer each time."""

    def __init__(self, comm: "MPICommunicator", what: str) -> None:
        self.comm, self.what = comm, what

    def wait(self, done: Any) -> None:
        deadline = time.monotonic() + self.comm.timeout
        pause = 1e-6
        while not done():
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"rank {self.comm.rank}/{self.comm.size}: {self.what} did not complete "
                    f"within {self.comm.timeout:g} s: another rank stopped, failed or is stuck "
                    f"before it")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)


class MPICommunicator:
    """Collectives on host (NumPy) arrays over an mpi4py communicator."""

    backend = "mpi"

    def __init__(self, comm: Any, mpi: Any, timeout: float) -> None:
        comm.Set_errhandler(mpi.ERRORS_RETURN)     # errors raise (mpi4py turns codes into exceptions)
        self.comm, self.mpi, self.timeout = comm, mpi, float(timeout)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.comm_seconds = 0.0                    # time spent inside collectives

    def _finish(self, request: Any, what: str) -> None:
        t0 = time.perf_counter()
        _Poll(self, what).wait(request.Test)
        self.comm_seconds += time.perf_counter() - t0

    def all_reduce_array(self, backend: Any, x: np.ndarray, reduction: str) -> np.ndarray:
        """Sum (or mean) of `x` over the ranks, into a new array (the all_reduce op's forward)."""
        x = np.ascontiguousarray(backend.to_numpy(x))
        out = np.empty_like(x)
        self._finish(self.comm.Iallreduce(x, out, op=self.mpi.SUM), f"all_reduce of {x.shape} {x.dtype}")
        if reduction == "mean":
            out /= out.dtype.type(self.size) if out.dtype.kind == "f" else self.size
        return backend.asarray(out)

    def broadcast_array(self, x: np.ndarray, root: int) -> None:
        buf = x if x.flags.c_contiguous else np.ascontiguousarray(x)
        self._finish(self.comm.Ibcast(buf, root=root), f"broadcast of {x.shape} from rank {root}")
        if buf is not x:
            x[...] = buf

    def barrier(self) -> None:
        self._finish(self.comm.Ibarrier(), "barrier")

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)


class NCCLCommunicator(MPICommunicator):
    """Collectives on CuPy arrays over NCCL, one GPU per rank (rank modulo the GPUs of
    its machine). Written against CuPy's documented `cupy.cuda.nccl` API; MPI carries
    the bootstrap, the barrier and the abort."""

    backend = "nccl"

    def __init__(self, comm: Any, mpi: Any, timeout: float) -> None:
        super().__init__(comm, mpi, timeout)
        import cupy
        from cupy.cuda import nccl
        self.cp, self.nccl = cupy, nccl
        self.device = f"cuda:{self.rank % cupy.cuda.runtime.getDeviceCount()}"
        cupy.cuda.Device(int(self.device.split(":")[1])).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = comm.bcast(uid, root=0)
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._types = {np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.float32): nccl.NCCL_FLOAT32,
                       np.dtype(np.float64): nccl.NCCL_FLOAT64, np.dtype(np.int32): nccl.NCCL_INT32,
                       np.dtype(np.int64): nccl.NCCL_INT64}

    def _nccl_type(self, x: Any) -> Any:
        t = self._types.get(np.dtype(x.dtype))
        if t is None:
            raise DistributedError(f"nccl: no NCCL type for dtype {x.dtype}")
        return t

    def _sync(self, what: str) -> None:
        stream = self.cp.cuda.get_current_stream()
        event = stream.record()
        t0 = time.perf_counter()
        _Poll(self, what).wait(event.query)
        self.comm_seconds += time.perf_counter() - t0

    def all_reduce_array(self, backend: Any, x: Any, reduction: str) -> Any:
        if isinstance(x, np.ndarray):               # host values (a logged loss) go over MPI
            return super().all_reduce_array(backend, x, reduction)
        x = self.cp.ascontiguousarray(x)
        out = self.cp.empty_like(x)
        stream = self.cp.cuda.get_current_stream().ptr
        self.nccl_comm.allReduce(x.data.ptr, out.data.ptr, x.size, self._nccl_type(x),
                                 self.nccl.NCCL_SUM, stream)
        self._sync(f"nccl all_reduce of {x.shape} {x.dtype}")
        if reduction == "mean":
            out /= self.size
        return out

    def broadcast_array(self, x: Any, root: int) -> None:
        if isinstance(x, np.ndarray):
            return super().broadcast_array(x, root)
        stream = self.cp.cuda.get_current_stream().ptr
        self.nccl_comm.bcast(x.data.ptr, x.size, self._nccl_type(x), root, stream)
        self._sync(f"nccl broadcast of {x.shape} from rank {root}")

    def abort(self, code: int = 1) -> None:
        self.nccl_comm.abort()
        super().abort(code)


_group: list[MPICommunicator | None] = [None]


def _import_mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise DistributedError(f"engine.distributed needs mpi4py ({e}): {INSTALL_HINT}") from None
    return MPI


def _has_gpu() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:                       # no CuPy, no driver, no device
        return False


def init(backend: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> MPICommunicator:
    """Join the job (started by mpiexec; a plain `python` run is a job of one process).
    backend "mpi" (CPU arrays), "nccl" (CuPy arrays) or "auto" (NCCL where CuPy sees a
    GPU, else MPI). Collectives raise DistributedError after `timeout` seconds."""
    if backend not in ("auto", "mpi", "nccl"):
        raise ValueError(f"distributed.init: backend must be 'auto', 'mpi' or 'nccl', got {backend!r}")
    if timeout <= 0:
        raise ValueError(f"distributed.init: timeout must be > 0 seconds, got {timeout}")
    if _group[0] is not None:
        return _group[0]
    if backend == "auto":
        backend = "nccl" if _has_gpu() else "mpi"
    elif backend == "nccl" and not _has_gpu():
        raise DistributedError("distributed.init(backend='nccl') needs CuPy and a CUDA GPU; "
                               "use backend='mpi' for CPU arrays")
    mpi = _import_mpi()
    cls = NCCLCommunicator if backend == "nccl" else MPICommunicator
    group = _group[0] = cls(mpi.COMM_WORLD, mpi, timeout)
    if group.size > 1:
        _abort_job_on_uncaught_exceptions(group)
    return group


def _abort_job_on_uncaught_exceptions(group: MPICommunicator) -> None:
    """An uncaught exception on one rank ends every rank (MPI_Abort), after printing it."""
    previous = sys.excepthook

    def hook(kind: type, value: BaseException, tb: Any) -> None:
        previous(kind, value, tb)
        sys.stderr.write(f"rank {group.rank}/{group.size}: {kind.__name__} above; aborting "
                         f"every rank of the job\n")
        sys.stderr.flush()
        group.abort(1)
    sys.excepthook = hook


def is_initialized() -> bool:
    return _group[0] is not None


def group() -> MPICommunicator:
    """The communicator init() set up."""
    if _group[0] is None:
        raise DistributedError("engine.distributed: call engine.distributed.init() first")
    return _group[0]


def rank() -> int:
    return group().rank


def world_size() -> int:
    return group().size


def all_reduce(x: Tensor, op: str = "sum") -> Tensor:
    """Sum ("sum") or mean ("mean") of `x` over every rank, as a new tensor (an op: it
    works under eg.jit and is differentiable)."""
    return ops.REGISTRY["all_reduce"](x, group=group(), reduction=op)


def broadcast(x: Tensor, root: int = 0) -> Tensor:
    """Overwrite `x` in place with rank `root`'s values; returns x."""
    g = group()
    if not 0 <= root < g.size:
        raise ValueError(f"broadcast: root must be a rank in [0, {g.size}), got {root}")
    g.broadcast_array(x._data, root)
    x._version[0] += 1
    return x


def silence_other_ranks() -> None:
    """Send the standard output of every rank but 0 to /dev/null, so a script run under
    mpiexec prints its progress once (errors still reach stderr from every rank)."""
    if rank() != 0:
        sys.stdout = open(os.devnull, "w")


def barrier() -> None:
    """Wait until every rank gets here (with the deadline of every collective)."""
    group().barrier()


__all__ = ["DistributedError", "init", "is_initialized", "group", "rank", "world_size",
           "all_reduce", "broadcast", "barrier", "silence_other_ranks"]
