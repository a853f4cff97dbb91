"""`with eg.profile() as p: ...` — where an eager step spends its time.

The profiler is an interpreter on top of eager mode: it times each op call as a
whole and the backend computation inside it, so the table separates array
compute from Python dispatch (shape handling, tape recording), and forward from
backward (ops called while autograd runs VJPs).
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import ops

from .dispatch import EagerInterpreter, interpret
from .state import phase


class ProfilingInterpreter(EagerInterpreter):
    def __init__(self) -> None:
        self.records: dict = defaultdict(lambda: [0, 0.0, 0.0])     # (op, phase) -> [n, total, compute]
        self._compute = 0.0

    def compute(self, op: ops.Op, backend: Any, raw: list, args: tuple, params: dict) -> Any:
        t0 = time.perf_counter()
        out = super().compute(op, backend, raw, args, params)
        self._compute = time.perf_counter() - t0
        return out

    def apply(self, op: ops.Op, args: tuple, params: dict) -> Any:
        t0 = time.perf_counter()
        out = super().apply(op, args, params)
        total = time.perf_counter() - t0
        rec = self.records[(op.name, phase.name)]
        rec[0] += 1
        rec[1] += total
        rec[2] += self._compute
        return out


class Profile:
    """Collected timings; `print(p)` or `p.table()` shows them, `p.rows()` returns them."""

    def __init__(self) -> None:
        self.interpreter = ProfilingInterpreter()
        self.wall = 0.0
        self._ctx: Any = None
        self._t0 = 0.0

    def __enter__(self) -> "Profile":
        self._ctx = interpret(self.interpreter)
        self._ctx.__enter__()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self._t0
        self._ctx.__exit__(*exc)

    def rows(self) -> list[dict]:
        out = []
        for (name, ph), (n, total, comp) in self.interpreter.records.items():
            out.append(dict(op=name, phase=ph, calls=n, total_ms=total * 1e3, compute_ms=comp * 1e3,
                            dispatch_ms=(total - comp) * 1e3, us_per_call=total / n * 1e6))
        return sorted(out, key=lambda r: -r["total_ms"])

    def summary(self) -> dict:
        rows = self.rows()
        total = sum(r["total_ms"] for r in rows)
        comp = sum(r["compute_ms"] for r in rows)
        return dict(wall_ms=self.wall * 1e3, op_calls=sum(r["calls"] for r in rows),
                    ops_ms=total, compute_ms=comp, dispatch_ms=total - comp,
                    outside_ops_ms=self.wall * 1e3 - total,
                    forward_ms=sum(r["total_ms"] for r in rows if r["phase"] == "forward"),
                    backward_ms=sum(r["total_ms"] for r in rows if r["phase"] == "backward"))

    def table(self, limit: int = 25) -> str:
        s = self.summary()
        lines = [f"{'op':18s} {'phase':9s} {'calls':>6s} {'total ms':>9s} {'compute ms':>11s} "
                 f"{'dispatch ms':>12s} {'us/call':>8s}"]
        for r in self.rows()[:limit]:
            lines.append(f"{r['op']:18s} {r['phase']:9s} {r['calls']:6d} {r['total_ms']:9.3f} "
                         f"{r['compute_ms']:11.3f} {r['dispatch_ms']:12.3f} {r['us_per_call']:8.1f}")
        lines.append(
            f"wall {s['wall_ms']:.2f} ms: {s['op_calls']} op calls take {s['ops_ms']:.2f} ms "
            f"(array compute {s['compute_ms']:.2f}, dispatch {s['dispatch_ms']:.2f}; forward "
            f"{s['forward_ms']:.2f}, backward {s['backward_ms']:.2f}); outside ops (autograd "
            f"bookkeeping, user code) {s['outside_ops_ms']:.2f} ms")
        return "\n".join(lines)

    __str__ = table


def profile() -> Profile:
    """Profile the eager ops run inside the `with` block."""
    return Profile()
