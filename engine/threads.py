"""One knob for every thread the engine computes with: `set_num_threads(n)`.

It sizes both pools a CPU step runs on: the BLAS library's (NumPy's matmuls, set at
run time through threadpoolctl, so no environment variable has to be exported before
NumPy loads) and the engine's own C kernels' (backends/cparallel.py, whose workers
sleep rather than spin while they wait).

Defaults: the C kernels use the cores this process may run on (or OMP_NUM_THREADS
where the user set it, as PyTorch does). BLAS starts at one thread unless the user
set a thread variable: OpenBLAS's workers spin while they wait, and on a machine
where other processes keep the cores busy a two-thread BLAS made a training step
10-30x slower (measured; see docs/design.md, "Threads"). `set_num_threads(n)` asks
for n everywhere, BLAS included.
"""
from __future__ import annotations

import os

from threadpoolctl import ThreadpoolController

from backends import cparallel

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_blas_limits = None          # kept: threadpoolctl's record of the limits set


def _limit_blas(n: int) -> None:
    global _blas_limits          # ThreadpoolController() scans the loaded libraries: ~10 ms
    _blas_limits = ThreadpoolController().limit(limits=n, user_api="blas")


def set_num_threads(n: int) -> None:
    """Use `n` threads for BLAS and for the engine's C kernels (1: everything serial)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive int, got {n!r}")
    _limit_blas(n)
    cparallel.set_threads(n)


def get_num_threads() -> int:
    """The threads the engine's C kernels use (and BLAS, once set here)."""
    return cparallel.threads()


def _apply_defaults() -> None:
    if not any(os.environ.get(v) for v in _THREAD_VARIABLES):
        _limit_blas(1)


_apply_defaults()
