"""Collective ops: communication between the processes of a data-parallel run.

`all_reduce(x, group=..., reduction="sum"|"mean")` sums (or averages) `x` over every
process of `group`, a communicator of `engine.distributed` (any object with
`all_reduce_array(backend, raw, reduction)` and `size`). It is an op, so an eager
call communicates at once and a traced program (eg.jit) holds it as a node that
communicates at every call. Every process runs the same program (SPMD), so each
node meets its partners on the other ranks in the same order. Its VJP is the same
reduction of the cotangent: in the SPMD reading y = sum_r x_r is replicated, and
dL/dx_r = sum_r' dL_r'/dy.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import OpError
from .spec import Op, register

REDUCTIONS = ("sum", "mean")


class SingleProcess:
    """The group of one process: the reduction is a copy (rank 0 of 1). Also what the
    registry tests run the op with."""

    rank, size = 0, 1

    def all_reduce_array(self, backend: Any, x: Any, reduction: str) -> Any:
        return backend.copy(x)

    def broadcast_array(self, x: Any, root: int) -> None:
        """Rank 0's values are already the only ones."""

    def __repr__(self) -> str:
        return "SingleProcess()"


def _check(group: Any, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise OpError(f"all_reduce: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not hasattr(group, "all_reduce_array"):
        raise OpError(f"all_reduce: group must be a communicator of engine.distributed, "
                      f"got {type(group).__name__}")


def _forward(backend: Any, x: Any, group: Any, reduction: str) -> Any:
    _check(group, reduction)
    return group.all_reduce_array(backend, x, reduction)


def _infer(x: Any, group: Any, reduction: str) -> tuple:
    _check(group, reduction)
    return tuple(x.shape), np.dtype(x.dtype)


all_reduce = register(Op(
    "all_reduce", kind="collective",
    forward=_forward,
    infer=_infer,
    vjp=lambda g, out, inputs, needs, group, reduction: (all_reduce(g, group=group, reduction=reduction),),
    saves=(),
    sample=lambda rng: [([rng.standard_normal((3, 4))], dict(group=SingleProcess(), reduction="mean"))],
    reference=lambda x, group, reduction: x,
    doc="sum or mean of x over the processes of a data-parallel group"))
