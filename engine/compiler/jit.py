"""`engine.jit`: trace once per input signature, optimise, generate code, run.

Compiled programs are cached by the signature of their tensor arguments (shape,
dtype, device, requires_grad), the values of static arguments, grad mode and the
train/eval epoch of modules; captured tensors are checked against the shapes and
dtypes they had when traced. Anything else retraces, so a program is never
replayed with stale shapes. Captured tensors are read afresh at every call.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable

from ops.errors import TraceError

from ..state import get_backend, grad_mode, mode_epoch
from ..tensor import Tensor
from .codegen import Generated, generate
from .ir import Program
from .passes import run_passes
from .trace import Traced, flatten, trace, unflatten


class _Entry:
    def __init__(self, traced: Traced, program: Program, generated: Generated, stats: list,
                 compile_time: float) -> None:
        self.traced = traced
        self.program = program
        self.generated = generated
        self.stats = stats
        self.compile_time = compile_time
        self.checked: list = [None] * len(traced.capture_tensors)   # arrays known to match

    def guards_hold(self) -> bool:
        """Do the captured tensors still have the traced shapes and dtypes? An array
        already checked (usually the one the last call wrote) needs no second look."""
        checked = self.checked
        for i, (t, g) in enumerate(zip(self.traced.capture_tensors, self.traced.capture_guards)):
            data = t._data
            if data is checked[i] and t.requires_grad == g[3]:
                continue
            if (tuple(t.shape), t.dtype, t.device, t.requires_grad) != g:
                return False
            checked[i] = data
        return True


class Compiled:
    """A function compiled by `engine.jit` (call it like the function)."""

    def __init__(self, fn: Callable[..., Any], static_argnums: tuple = (), fuse: bool = True,
                 plan_memory: bool = True) -> None:
        self.fn = fn
        self.static_argnums = tuple(static_argnums)
        self.fuse = fuse
        self.plan_memory = plan_memory
        self._cache: dict = {}
        self._last: _Entry | None = None
        self.traces = 0
        functools.update_wrapper(self, fn)

    # -- calling ------------------------------------------------------------------------------
    def _key(self, args: tuple, kwargs: dict) -> tuple:
        leaves, structure = flatten((args, kwargs))
        sig = tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in leaves)
        try:
            hash(structure)
        except TypeError:
            raise TraceError(f"jit({getattr(self.fn, '__name__', 'fn')}): non-tensor arguments "
                             f"are static and must be hashable; got {structure!r}") from None
        return (sig, structure, grad_mode.enabled, mode_epoch.value), leaves

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key, leaves = self._key(args, kwargs)
        entry = self._cache.get(key)
        if entry is None or not entry.guards_hold():
            entry = self._cache[key] = self._compile(args, kwargs, leaves)
        self._last = entry
        traced = entry.traced
        results = entry.generated([t._data for t in leaves],
                                  [t._data for t in traced.capture_tensors])
        backend = entry.generated.backend
        n = entry.program.meta["n_results"]
        out_tensors = [Tensor(r, backend) for r in results[:n]]
        for wb in traced.writebacks:
            if wb.kind == "data":             # asarray: NumPy gives 0-d results as scalars
                wb.tensor._data = backend.asarray(results[wb.index])
                wb.tensor._version[0] += 1
            elif wb.kind == "grad":
                wb.tensor.grad = Tensor(results[wb.index], backend)
            else:
                wb.tensor.grad = None
        entry.checked = [t._data for t in traced.capture_tensors]    # as just written: valid
        return unflatten(traced.out_structure, out_tensors)

    def _compile(self, args: tuple, kwargs: dict, leaves: list) -> _Entry:
        start = time.perf_counter()
        traced = trace(self.fn, args, kwargs)
        self.traces += 1
        devices = {t.device for t in leaves} | {t.device for t in traced.capture_tensors}
        backend = get_backend(devices.pop() if len(devices) == 1 else "cpu")
        program, stats = run_passes(traced.program, backend, fuse=self.fuse)
        generated = generate(program, backend, plan=self.plan_memory)
        stats.append(dict(name="plan_memory", **generated.stats))
        if int(os.environ.get("ENGINE_DEBUG", "0") or 0) >= 3:
            print(f"== generated source\n{generated.source}")
        return _Entry(traced, program, generated, stats, time.perf_counter() - start)

    # -- inspection -----------------------------------------------------------------------------
    def _entry(self) -> _Entry:
        if self._last is None:
            raise TraceError("call the compiled function once first: programs are traced per "
                             "input signature")
        return self._last

    @property
    def ir(self) -> Program:
        """The optimised program of the last call's signature."""
        return self._entry().program

    @property
    def traced_ir(self) -> Program:
        """The program as traced, before any pass."""
        return self._entry().traced.program

    @property
    def source(self) -> str:
        """The generated Python source."""
        return self._entry().generated.source

    @property
    def compile_time(self) -> float:
        return self._entry().compile_time

    def stats(self) -> list[dict]:
        """What each pass did (node counts before/after; buffers planned and reused)."""
        return self._entry().stats

    def to_mermaid(self) -> str:
        return self.ir.to_mermaid()

    def to_dot(self) -> str:
        return self.ir.to_dot()

    @property
    def cache_size(self) -> int:
        return len(self._cache)


def jit(fn: Callable[..., Any] | None = None, *, static_argnums: tuple = (), fuse: bool = True,
        plan_memory: bool = True) -> Any:
    """Compile `fn` (usable as `@jit` or `@jit(fuse=False)`).

    `fn` takes tensors (in nested lists/tuples/dicts) and static Python values; it may
    call backward and update parameters in place under no_grad: captured tensors
    (parameters, optimizer state) are inputs read at every call, and their updates
    and new gradients are written back after it. Python values the function reads
    from elsewhere (a learning rate in a float, a step counter) are frozen into the
    trace: keep changing state in tensors.
    """
    if fn is None:
        return lambda f: Compiled(f, static_argnums, fuse, plan_memory)
    return Compiled(fn, static_argnums, fuse, plan_memory)
