"""Shared timing helper: median of repeated runs, in one process."""
from __future__ import annotations

import time
from typing import Callable


def median_time(fn: Callable[[], object], repeat: int = 200, warmup: int = 20) -> float:
    """Median seconds per call of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]
