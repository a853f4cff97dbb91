"""Row programs: stretches of nodes that work row by row, as one kernel.

Layer norm's backward is a dozen small steps over the same rows: row sums, a row
mean, elementwise arithmetic mixing full rows with per-row scalars and per-column
vectors. Each step as its own kernel streams the whole tensor through memory; done
row by row, a row stays in L1 while every step runs on it and only the values needed
later are written. A row group is a stretch of consecutive nodes over one space
(..., C) whose steps are elementwise maps (full rows or per-row scalars), sums over
the last axis, sums over all rows (a bias's gradient, accumulated as the rows go
by), and row-program ops over the last axis (layer norm's forward: the residual add
producing its input and the norm run in one pass); codegen runs it as one C kernel
(`ckernels.plan_row_group`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ops.elementwise import ElementwiseOp

from .ir import Program, Value
from .passes import FusedElementwise, FusedReduction, single_group


@dataclass
class RowStep:
    """One member: "map" (an elementwise group), "sum" (a group summed over the row),
    "colsum" (a group summed over all rows into one row) or "rowop" (a row-program op
    over the last axis: `row_op` with its `params`; inputs its rows, then its columns)."""
    kind: str
    group: FusedElementwise
    inputs: tuple
    out: Value
    row_op: Any = None
    params: Any = None


@dataclass
class RowGroup:
    members: list[int]            # node indices, consecutive
    steps: list[RowStep]
    space: tuple                  # the full shape (..., C)
    inputs: list[Value]           # read from outside: full rows, row scalars, columns, tiles, scalars
    stored: list[Value]           # member values needed after the group


def value_kind(shape: tuple, space: tuple) -> str | None:
    """How a value of `shape` is read per row of `space`."""
    nd = len(space)
    if len(shape) > nd:
        return None
    padded = (1,) * (nd - len(shape)) + tuple(shape)
    if padded == tuple(space):
        return "full"
    if int(np.prod(shape)) == 1:
        return "scalar"
    if padded[:-1] == tuple(space[:-1]) and padded[-1] == 1:
        return "rowscalar"
    if all(d == 1 for d in padded[:-1]) and padded[-1] == space[-1]:
        return "col"
    lead = 0
    while padded[lead] == 1:
        lead += 1
    if padded[lead:] == tuple(space[lead:]):
        return "tile"          # whole rows repeating every prod(shape[:-1]) rows (a mask)
    return None


def _step(n: Any) -> RowStep | None:
    """The node as a row step: "map", "sum" (over the last axis, kept) or "colsum" (over
    every axis but the last: a bias's gradient), or None."""
    op = n.op
    if n.out.dtype.kind != "f":
        return None
    if _last_axis_row_op(n):
        return RowStep("rowop", FusedElementwise([], 1), tuple(n.inputs), n.out, op, dict(n.params))
    if isinstance(op, FusedElementwise):
        return RowStep("map", op, tuple(n.inputs), n.out)
    if isinstance(op, ElementwiseOp):
        group, inputs = single_group(n)
        return RowStep("map", group, inputs, n.out)
    if isinstance(op, FusedReduction):
        group, inputs, in_shape, axis, keepdims = op.group, tuple(n.inputs), op.in_shape, op.axis, op.keepdims
    elif getattr(op, "reduction", None) == "sum" and isinstance(n.inputs[0], Value):
        group, inputs = FusedElementwise([], 1), (n.inputs[0],)
        in_shape, axis, keepdims = n.inputs[0].shape, n.params["axis"], n.params["keepdims"]
    else:
        return None
    nd = len(in_shape)
    if axis is None or nd == 0:
        return None
    if tuple(axis) == (nd - 1,) and keepdims:
        return RowStep("sum", group, inputs, n.out)
    if nd >= 2 and tuple(axis) == tuple(range(nd - 1)) and not keepdims:
        return RowStep("colsum", group, inputs, n.out)
    return None


def _last_axis_row_op(n: Any) -> bool:
    """A row-program op (ops/rows.py) over the last axis of one row input, its columns
    and parameters given: it can run on a row the group has in hand."""
    prog = getattr(n.op, "rows", None)
    if prog is None or len(prog.rows) != 1 or not n.inputs or not isinstance(n.inputs[0], Value):
        return False
    x = n.inputs[0]
    axis = n.params.get(prog.axis) if prog.axis else len(x.shape) - 1
    return (len(x.shape) >= 1 and axis in (len(x.shape) - 1, -1) and tuple(x.shape) == tuple(n.out.shape)
            and len(n.inputs) == 1 + len(prog.cols) and all(isinstance(v, Value) for v in n.inputs)
            and all(isinstance(n.params.get(str(p)), (int, float)) for p in prog.params))


def find_row_groups(program: Program, roots: dict, min_row: int = 8) -> list[RowGroup]:
    """Maximal stretches of two or more consecutive row steps over one float space, with
    a sum among them or at least two values to write. Inputs from outside must be read
    in their own layout (`roots`: a view is not)."""
    groups: list[RowGroup] = []
    current: list = []
    steps: list = []
    space: tuple | None = None

    def close() -> None:
        nonlocal space
        if len(steps) >= 2:
            group = _finish(program, list(current), list(steps), space)
            # Worth a kernel of its own: a reduction inside, or several values written
            # in one pass (an optimizer's updates of one parameter).
            if any(st.kind != "map" for st in steps) or len(group.stored) >= 2:
                groups.append(group)
        current.clear()
        steps.clear()
        space = None

    for i, n in enumerate(program.nodes):
        s = _step(n)
        if s is not None and space is not None and not _fits(s, space, steps, roots):
            close()
        if s is None:
            close()
            continue
        if space is None:
            full = s.out.shape if s.kind in ("map", "rowop") else _summed_shape(s)
            if len(full) == 0 or full[-1] < min_row or not _fits(s, tuple(full), steps, roots):
                continue
            space = tuple(full)
        current.append(i)
        steps.append(s)
    close()
    return groups


def _fits(s: RowStep, space: tuple, steps: list, roots: dict) -> bool:
    """Can step `s` run row by row in `space`, after `steps`?"""
    if steps and s.out.dtype != steps[0].out.dtype:
        return False
    out_kind = value_kind(s.out.shape, space)
    if s.kind == "rowop":
        return _rowop_fits(s, space, steps, roots)
    if s.kind != "map":
        if out_kind != ("rowscalar" if s.kind == "sum" else "col") or tuple(_summed_shape(s)) != tuple(space):
            return False
    elif out_kind not in ("full", "rowscalar"):
        return False
    made = {st.out: st for st in steps}
    for v in s.inputs:
        if v in made:
            if made[v].kind == "colsum":        # complete only after the last row
                return False
            continue
        kind = value_kind(v.shape, space)
        if kind is None or v.dtype not in (s.out.dtype, np.dtype(bool)):
            return False
        if kind == "full" and roots.get(v, v) is not v:
            return False
    return True


def _rowop_fits(s: RowStep, space: tuple, steps: list, roots: dict) -> bool:
    """A row op reads its row and its columns through pointers: each a full row of the
    group's (a map's or row op's value, or an input in its own layout) or, for a
    column, a vector from outside; all of the step's dtype."""
    if value_kind(s.out.shape, space) != "full" or any(v.dtype != s.out.dtype for v in s.inputs):
        return False
    made = {st.out: st for st in steps}

    def whole_row(v: Value) -> bool:
        if value_kind(v.shape, space) != "full":
            return False
        return made[v].kind in ("map", "rowop") if v in made else roots.get(v, v) is v
    return whole_row(s.inputs[0]) and all(
        whole_row(v) or (v not in made and value_kind(v.shape, space) == "col") for v in s.inputs[1:])


def _summed_shape(s: RowStep) -> tuple:
    """The shape a sum step reduces: its inputs broadcast together."""
    return tuple(np.broadcast_shapes(*[v.shape for v in s.inputs]))


def _finish(program: Program, members: list[int], steps: list[RowStep], space: tuple) -> RowGroup:
    inside = {s.out for s in steps}
    inputs: list = []
    for s in steps:
        for v in s.inputs:
            if v not in inside and v not in inputs:
                inputs.append(v)
    member_set = set(members)
    used_after = {a for i, n in enumerate(program.nodes) if i not in member_set
                  for a in n.inputs if isinstance(a, Value)}
    outputs = {o for o in program.outputs if isinstance(o, Value)}
    stored = [s.out for s in steps if s.out in used_after or s.out in outputs]
    return RowGroup(members, steps, space, inputs, stored)
