"""Switches: gradient recording, autocast, the interpreter stack, the default dtype, seeding.

As in PyTorch, grad mode, autocast, the autograd phase and the interpreter stack
are per thread (each thread starts from the defaults: grad on, no autocast, eager
interpreter), so `no_grad` or tracing in one thread never changes what another
thread records or computes. Seeds and backends are process-wide.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import numpy as np

import backends
from ops.dtypes import as_dtype
from ops.errors import DeviceError

DEFAULT_FLOAT = np.dtype(np.float32)

class _Interpreters(threading.local):
    """Interpreters handling this thread's op calls, innermost last; every thread
    starts with the base interpreter engine.dispatch installs (eager mode)."""
    base: object = None

    def __init__(self) -> None:
        self.stack = [self.base]


interpreters = _Interpreters()


class _Autocast(threading.local):
    """The low-precision dtype matmuls run in inside `eg.autocast` (this thread), or None."""
    dtype = None


autocast_state = _Autocast()


class _Phase(threading.local):
    """"forward" normally, "backward" while autograd runs VJPs (for the profiler)."""
    name = "forward"


phase = _Phase()


class _GraphState(threading.local):
    """keep_inputs: record every input of an autograd node as the real tensor, even
    where the VJP does not read it (tools that re-run recorded ops on their inputs:
    gradcheck's per-op localisation, symbolic verification). Off: such inputs are
    recorded as data-less edges, so unused intermediates are freed after forward."""
    keep_inputs = False


graph_state = _GraphState()


@contextlib.contextmanager
def keep_graph_inputs(enabled: bool = True) -> Iterator[None]:
    """Inside the block, autograd nodes keep all their inputs (see _GraphState)."""
    previous, graph_state.keep_inputs = graph_state.keep_inputs, enabled
    try:
        yield
    finally:
        graph_state.keep_inputs = previous


class _GradMode(threading.local):
    """Is autograd recording in this thread (class default: yes)?"""
    enabled = True


grad_mode = _GradMode()


class _SetGrad(contextlib.ContextDecorator):
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.prev: list[bool] = []

    def __enter__(self) -> "_SetGrad":
        self.prev.append(grad_mode.enabled)
        grad_mode.enabled = self.enabled
        return self

    def __exit__(self, *exc: object) -> None:
        grad_mode.enabled = self.prev.pop()


def no_grad() -> _SetGrad:
    """Context manager / decorator: ops inside record no graph (as torch.no_grad)."""
    return _SetGrad(False)


def enable_grad() -> _SetGrad:
    """Context manager / decorator: turn recording back on inside a no_grad block."""
    return _SetGrad(True)


def is_grad_enabled() -> bool:
    return grad_mode.enabled


@contextlib.contextmanager
def set_grad_enabled(enabled: bool) -> Iterator[None]:
    with _SetGrad(enabled):
        yield


_seed: list[int | None] = [None]


def manual_seed(seed: int) -> None:
    """Seed the random generators of every device, now and of devices started later."""
    _seed[0] = int(seed)
    for be in backends.loaded_backends():
        be.seed(int(seed))


def get_backend(device: str) -> backends.Backend:
    """The backend of `device`, seeded with the last manual_seed when first started."""
    fresh = device not in backends._instances
    try:
        be = backends.get_backend(device)
    except backends.BackendUnavailable as e:      # e.g. "cuda" without CuPy or a GPU
        raise DeviceError(str(e)) from None
    if fresh and _seed[0] is not None:
        be.seed(_seed[0])
    return be


@contextlib.contextmanager
def autocast(dtype: object = np.float16, enabled: bool = True) -> Iterator[None]:
    """Mixed precision: matmuls inside the block compute in `dtype` (float16 by
    default; backends accumulate in float32), the rest stays float32. Pair it with
    `nn.amp.GradScaler` so small float16 gradients do not flush to zero."""
    previous = autocast_state.dtype
    autocast_state.dtype = as_dtype(dtype) if enabled else None
    try:
        yield
    finally:
        autocast_state.dtype = previous
