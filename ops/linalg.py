"""matmul, with NumPy's rules: batched, broadcast batch dims, 1-D operands."""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ShapeError
from .movement import reshape, transpose
from .reduce import sum_to
from .shapes import broadcast_shapes
from .spec import Op, register


def _infer_matmul(a: Any, b: Any) -> tuple:
    sa, sb = tuple(a.shape), tuple(b.shape)
    if not sa or not sb:
        raise ShapeError(f"matmul: operands must have at least 1 dimension, got {sa} and {sb}")
    ka = sa[-1]
    kb = sb[0] if len(sb) == 1 else sb[-2]
    if ka != kb:
        raise ShapeError(f"matmul: shapes {sa} and {sb} do not align "
                         f"({ka} columns on the left vs {kb} rows on the right)")
    batch = broadcast_shapes("matmul", sa[:-2], sb[:-2])
    shape = batch + (sa[-2:-1] if len(sa) > 1 else ()) + (sb[-1:] if len(sb) > 1 else ())
    return shape, np.result_type(np.dtype(a.dtype), np.dtype(b.dtype))


def _swap_last(x: Any) -> Any:
    axes = tuple(range(x.ndim - 2)) + (x.ndim - 1, x.ndim - 2)
    return transpose(x, axes=axes)


def _matmul_vjp(g: Any, out: Any, inputs: tuple, needs: tuple) -> tuple:
    """dA = g @ B^T, dB = A^T @ g, summed over broadcast batch dims; 1-D operands are
    treated as a row (left) or column (right) and squeezed back."""
    a, b = inputs
    a2 = reshape(a, shape=(1, a.shape[0])) if a.ndim == 1 else a
    b2 = reshape(b, shape=(b.shape[0], 1)) if b.ndim == 1 else b
    g2 = g
    if a.ndim == 1:
        g2 = reshape(g2, shape=g2.shape[:-1] + (1,) + g2.shape[-1:]) if b.ndim > 1 else \
            reshape(g2, shape=(1,) + tuple(g2.shape))
    if b.ndim == 1:
        g2 = reshape(g2, shape=tuple(g2.shape) + (1,))
    ga = gb = None
    if needs[0]:
        ga = reshape(sum_to(matmul(g2, _swap_last(b2)), tuple(a2.shape)), shape=tuple(a.shape))
    if needs[1]:
        if b.ndim == 2 and a.ndim > 2:
            # Weight gradient of x @ W: fold the batch into rows, one GEMM, no batch sum.
            k, n = b.shape
            gb = matmul(_swap_last(reshape(a, shape=(_rows(a), k))),
                        reshape(g, shape=(_rows(g), n)))
        else:
            gb = reshape(sum_to(matmul(_swap_last(a2), g2), tuple(b2.shape)), shape=tuple(b.shape))
    return ga, gb


def _rows(x: Any) -> int:
    """Rows of x folded to 2-D (all axes but the last)."""
    n = 1
    for d in x.shape[:-1]:
        n *= d
    return n


matmul = register(Op(
    "matmul", kind="matmul", saves=(0, 1), contraction=True, autocast="lower",
    forward=lambda be, a, b: be.matmul(a, b),
    infer=_infer_matmul, vjp=_matmul_vjp,
    sample=lambda rng: [
        ([rng.standard_normal((3, 4)), rng.standard_normal((4, 2))], {}),
        ([rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5))], {}),
        ([rng.standard_normal((2, 1, 3, 4)), rng.standard_normal((3, 4, 2))], {}),
        ([rng.standard_normal((4,)), rng.standard_normal((2, 4, 3))], {}),
        ([rng.standard_normal((2, 3, 4)), rng.standard_normal((4,))], {}),
        ([rng.standard_normal((4,)), rng.standard_normal((4,))], {})],
    reference=lambda a, b: np.matmul(a, b)))
