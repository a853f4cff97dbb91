"""CUDA graphs on CuPy: record a program's launches once, replay them with one call.

A launch-bound program (a small model's training step: hundreds of kernels of a
few microseconds each) spends most of its time in the host code that launches
them. Stream capture records the launches of one run into a `cupy.cuda.Graph`;
`Graph.launch` then replays all of them for the cost of one launch.

What a recording fixes, and how this module keeps it from going stale:
- Addresses: every array a recorded kernel reads or writes is baked in. Memory the
  recording allocates comes from a private memory pool that only this recording
  uses (`Recording.allocating`), so a buffer freed during the recording is never
  handed to anyone else while the graph may still write it. The caller keeps the
  arrays it reads (static inputs) and copies new values into them before a replay.
- Scalars: kernel arguments are baked too, so random draws must not pass their
  Philox counter as one. Inside a recording, `CupyBackend.random` asks
  `recording_rng()` for the draw: the kernel reads the first counter and the key
  from a small device array (`GraphRng.state`), which `GraphRng.arm` fills before
  every replay with counters claimed from the device's stream, so every replay
  draws new numbers, the ones eager draws in the same order.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Iterator

import numpy as np

_local = threading.local()          # the recording this thread is in (random draws ask it)
_LIVE: "weakref.WeakSet[Recording]" = weakref.WeakSet()   # recordings holding device memory


def recording_rng() -> "GraphRng | None":
    """The random-number state of the recording running in this thread, or None."""
    return getattr(_local, "rng", None)


def draw_kernel_source(draw: Any, dtype: Any) -> tuple[str, str, str]:
    """(in_params, out_params, body) of a Philox draw whose first counter and key are
    read from device memory (0-d arrays) plus a fixed offset: the draw's own body, with
    `start`, `k0` and `k1` made from them, so its bits equal the eager draw's."""
    ins, outs, body = draw.kernel_source(dtype)
    extra = ", uint32 threshold" if "threshold" in ins else ""
    head = ("const unsigned long long start = (unsigned long long)rng_first + "
            "(unsigned long long)rng_offset;\n"
            "const unsigned int k0 = (unsigned int)rng_key0;\n"
            "const unsigned int k1 = (unsigned int)rng_key1;\n")
    return ("uint64 rng_first, uint64 rng_offset, uint64 rng_key0, uint64 rng_key1" + extra,
            outs, head + body)


class GraphRng:
    """The counters a recording's draws use: draw j reads counter `first + offset_j`,
    where `first` sits in device memory and the offsets are the sizes of the draws
    before it; `total` counters are claimed per replay."""

    def __init__(self, backend: Any, warm: bool = False) -> None:
        self.backend = backend
        self.state = backend.cp.zeros((3,), dtype=np.uint64)   # first counter, key words
        self.total = 0
        # warm: run now (not recorded), each draw claiming its counters as eager does; a
        # plain run before the recording builds and loads the kernels it will record.
        self.warm = warm

    def draw(self, draw: Any, shape: tuple, dtype: Any, p: float) -> Any:
        be, cp = self.backend, self.backend.cp
        dt = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64))
        out = cp.empty(shape, dtype=dt)
        if n == 0:
            return out
        key = ("philox-graph", draw.name, dt)
        kernel = be._kernels.get(key)
        if kernel is None:
            ins, outs, body = draw_kernel_source(draw, dt)
            kernel = be._kernels[key] = cp.ElementwiseKernel(
                ins, outs, body, f"engine_philox_graph_{draw.name}_{dt.name}")
        s, offset = self.claim(n)
        scalars = [np.uint32(draw.threshold(p))] if draw.thresholded else []
        return kernel(s[0], offset, s[1], s[2], *scalars, out)

    def claim(self, n: int) -> tuple:
        """(state, offset) for a kernel drawing `n` counters: it reads the first counter and
        the key words from `state` (a device array of 3 uint64) and adds `offset`. Warm:
        the counters are claimed now, as eager does; recording: they come at each replay."""
        be = self.backend
        if self.warm:
            self.state.set(np.array([be.claim_counters(n), *be.rng_key], dtype=np.uint64))
            return self.state, np.uint64(0)
        offset = np.uint64(self.total)
        self.total += n
        return self.state, offset

    def arm(self, stream: Any) -> None:
        """Before a replay: claim this replay's counters and put them and the key (which
        `manual_seed` may have changed) where the recorded kernels read them."""
        if not self.total:
            return
        be = self.backend
        host = np.array([be.claim_counters(self.total), be.rng_key[0], be.rng_key[1]], dtype=np.uint64)
        self.state.set(host, stream=stream)


@contextlib.contextmanager
def warming(backend: Any) -> Iterator[None]:
    """Random draws inside use the kernels a recording will use, run at once."""
    _local.rng = GraphRng(backend, warm=True)
    try:
        yield
    finally:
        _local.rng = None


class Recording:
    """One stream capture: a private stream and memory pool, and the graph it made."""

    def __init__(self, cp: Any) -> None:
        self.cp = cp
        self.pool = cp.cuda.MemoryPool()
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.graph: Any = None
        self.rng: GraphRng | None = None
        _LIVE.add(self)

    @contextlib.contextmanager
    def allocating(self) -> Iterator[None]:
        """Allocations inside come from this recording's own pool."""
        with self.cp.cuda.using_allocator(self.pool.malloc):
            yield

    def record(self, backend: Any, fn: Callable[[], Any]) -> Any:
        """Run `fn` with its launches recorded instead of executed (nothing runs: the
        values of what it returns are computed by `launch`); returns fn's result."""
        stream = self.stream
        with self.allocating(), stream:
            if self.rng is None:
                self.rng = GraphRng(backend)
            stream.begin_capture()
            _local.rng = self.rng
            try:
                result = fn()
            except BaseException:
                with contextlib.suppress(Exception):
                    stream.end_capture()     # end the broken capture; its error is fn's
                raise
            finally:
                _local.rng = None
            self.graph = stream.end_capture()
        return result

    def launch(self, stream: Any) -> None:
        """Replay on `stream` (the caller's: ordered after its copies and before its reads)."""
        if self.rng is not None:
            self.rng.arm(stream)
        self.graph.launch(stream=stream)

    def release(self) -> None:
        self.graph = None
        self.rng = None
        self.pool.free_all_blocks()


def held_bytes() -> int:
    """Device memory the live recordings' private pools hold (for memory reports: the
    default pool does not count it)."""
    return sum(int(r.pool.total_bytes()) for r in list(_LIVE))


def supports_graphs(backend: Any) -> str | None:
    """None when `backend` can record graphs, else why not."""
    cp = getattr(backend, "cp", None)
    if cp is None:
        return f"device {backend.name!r} has no CUDA graphs"
    cuda = cp.cuda
    if not all(hasattr(cuda, n) for n in ("Graph", "Stream", "MemoryPool", "using_allocator")) or \
            not hasattr(cuda.Stream, "begin_capture"):
        return "this CuPy cannot capture streams into graphs (CuPy 13 or newer can)"
    return None


__all__ = ["GraphRng", "Recording", "draw_kernel_source", "held_bytes", "recording_rng", "supports_graphs",
           "warming"]
