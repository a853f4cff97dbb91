"""Keep freed host memory in the process, so per-step arrays cost no page faults.

A training step allocates and frees the same large arrays every step (activations,
gradients, temporaries of ~0.1-4 MB). glibc's malloc serves such sizes with fresh
`mmap`s, or trims the heap back to the OS when they are freed, so every step
page-faults the memory in again: ~15,000 faults and ~25% of the step time on the
`base` benchmark. Raising the mmap and trim thresholds makes malloc reuse freed
blocks instead — the behaviour of a caching allocator (PyTorch's CUDA allocator,
for example). The cost: memory freed inside the process is not returned to the
OS until the process ends, so resident memory stays at its high-water mark.

Set ENGINE_KEEP_FREED_MEMORY=0 to leave the allocator alone. Other C libraries
(musl, macOS, Windows) are left alone too.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLDS = (1 << 30, 32 << 20)        # glibc accepts 1 GiB on 64-bit; 32 MiB everywhere
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc malloc once per process; True when the thresholds are in force."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("ENGINE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        ctypes.CDLL(None).gnu_get_libc_version      # glibc only
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    for threshold in _THRESHOLDS:
        # Both or neither: a trim threshold alone freezes mmap's at 128 KiB (worse).
        if mallopt(_M_MMAP_THRESHOLD, threshold) == 1:
            _applied = mallopt(_M_TRIM_THRESHOLD, 2 * threshold) == 1
            break
    return _applied
