"""CUDA graphs for compiled programs: what can be captured, and replaying it safely.

`plan_capture` says why a program cannot be captured (or None): the device has no
graphs, or it launches nothing. Values read on the host while tracing (a boolean
mask's nonzero positions, `.item()`) are frozen into the trace and guarded by version,
so they cost a replay nothing; value checks run before the program, outside the
graph. What the program's own calls do is known only by recording them: a host sync
or a transfer among them fails the capture, which then falls back. `GraphedProgram` wraps a program's generated function:
the first call runs it plainly (kernels are compiled and pools grown then), the
second records it into a CUDA graph (`backends.cuda_graphs`) and every later call
replays it. A capture that fails falls back to plain launches for good, with the
reason in `compiled.stats()` (and printed under ENGINE_DEBUG=1).

Buffers, and why no replay can hand back a stale or overwritten value:
- Arguments are copied into static buffers the graph owns before every replay (the
  caller's arrays are never written).
- Captured tensors (parameters, optimizer state) are read in place: the graph
  keeps the arrays it was recorded with and every call checks that each tensor
  still holds that same array; one rebound to a new array is recorded again (after
  three such recordings the program runs plainly). Updates written back to a
  captured tensor land in its own array (an in-graph copy when the program computed
  them elsewhere), so it keeps its array. Captured gradients are copied into
  static buffers, as arguments.
- Every other result is copied, inside the graph, into an output block: one for the
  function's return values, one for the values written back (gradients), so a loss
  kept for later does not keep the gradients alive. Each call returns views of fresh
  copies of the blocks, so a later replay never overwrites a result the caller holds.
- Random draws read their Philox counter from device memory, set before each
  replay (`cuda_graphs.GraphRng`).
Calls run one at a time per program (a second thread's concurrent call runs plainly).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import numpy as np

from backends.cuda_graphs import Recording, supports_graphs, warming

from .ir import Program

RECAPTURE_LIMIT = 3          # recordings after captured tensors were rebound, then plain
_ALIGN = 256                 # bytes between results in an output block


def graphs_enabled(requested: bool) -> bool:
    """`eg.jit(cuda_graphs=...)`, unless ENGINE_CUDA_GRAPHS=0 turns graphs off everywhere."""
    return requested and os.environ.get("ENGINE_CUDA_GRAPHS", "1") != "0"


def plan_capture(program: Program, backend: Any) -> str | None:
    """Why `program` cannot run as a CUDA graph on `backend`, or None when it can."""
    reason = supports_graphs(backend)
    if reason is not None:
        return reason
    if not program.nodes:
        return "the program launches nothing"
    return None


class GraphedProgram:
    """A generated program run as a CUDA graph when it can be (see the module docstring)."""

    def __init__(self, generated: Any, program: Program, traced: Any, name: str, log: Any) -> None:
        self.generated = generated
        self.backend = generated.backend
        self.name = name
        self.log = log                       # log(message): the jit's debug printer
        self.grad_captures = [j for j, c in enumerate(traced.captures) if c.kind == "grad"]
        position = {v: j for j, (v, _) in enumerate(traced.program.captures)}
        self.n_returned = traced.program.meta["n_results"]
        self.updates = {index: position[src] for index, src in traced.program.meta["donations"].items()
                        if src in position}          # output index -> captured tensor it replaces
        reason = plan_capture(program, self.backend)
        self.status = dict(name="cuda_graphs", captured=False, replays=0, recaptures=0,
                           reason=reason or "runs plainly once first")
        self.usable = reason is None
        self.calls = 0
        self.state: _Captured | None = None
        self.lock = threading.Lock()

    def __call__(self, inputs: list, captures: list) -> list:
        if not self.usable or not self.lock.acquire(blocking=False):
            return self.generated(inputs, captures)
        try:
            self.calls += 1
            if self.calls == 1:              # warm-up: kernels compiled and loaded, pools grown
                with warming(self.backend):
                    return self.generated(inputs, captures)
            state = self.state
            if state is not None and not state.same_captures(captures):
                self._drop()
                self.status["recaptures"] += 1
                if self.status["recaptures"] > RECAPTURE_LIMIT:
                    self._give_up(f"captured tensors were rebound to new arrays "
                                  f"{RECAPTURE_LIMIT + 1} times")
                    return self.generated(inputs, captures)
                state = None
            if state is None:
                try:
                    state = self.state = _Captured(self, inputs, captures)
                except Exception as e:       # a host sync or an unsupported call while recording
                    self._give_up(f"capture failed: {type(e).__name__}: {e}")
                    return self.generated(inputs, captures)
                self.generated.release()     # the plain run's buffers: the graph has its own
                self.status.update(captured=True, reason="")
            self.status["replays"] += 1
            return state.replay(inputs, captures)
        finally:
            self.lock.release()

    def _give_up(self, reason: str) -> None:
        self.usable = False
        self._drop()
        self.status.update(captured=False, reason=reason)
        self.log(f"engine.jit({self.name}): running without a CUDA graph: {reason}")

    def _drop(self) -> None:
        if self.state is not None:
            self.state.release()
            self.state = None

    def release(self) -> None:
        """Drop the graph and its memory too (recorded again when this program is next used)."""
        with self.lock:
            self._drop()
            if self.usable:
                self.calls = min(self.calls, 1)
        self.generated.release()


class _Captured:
    """One recorded graph with its static buffers (see the module docstring)."""

    def __init__(self, owner: GraphedProgram, inputs: list, captures: list) -> None:
        be = owner.backend
        self.cp = cp = be.cp
        self.device = getattr(be, "_device", None)
        with self._on_device():                 # its stream and pool belong to this GPU
            rec = self.recording = Recording(cp)
        with self._on_device(), rec.allocating():
            self.static_inputs = [cp.array(x, copy=True) for x in inputs]
            self.static_grads = {j: cp.array(captures[j], copy=True) for j in owner.grad_captures}
            buffers = owner.generated._carve()
        caps = [self.static_grads.get(j, c) for j, c in enumerate(captures)]
        self.adopted = [(j, c) for j, c in enumerate(caps) if j not in self.static_grads]
        self.plan: list = []     # per result: ("same", array) | ("block", k, ...) | ("value", v)
        self.blocks: list = []

        def run() -> None:
            results = owner.generated.fn(self.static_inputs, caps, buffers)
            self._route(results, caps, owner.updates, owner.n_returned)

        with self._on_device():
            rec.record(be, run)
        self.buffers = buffers               # the graph writes these: they live as long as it
        self.done: Any = None                # event after the last replay, and its stream
        self.done_stream: Any = None

    def _on_device(self) -> Any:
        return self.device if self.device is not None else contextlib.nullcontext()

    def _route(self, results: list, caps: list, updates: dict, n_returned: int) -> None:
        """Inside the recording: every result not kept in place into its output block,
        then updates of captured tensors into their own arrays (after the block copies,
        so a result that is a captured tensor's old value is copied before it changes)."""
        cp = self.cp
        updated = {id(caps[j]) for j in updates.values()}
        kept = {id(c) for _, c in self.adopted} - updated
        copies, sizes = [], [0, 0]
        for index, r in enumerate(results):
            if not hasattr(r, "shape"):
                self.plan.append(("value", r))
            elif index in updates:
                self.plan.append(("same", caps[updates[index]]))
            elif id(r) in kept:
                self.plan.append(("same", r))
            else:
                k = int(index >= n_returned)          # 0: returned, 1: written back
                nbytes = int(np.prod(r.shape, dtype=np.int64)) * r.dtype.itemsize
                self.plan.append(("block", k, sizes[k], nbytes, r.shape, r.dtype))
                copies.append((k, sizes[k], nbytes, r))
                sizes[k] += -(-nbytes // _ALIGN) * _ALIGN
        self.blocks = [cp.empty((n,), dtype=np.uint8) if n else None for n in sizes]
        for k, offset, nbytes, r in copies:
            cp.copyto(self._view(self.blocks[k], offset, nbytes, r.shape, r.dtype), r)
        for index, j in updates.items():
            if results[index] is not caps[j]:
                cp.copyto(caps[j], results[index])

    @staticmethod
    def _view(block: Any, offset: int, nbytes: int, shape: tuple, dtype: Any) -> Any:
        return block[offset:offset + nbytes].view(dtype).reshape(shape)

    def same_captures(self, captures: list) -> bool:
        return all(captures[j] is c for j, c in self.adopted)

    def replay(self, inputs: list, captures: list) -> list:
        cp = self.cp
        with self._on_device():
            stream = cp.cuda.get_current_stream()
            if self.done is not None and stream is not self.done_stream:
                stream.wait_event(self.done)      # the last replay ran on another stream
            for static, x in zip(self.static_inputs, inputs):
                cp.copyto(static, x)
            for j, static in self.static_grads.items():
                cp.copyto(static, captures[j])
            self.recording.launch(stream)
            fresh = [None if b is None else b.copy() for b in self.blocks]
            self.done, self.done_stream = stream.record(), stream
            return [p[1] if p[0] in ("same", "value") else self._view(fresh[p[1]], *p[2:])
                    for p in self.plan]

    def release(self) -> None:
        self.static_inputs = self.static_grads = self.buffers = None
        self.blocks = []
        self.adopted, self.plan = [], []
        self.recording.release()
