"""Causal structure: compute only the parts of attention's matmuls that are not zero.

A constant boolean mask with the causal pattern (True where key j lies after query
i + off) makes whole triangles of attention's matrices exactly zero: the softmax of the
-inf scores, the `where` that zeroes the masked gradients, and their transposes.
`band_matmuls` finds those triangles ("bands") by evaluating each op's own sympy
expression on the masked region (mask True, known-zero inputs 0: is the result 0, or
-inf before a softmax?), and rewrites every matmul with such an operand into a
`BandedMatmul`: row blocks of a banded left operand, or column blocks of a banded
right one, each multiplying only the part of the inner dimension that is not known
zero.

In a causal attention layer this covers four of its six products (probabilities @
values, and in backward the value, query and key gradients); the scores and the
probabilities' gradient would need an unread-output band, which did not pay here
because their operands are transposed views that BLAS re-packs for every block.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import sympy

from backends.cprint import numeric
from ops.elementwise import ElementwiseOp

from .ir import Node, Program, Value
from .passes import FusedElementwise, FusedReduction, FusedRowOp, single_group

Band = tuple[str, int]
"""("U", off): the entries (i, j) of the last two axes with j - i > off; ("L", off): i - j > off."""

MIN_DIM = 64          # below this a matrix is not split into blocks
MAX_WORK = 0.85       # rewrite only when at most this fraction of the full product is left


def band_matmuls(program: Program) -> Program:
    """Rewrite the matmuls that have an operand with a known-zero triangle."""
    masks = {v: bands for v, arr in program.constants.items() if (bands := _mask_bands(arr))}
    zeros: dict[Value, Band] = {}
    for n in program.nodes:
        band = _zero_band(n, masks, zeros)
        if band is not None:
            zeros[n.out] = band
    nodes = []
    for n in program.nodes:
        op = _banded(n, zeros) if getattr(n.op, "contraction", False) else None
        nodes.append(Node(op, n.inputs, {}, n.out) if op is not None else n)
    return program.copy(nodes=nodes)


def causal_band(arr: Any) -> Band | None:
    """The band where a constant bool mask is True, if it is exactly one triangle."""
    if not isinstance(arr, np.ndarray) or arr.dtype != np.bool_ or arr.ndim < 2 \
            or any(d != 1 for d in arr.shape[:-2]):
        return None
    m = arr.reshape(arr.shape[-2:])
    if not m.any():
        return None
    i, j = np.arange(m.shape[0])[:, None], np.arange(m.shape[1])[None, :]
    for side, diff in (("U", j - i), ("L", i - j)):
        off = int(diff[m].min()) - 1
        if np.array_equal(m, diff > off):
            return side, off
    return None


def _mask_bands(arr: Any) -> list[tuple[Band, int]]:
    """(band, the mask's value there) for each triangle on which a constant bool mask is
    constant: True on it (a blocked-keys mask) or False on it (a may-attend mask)."""
    if not isinstance(arr, np.ndarray) or arr.dtype != np.bool_:
        return []
    return [(band, value) for value, m in ((1, arr), (0, ~arr))
            if (band := causal_band(m)) is not None]


def _contains(outer: Band, inner: Band) -> bool:
    """Is every entry of band `inner` also in band `outer`?"""
    return outer[0] == inner[0] and inner[1] >= outer[1]


# -- each op's expression on a band --------------------------------------------------------------

def _group_of(n: Node) -> tuple[FusedElementwise, tuple, tuple] | None:
    """(group, its inputs, the shape its elements range over) of an elementwise node."""
    op = n.op
    if isinstance(op, FusedElementwise):
        return op, tuple(n.inputs), n.out.shape
    if isinstance(op, FusedReduction):
        return op.group, tuple(n.inputs), op.in_shape
    if isinstance(op, FusedRowOp):
        return (op.group, tuple(n.inputs), n.out.shape) if op.axis in (-1, len(n.out.shape) - 1) else None
    if isinstance(op, ElementwiseOp):
        group, inputs = single_group(n)
        return group, inputs, n.out.shape
    return None


def _on_band(n: Node, band: Band, masks: dict, zeros: dict) -> Any:
    """Node n's per-element expression at the entries of `band` (masks there at their value,
    known-zero inputs 0), or None when it is not an elementwise computation."""
    found = _group_of(n)
    if found is None:
        return None
    group, inputs, shape = found
    if len(shape) < 2:
        return None
    expr, symbols = group.expression()
    subs = {}
    for s, a in zip(symbols, inputs):
        if not isinstance(a, Value) or tuple(a.shape[-2:]) != tuple(shape[-2:]):
            continue
        held = [value for b, value in masks.get(a, ()) if _contains(b, band)]
        if held:
            subs[s] = sympy.Integer(held[0])
        elif a in zeros and _contains(zeros[a], band):
            subs[s] = sympy.Integer(0)
    return numeric(expr.xreplace(subs))


def _candidate_bands(n: Node, masks: dict, zeros: dict) -> list[Band]:
    return [b for a in n.inputs if isinstance(a, Value)
            for b in [m for m, _ in masks.get(a, ())] + [zeros.get(a)] if b is not None]


def _zero_band(n: Node, masks: dict, zeros: dict) -> Band | None:
    """The band where node n's value is exactly zero, if its inputs make one."""
    op = n.op
    permutation = getattr(op, "permutation", None)
    if permutation is not None and n.inputs[0] in zeros:
        axes, nd = tuple(permutation(n.params)), len(n.out.shape)
        if nd >= 2 and sorted(axes[-2:]) == [nd - 2, nd - 1]:
            side, off = zeros[n.inputs[0]]
            swapped = axes[-2:] == (nd - 1, nd - 2)
            return ({"U": "L", "L": "U"}[side] if swapped else side), off
        return None
    if getattr(op, "keeps_matrices", False) and n.inputs[0] in zeros:
        src = n.inputs[0]
        same_matrix = len(n.out.shape) >= 2 and tuple(n.out.shape[-2:]) == tuple(src.shape[-2:])
        return zeros[src] if same_matrix else None
    if n.out.dtype.kind != "f" or isinstance(op, FusedReduction):
        return None
    for band in _candidate_bands(n, masks, zeros):
        expr = _on_band(n, band, masks, zeros)
        if expr is None:
            return None
        if isinstance(op, FusedRowOp):
            # softmax of -inf is exactly 0 while each row keeps an unmasked entry, which an
            # upper band with off >= 0 guarantees (column 0); an emptied row would be NaN
            if op.row_op.zero_at_neg_inf and expr == -sympy.oo and band[0] == "U" and band[1] >= 0:
                return band
        elif expr == 0:
            return band
    return None


