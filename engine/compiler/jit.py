"""`engine.jit`: trace once per input signature, optimise, generate code, run.

The contract: a compiled call returns what the eager call would, or raises; it
never returns a value computed from stale state. Programs are cached by the
signature of their tensor arguments (shape, dtype, device, requires_grad), the
type and value of static arguments, and this thread's grad mode and autocast
dtype. Each cached program carries a guard (see `guards`) over what its trace
read from Python objects: how each captured tensor was reached (closure cell,
global, module attribute, list or dict entry, optimizer state) and that it is the
same object with the same shape, dtype, device and requires_grad; the entries of
every container and object on those paths (so a rebound parameter, a parameter
added later, a replaced list element, a reloaded optimizer state or
`module.training` set directly are seen); the None-ness of `.grad` of the tensors
it touched (backward accumulates into an existing .grad); the versions of
tensors whose values it read on the host. A failed guard retraces. Captured
tensors are read afresh at every call, so in-place edits need no retrace.
"""
from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any, Callable

import numpy as np

from ops.errors import TraceError

from ..state import autocast_state, get_backend, grad_mode
from ..tensor import Tensor
from .capture import GraphedProgram, graphs_enabled
from .codegen import Generated, generate
from .guards import Guard, build_guard, find_sources, reachable_tensors
from .ir import Program
from .pipeline import run_passes
from .trace import Traced, flatten, statics, trace, unflatten

# Tracing rebinds the data of tensors the function updates until it is done: one
# trace at a time in the process (re-entrant: a traced function may call a jitted one).
_TRACE_LOCK = threading.RLock()
_VARIANTS = 8            # programs kept per signature (e.g. train and eval modes)


def _debug_level() -> int:
    return int(os.environ.get("ENGINE_DEBUG", "0") or 0)


class _Entry:
    def __init__(self, traced: Traced, program: Program, generated: Generated, stats: list,
                 compile_time: float, guard: Guard, runner: Any) -> None:
        self.traced = traced
        self.program = program
        self.generated = generated
        self.runner = runner             # the generated function, or it as a CUDA graph
        self.stats = stats
        self.compile_time = compile_time
        self.guard = guard
        self.checked: list = [None] * len(traced.captures)   # arrays known to match
        self.readers = [(c.holder, c.kind == "grad") for c in traced.captures]
        self.arg_grads = [wb.arg for wb in traced.writebacks if wb.kind == "grad" and wb.arg >= 0]
        # The writebacks split by kind, outside tensors bound once (a call's own arguments
        # are looked up in its leaves): the loop runs ~170 times per training step.
        # When the function writes to one of its own arguments (it may be the very tensor
        # another writeback targets), or one .grad twice, they run in trace order instead.
        grad_targets = [id(wb.tensor) for wb in traced.writebacks if wb.kind != "data"]
        ordered = (any(wb.arg >= 0 for wb in traced.writebacks)
                   or len(set(grad_targets)) < len(grad_targets))
        fixed = [] if ordered else traced.writebacks
        self.data_writes = [(wb.tensor, wb.index) for wb in fixed if wb.kind == "data"]
        self.grad_writes = [(wb.tensor, wb.index) for wb in fixed if wb.kind == "grad"]
        self.grad_clears = [wb.tensor for wb in fixed if wb.kind == "grad_none"]
        self.ordered_writes = traced.writebacks if ordered else []
        inputs = {v: i for i, v in enumerate(traced.program.inputs)}
        captures = {v: i for i, (v, _) in enumerate(traced.program.captures)}
        # Value checks (eg.check_values) on arguments and captures run on them; values the
        # program computes are computed first by a prelude program (`checked`), so that
        # every check runs before the program and nothing is written back on a failure.
        self.checks = [(inputs.get(v), captures.get(v), check) for v, check in traced.checks
                       if v in inputs or v in captures]
        self.checked_values: Generated | None = None
        self.computed_checks = [check for v, check in traced.checks
                                if v not in inputs and v not in captures]


