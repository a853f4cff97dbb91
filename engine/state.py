"""Switches: gradient recording, autocast, the interpreter stack, the default dtype, seeding.

As in PyTorch, grad mode, autocast, the autograd phase and the interpreter stack
are per thread (each thread starts from the defaults: grad on, no autocast, eager
interpreter), so `no_grad` or tracing in one thread never changes what another
thread records or computes. Seeds, the random streams and backends are process-wide.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import numpy as np

import backends
from ops.dtypes import as_dtype
from ops.errors import DeviceError
from ops.random import fold_in

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


# -- the random streams (Philox, ops/random.py): a key and a counter per device -----------
_seed: list[int | None] = [None]
_pending_rng: dict[str, dict] = {}        # set_rng_state entries of devices not started yet
_fold_pending: list[int] = []             # folds since the seed, for devices started later


def manual_seed(seed: int) -> None:
    """Seed the random generators of every device, now and of devices started later."""
    _seed[0] = int(seed)
    _pending_rng.clear()
    _fold_pending.clear()
    for be in backends.loaded_backends():
        be.seed(int(seed))


def fold_in_rng(data: int) -> None:
    """Switch every device to sub-stream `data` of its current key (counter 0), as
    jax.random.fold_in: per-step and per-rank streams that never overlap each other."""
    for be in backends.loaded_backends():
        be.rng_key, be.rng_counter = fold_in(be.rng_key, data), 0
    _fold_pending.append(int(data))


_fold_pending: list[int] = []             # folds applied since the seed, for devices started later


def get_rng_state() -> dict:
    """The random state of every started device, as small plain data (JSON-ready):
    {"seed": s, "folds": [...], "devices": {"cpu": {"key": [k0, k1], "counter": n}, ...}}."""
    devices = {be.name: {"key": [int(k) for k in be.rng_key], "counter": int(be.rng_counter)}
               for be in backends.loaded_backends()}
    devices.update({d: st for d, st in _pending_rng.items() if d not in devices})
    return {"seed": _seed[0], "folds": list(_fold_pending), "devices": devices}


def set_rng_state(state: dict) -> None:
    """Restore what get_rng_state returned: draws continue exactly where they stopped.
    Devices the state names that are not started yet take it when they start."""
    try:
        seed, folds, devices = state["seed"], state["folds"], state["devices"]
        parsed = {str(d): {"key": [int(k) for k in st["key"]], "counter": int(st["counter"])}
                  for d, st in devices.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"set_rng_state: expected the dict get_rng_state returns, "
                         f"got {state!r} ({type(e).__name__}: {e})") from None
    for d, st in parsed.items():
        if len(st["key"]) != 2 or st["counter"] < 0:
            raise ValueError(f"set_rng_state: device {d!r} needs a key of 2 words and a "
                             f"counter >= 0, got {st}")
    _seed[0] = None if seed is None else int(seed)
    _fold_pending[:] = [int(f) for f in folds]
    _pending_rng.clear()
    loaded = {be.name: be for be in backends.loaded_backends()}
    for d, st in parsed.items():
        if d in loaded:
            _apply(loaded[d], st)
        else:
            _pending_rng[d] = st


def _apply(be: backends.Backend, st: dict) -> None:
    be.rng_key, be.rng_counter = (st["key"][0], st["key"][1]), st["counter"]


def _start_stream(be: backends.Backend) -> None:
    """A device started now joins the streams: its saved state, else seed and folds."""
    if be.name in _pending_rng:
        _apply(be, _pending_rng.pop(be.name))
        return
    if _seed[0] is not None:
        be.seed(_seed[0])
    for data in _fold_pending:
        be.rng_key = fold_in(be.rng_key, data)


def get_backend(device: str) -> backends.Backend:
    """The backend of `device`, joining the random streams when first started."""
    fresh = device not in backends._instances
    try:
        be = backends.get_backend(device)
    except backends.BackendUnavailable as e:      # e.g. "cuda" without CuPy or a GPU
        raise DeviceError(str(e)) from None
    if fresh:
        _start_stream(be)
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
