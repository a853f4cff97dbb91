"""Shape and axis rules shared by the op specs."""
from __future__ import annotations

from typing import Any, Iterable

from .errors import ShapeError


def shape_of(x: Any) -> tuple:
    """Shape of a tensor-like or () for a Python scalar."""
    return getattr(x, "shape", ())


def broadcast_shapes(op: str, *shapes: tuple) -> tuple:
    """NumPy broadcasting of shapes, raising a ShapeError that names the op."""
    ndim = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(-ndim, 0):
        size = 1
        for s in shapes:
            if len(s) >= -i:
                d = s[i]
                if d != 1:
                    if size != 1 and d != size:
                        raise ShapeError(
                            f"{op}: shapes {' and '.join(str(tuple(s)) for s in shapes)} "
                            f"cannot be broadcast together (axis {i}: {size} vs {d})")
                    size = d
        out.append(size)
    return tuple(out)


def normalize_axis(op: str, axis: Any, ndim: int) -> tuple | None:
    """`axis` (None, int or sequence) -> None or a sorted tuple of non-negative ints."""
    if axis is None:
        return None
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    out = []
    for a in axes:
        if not hasattr(a, "__index__") or isinstance(a, bool) or type(a).__name__ == "bool_":
            raise ShapeError(f"{op}: axis must be an int or a sequence of ints, got {axis!r}")
        a = a.__index__()
        if not -ndim <= a < ndim:
            raise ShapeError(f"{op}: axis {a} is out of range for a tensor with {ndim} dimensions")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ShapeError(f"{op}: repeated axis in {axis!r}")
    return tuple(sorted(out))


def reduced_shape(shape: tuple, axis: tuple | None, keepdims: bool) -> tuple:
    """Shape after reducing `axis` (None = all axes)."""
    axes = range(len(shape)) if axis is None else axis
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def prod(xs: Iterable[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out