class Compiled:
    """A function compiled by `engine.jit` (call it like the function)."""

    def __init__(self, fn: Callable[..., Any], static_argnums: tuple = (), fuse: bool = True,
                 plan_memory: bool = True, cuda_graphs: bool = True) -> None:
        self.fn = fn
        self.static_argnums = tuple(static_argnums)
        self.fuse = fuse
        self.plan_memory = plan_memory
        self.cuda_graphs = cuda_graphs
        self._cache: dict = {}          # key -> [entry, ...], most recent first
        self._last: _Entry | None = None
        self.traces = 0
        functools.update_wrapper(self, fn)

    # -- calling ------------------------------------------------------------------------------
    def _key(self, args: tuple, kwargs: dict) -> tuple:
        leaves, structure = flatten((args, kwargs))
        sig = tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in leaves)
        key = (sig, structure, grad_mode.enabled, autocast_state.dtype)
        try:
            hash(key)
        except TypeError:
            raise TraceError(f"jit({getattr(self.fn, '__name__', 'fn')}): non-tensor arguments "
                             f"are static and must be hashable; got {structure!r}") from None
        return key, leaves

    def _find(self, key: tuple) -> _Entry | None:
        for entry in self._cache.get(key, ()):
            failed = entry.guard.failed(entry.checked)
            if not failed:
                return entry
            if _debug_level() >= 1:
                print(f"engine.jit({getattr(self.fn, '__name__', 'fn')}): retrace: "
                      f"{entry.guard.explain(failed)}")
        return None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key, leaves = self._key(args, kwargs)
        entry = self._find(key)
        if entry is None:
            with _TRACE_LOCK:                   # concurrent first calls: one traces
                entry = self._find(key)
                if entry is None:
                    if self._last is not None:      # tracing needs memory too
                        self._last.runner.release()
                    entry = self._compile(args, kwargs, leaves)
                    self._cache[key] = [entry] + self._cache.get(key, [])[:_VARIANTS - 1]
        last = self._last
        if last is not entry:
            # Only the program in use keeps its buffers: a program left behind (the first
            # step's, traced before any .grad existed; eval's while training) would
            # otherwise hold a second set of activations for good.
            if last is not None:
                last.runner.release()
            self._last = entry
        return self._run(entry, leaves)

    def _run(self, entry: _Entry, leaves: list) -> Any:
        traced = entry.traced
        backend = entry.generated.backend
        for i in entry.arg_grads:
            if leaves[i].grad is not None:
                raise TraceError(f"jit({getattr(self.fn, '__name__', 'fn')}): tensor argument {i} "
                                 f"already has a .grad, which the compiled backward would replace "
                                 f"instead of accumulating into: set it to None before the call")
        inputs = [t._data for t in leaves]
        captures = [h.grad._data if g else h._data for h, g in entry.readers]
        for i, j, check in entry.checks:
            check(backend.to_numpy(inputs[i] if i is not None else captures[j]))
        if entry.checked_values is not None:
            for value, check in zip(entry.checked_values(inputs, captures), entry.computed_checks):
                check(backend.to_numpy(value))
        results = entry.runner(inputs, captures)
        n = entry.program.meta["n_results"]
        out_tensors = [Tensor(r, backend) for r in results[:n]]
        for t, i in entry.data_writes:
            r = results[i]
            t._data = r if type(r) is np.ndarray else backend.asarray(r)   # NumPy's 0-d scalars
            t._version[0] += 1
        for t, i in entry.grad_writes:
            t.grad = Tensor(results[i], backend)
        for t in entry.grad_clears:
            t.grad = None
        for wb in entry.ordered_writes:
            target = wb.target(leaves)
            if wb.kind == "data":
                target._data = backend.asarray(results[wb.index])
                target._version[0] += 1
            elif wb.kind == "grad":
                target.grad = Tensor(results[wb.index], backend)
            else:
                target.grad = None
        entry.checked = [h.grad._data if g else h._data for h, g in entry.readers]  # valid now
        return unflatten(traced.out_structure, out_tensors)

    def _compile(self, args: tuple, kwargs: dict, leaves: list) -> _Entry:
        start = time.perf_counter()
        static_values = statics(flatten((args, kwargs))[1])
        traced = trace(self.fn, args, kwargs, reachable_tensors(self.fn, static_values))
        self.traces += 1
        devices = {t.device for t in leaves} | {c.meta[2] for c in traced.captures}
        backend = get_backend(devices.pop() if len(devices) == 1 else "cpu")
        program, stats = run_passes(traced.program, backend, fuse=self.fuse)
        generated = generate(program, backend, plan=self.plan_memory)
        stats.append(dict(name="plan_memory", **generated.stats))
        guard = self._guard(traced, leaves, args, kwargs)
        if _debug_level() >= 3:
            print(f"== generated source\n{generated.source}")
        runner = self._runner(generated, program, traced, backend, stats)
        entry = _Entry(traced, program, generated, stats, time.perf_counter() - start, guard, runner)
        if entry.computed_checks:
            entry.checked_values = self._prelude(traced, backend)
        return entry

    def _runner(self, generated: Generated, program: Program, traced: Traced, backend: Any,
                stats: list) -> Any:
        """The generated function, as a CUDA graph on a CUDA device unless turned off
        (its state is the `cuda_graphs` entry of `stats()`)."""
        if getattr(backend, "cp", None) is None:
            return generated
        if not graphs_enabled(self.cuda_graphs):
            stats.append(dict(name="cuda_graphs", captured=False,
                              reason="turned off (jit(cuda_graphs=False) or ENGINE_CUDA_GRAPHS=0)"))
            return generated
        name = getattr(self.fn, "__name__", "fn")
        runner = GraphedProgram(generated, program, traced, name,
                                lambda message: print(message) if _debug_level() >= 1 else None)
        stats.append(runner.status)
        return runner

    def _prelude(self, traced: Traced, backend: Any) -> Generated:
        """A program computing only the values checked inside the traced one."""
        p = traced.program
        values = [v for v, _ in traced.checks if v not in p.inputs
                  and v not in [c for c, _ in p.captures]]
        prelude = Program(inputs=p.inputs, captures=p.captures, constants=dict(p.constants),
                          nodes=list(p.nodes), outputs=values,
                          meta=dict(n_results=len(values), donations={}))
        return generate(run_passes(prelude, backend, fuse=False)[0], backend, plan=False)

    def _guard(self, traced: Traced, leaves: list, args: tuple, kwargs: dict) -> Guard:
        """The checks that keep this trace valid (see `guards`)."""
        holders = [c.holder for c in traced.captures] + [t for t, _ in traced.host_reads]
        roots, paths = find_sources(self.fn, statics(flatten((args, kwargs))[1]),
                                    {id(t) for t in holders})
        return build_guard(roots, paths, [(c.holder, c.kind, c.meta) for c in traced.captures],
                           traced.grad_none, traced.host_reads, traced.touched)

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
    def guard(self) -> Guard:
        """The guard of the last call's program (its `source` and comparison `count`)."""
        return self._entry().guard

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
        plan_memory: bool = True, cuda_graphs: bool = True) -> Any:
    """Compile `fn` (usable as `@jit` or `@jit(fuse=False)`).

    `fn` takes tensors (in nested lists/tuples/dicts) and static Python values; it may
    call backward and update parameters in place under no_grad: captured tensors
    (parameters, optimizer state) are inputs read at every call, and their updates
    and new gradients are written back after it (backward accumulates into an
    existing .grad, as eager does).

    A compiled call returns what the eager call would, or raises: rebinding or
    adding parameters, replacing list or dict entries, closure variables or globals,
    loading module or optimizer state, switching train/eval (or setting `training`),
    grad mode, autocast, and static arguments of another type or value all retrace
    (see the module docstring and `guards`). Frozen into the trace, not guarded:
    Python floats it reads (a learning rate in a float: keep changing numbers in
    tensors), NumPy arrays' contents and the function's Python side effects.

    On a CUDA device the program is recorded into a CUDA graph on its second call and
    replayed after (see `compiler.capture`; `stats()` says whether it was and why not);
    `cuda_graphs=False`, or ENGINE_CUDA_GRAPHS=0 in the environment, launches plainly.
    """
    if fn is None:
        return lambda f: Compiled(f, static_argnums, fuse, plan_memory, cuda_graphs)
    return Compiled(fn, static_argnums, fuse, plan_memory, cuda_graphs)
