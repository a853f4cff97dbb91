"""One knob for every thread the engine computes with: `set_num_threads(n)`.

It sizes both pools a CPU step runs on: the BLAS library's (NumPy's matmuls, set at
run time through threadpoolctl, so no environment variable has to be exported before
NumPy loads) and the engine's own C kernels' (backends/cparallel.py, whose workers
sleep rather than spin while they wait). Until it is called both use their default:
the cores this process may run on, or OMP_NUM_THREADS where the user set it (as
PyTorch does).
"""
from __future__ import annotations

from backends import cparallel

_blas_limits = None          # kept: threadpoolctl's record of the limits set


def set_num_threads(n: int) -> None:
    """Use `n` threads for BLAS and for the engine's C kernels (1: everything serial)."""
    global _blas_limits
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive int, got {n!r}")
    from threadpoolctl import ThreadpoolController      # scans the loaded libraries: on first use
    _blas_limits = ThreadpoolController().limit(limits=n, user_api="blas")
    cparallel.set_threads(n)


def get_num_threads() -> int:
    """The threads the engine's kernels use (and BLAS, once set here)."""
    return cparallel.threads()
