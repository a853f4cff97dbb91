"""Reductions: sum and max. (mean, var, logsumexp, ... are composites.)"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ShapeError
from . import elementwise as _elementwise, movement as _movement
from .shapes import reduced_shape
from .spec import Op, register


def _keep(g: Any, x_shape: tuple, axis: tuple | None, keepdims: bool) -> Any:
    """`g` reshaped to the keepdims form of the reduction over `axis`."""
    if keepdims or g.ndim == len(x_shape):
        return g
    return _movement.reshape(g, shape=reduced_shape(x_shape, axis, True))


def _infer_reduce(name: str, x: Any, axis: tuple | None, keepdims: bool) -> tuple:
    if axis is not None and any(a >= x.ndim for a in axis):
        raise ShapeError(f"{name}: axis {axis} out of range for shape {tuple(x.shape)}")
    return reduced_shape(tuple(x.shape), axis, keepdims)


def _sum_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    return np.dtype(np.int64) if dtype.kind in "biu" else dtype


def _sum_vjp(g: Any, out: Any, inputs: tuple, needs: tuple, axis: Any, keepdims: bool) -> tuple:
    (x,) = inputs
    return (_movement.broadcast_to(_keep(g, x.shape, axis, keepdims), shape=x.shape),)


def _max_vjp(g: Any, out: Any, inputs: tuple, needs: tuple, axis: Any, keepdims: bool) -> tuple:
    """Gradient to the maxima; ties share it evenly."""
    ew = _elementwise
    (x,) = inputs
    hit = _movement.cast(ew.eq(x, _keep(out, x.shape, axis, keepdims)), dtype=x.dtype)
    count = sum(hit, axis=axis, keepdims=True)
    return (ew.mul(_keep(g, x.shape, axis, keepdims), ew.div(hit, count)),)


def _sample(rng: np.random.Generator) -> list:
    x = rng.standard_normal((3, 4, 5))
    return [([x], dict(axis=None, keepdims=False)), ([x], dict(axis=(1,), keepdims=False)),
            ([x], dict(axis=(0, 2), keepdims=True)), ([rng.standard_normal((4,))], dict(axis=(0,), keepdims=False)),
            ([rng.standard_normal((1, 3))], dict(axis=(0,), keepdims=True))]


sum = register(Op(
    "sum", kind="reduction", reduction="sum",
    forward=lambda be, x, axis, keepdims: be.sum(x, axis, keepdims),
    infer=lambda x, axis, keepdims: (_infer_reduce("sum", x, axis, keepdims), _sum_dtype(x.dtype)),
    vjp=_sum_vjp, sample=_sample, saves=(),
    reference=lambda x, axis, keepdims: np.sum(x, axis=axis, keepdims=keepdims)))

max = register(Op(
    "max", kind="reduction", reduction="max",
    forward=lambda be, x, axis, keepdims: be.max(x, axis, keepdims),
    infer=lambda x, axis, keepdims: (_infer_reduce("max", x, axis, keepdims), np.dtype(x.dtype)),
    vjp=_max_vjp, sample=_sample, saves=(0, -1),
    reference=lambda x, axis, keepdims: np.max(x, axis=axis, keepdims=keepdims)))
