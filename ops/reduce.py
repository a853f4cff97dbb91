"""Summation and broadcasting: `sum` and `broadcast_to` are each other's VJP, and
`sum_to` (a sum over broadcast axes) undoes a broadcast. They sit together below the
elementwise ops, whose VJP is `sum_to`; `max`, whose VJP compares, is in ops/extrema.py.
(mean, var, logsumexp, ... are composites.)"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ShapeError
from .movement import outer_params, reshape, same_shape
from .shapes import reduced_shape
from .spec import Op, register


def keepdims_form(g: Any, x_shape: tuple, axis: tuple | None, keepdims: bool) -> Any:
    """`g` reshaped to the keepdims form of the reduction over `axis`."""
    if keepdims or g.ndim == len(x_shape):
        return g
    return reshape(g, shape=reduced_shape(x_shape, axis, True))


def infer_reduction(name: str, x: Any, axis: tuple | None, keepdims: bool) -> tuple:
    """The output shape of reduction `name` over `axis`."""
    if axis is not None and any(a >= x.ndim for a in axis):
        raise ShapeError(f"{name}: axis {axis} out of range for shape {tuple(x.shape)}")
    return reduced_shape(tuple(x.shape), axis, keepdims)


def sample_reduction(rng: np.random.Generator) -> list:
    """Test inputs for a reduction: full, partial and keepdims reductions."""
    x = rng.standard_normal((3, 4, 5))
    return [([x], dict(axis=None, keepdims=False)), ([x], dict(axis=(1,), keepdims=False)),
            ([x], dict(axis=(0, 2), keepdims=True)), ([rng.standard_normal((4,))], dict(axis=(0,), keepdims=False)),
            ([rng.standard_normal((1, 3))], dict(axis=(0,), keepdims=True))]


def _sum_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    return np.dtype(np.int64) if dtype.kind in "biu" else dtype


def _sum_vjp(g: Any, out: Any, inputs: tuple, needs: tuple, axis: Any, keepdims: bool) -> tuple:
    (x,) = inputs
    return (broadcast_to(keepdims_form(g, x.shape, axis, keepdims), shape=x.shape),)


sum = register(Op(
    "sum", kind="reduction", reduction="sum",
    forward=lambda be, x, axis, keepdims: be.sum(x, axis, keepdims),
    infer=lambda x, axis, keepdims: (infer_reduction("sum", x, axis, keepdims), _sum_dtype(x.dtype)),
    vjp=_sum_vjp, sample=sample_reduction, saves=(),
    reference=lambda x, axis, keepdims: np.sum(x, axis=axis, keepdims=keepdims)))


def sum_to(g: Any, shape: tuple) -> Any:
    """Sum `g` down to `shape`: the one place where broadcasting is undone."""
    gshape = g.shape
    if gshape == shape:
        return g
    lead = len(gshape) - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, d in enumerate(shape)
                                      if d == 1 and gshape[i + lead] != 1)
    out = sum(g, axis=axes, keepdims=False) if axes else g
    return reshape(out, shape=shape) if out.shape != shape else out


def _infer_broadcast_to(x: Any, shape: tuple) -> tuple:
    xs = tuple(x.shape)
    ok = len(shape) >= len(xs) and all(
        d == s or d == 1 for d, s in zip(xs[::-1], shape[::-1]))
    if not ok:
        raise ShapeError(f"broadcast_to: cannot broadcast shape {xs} to {shape}")
    return shape, np.dtype(x.dtype)


def _broadcast_to_vjp(g: Any, out: Any, inputs: tuple, needs: tuple, shape: tuple) -> tuple:
    return (sum_to(g, tuple(inputs[0].shape)),)


broadcast_to = register(Op(
    "broadcast_to", kind="movement", view=True, saves=(),
    no_op_when=same_shape, compose=outer_params, keeps_matrices=True,
    forward=lambda be, x, shape: be.broadcast_to(x, shape),
    infer=_infer_broadcast_to, vjp=_broadcast_to_vjp,
    sample=lambda rng: [([rng.standard_normal((3, 1))], dict(shape=(2, 3, 4))),
                        ([rng.standard_normal(())], dict(shape=(2, 2)))],
    reference=lambda x, shape: np.broadcast_to(x, shape)))