# -- the rewritten matmul ------------------------------------------------------------------------------------

def _banded(n: Node, zeros: dict) -> BandedMatmul | None:
    a, b = n.inputs
    if not (isinstance(a, Value) and isinstance(b, Value)) or len(a.shape) < 2 or len(b.shape) < 2 \
            or n.out.dtype.kind != "f":
        return None
    m, k = a.shape[-2:]
    nn = b.shape[-1]
    shape, dtype = tuple(n.out.shape), n.out.dtype
    options = []
    if a in zeros:
        options.append(_plan("A", *zeros[a], m, k, nn))
    if b in zeros:
        options.append(_plan("B", *zeros[b], m, k, nn))
    options = [o for o in options if o is not None]
    if not options:
        return None
    how, blocks, fills, work = min(options, key=lambda o: o[3])
    return BandedMatmul(how, blocks, fills, shape, dtype, work) if work <= MAX_WORK else None


def _plan(where: str, side: str, off: int, m: int, k: int, n: int) -> tuple[str, tuple, tuple, float] | None:
    """(description, ((a index, b index, out index), ...), (out index to zero, ...), work)."""
    E, ALL = Ellipsis, slice(None)
    dim = m if where == "A" else n
    if dim < MIN_DIM:
        return None
    step = max(32, dim // 8)
    blocks, fills, work = [], [], 0
    for s0 in range(0, dim, step):
        s1 = min(dim, s0 + step)
        if where == "A":                # rows of A: zero where k - i > off (U) / i - k > off (L)
            k0, k1 = (0, min(k, s1 + off)) if side == "U" else (max(0, s0 - off), k)
            idx = ((E, slice(s0, s1), slice(k0, k1)), (E, slice(k0, k1), ALL), (E, slice(s0, s1), ALL))
            cost, empty = (s1 - s0) * max(0, k1 - k0) * n, k1 <= k0
        elif where == "B":              # columns of B: zero where j - k > off (U) / k - j > off (L)
            k0, k1 = (max(0, s0 - off), k) if side == "U" else (0, min(k, s1 + off))
            idx = ((E, ALL, slice(k0, k1)), (E, slice(k0, k1), slice(s0, s1)), (E, ALL, slice(s0, s1)))
            cost, empty = m * max(0, k1 - k0) * (s1 - s0), k1 <= k0
        if empty:
            fills.append(idx[2])
            continue
        blocks.append(idx)
        work += cost
    how = {"A": "rows", "B": "cols"}[where] + f":{side}{off}"
    return how, tuple(blocks), tuple(fills), work / max(1, m * k * n)


class BandedMatmul:
    """a @ b computed block by block, each block over only the inner range that is not
    known zero; `fills` are the output blocks whose whole inner range is zero."""

    kind = "banded_matmul"
    random = False
    view = False
    contraction = True             # still a @ b (ops/spec.py): it may write a transposed buffer

    def __init__(self, how: str, blocks: tuple, fills: tuple, shape: tuple, dtype: Any,
                 work: float) -> None:
        self.how, self.blocks, self.fills = how, blocks, fills
        self.shape, self.dtype, self.work = shape, np.dtype(dtype), work
        self.name = f"matmul<{how}>"

    def forward(self, backend: Any, a: Any, b: Any) -> Any:
        return self.run(backend, a, b, None)

    def run(self, backend: Any, a: Any, b: Any, out: Any) -> Any:
        if out is None:
            out = backend.full(self.shape, 0, self.dtype)
        for ia, ib, io in self.blocks:
            dest = out[io]
            got = backend.matmul_out(a[ia], b[ib], dest)
            if got is not dest:
                dest[...] = got
        for io in self.fills:
            out[io] = 0
        return out
