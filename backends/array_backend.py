"""The body shared by the backends whose arrays follow NumPy's API (NumPy, CuPy).

Each method here is written once against the array module `xp` (numpy or cupy), so
the two backends differ only where the devices really do: host transfer, the
elementwise kernels, matmul's fast paths, scatter-add, random draws and row programs
(Chainer's lesson: one body per API, not one per device).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .base import Backend

_F16, _F32, _I64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.int64)


class ArrayBackend(Backend):
    """A backend over the NumPy-compatible array module `xp`."""

    xp: Any = np                   # set per class (numpy) or per instance (cupy)
    array_methods = True

    # -- creation and conversion ------------------------------------------------
    def asarray(self, data: Any, dtype: Any = None) -> Any:
        if isinstance(data, self.xp.ndarray):
            return data if dtype is None else data.astype(dtype, copy=False)
        return self.xp.asarray(np.asarray(data, dtype=dtype))

    def full(self, shape: tuple, value: Any, dtype: Any) -> Any:
        return self.xp.full(shape, value, dtype=dtype)

    def arange(self, start: Any, stop: Any, step: Any, dtype: Any) -> Any:
        return self.xp.arange(start, stop, step, dtype=dtype)

    def astype(self, x: Any, dtype: Any) -> Any:
        return x.astype(dtype, copy=False)

    def copy(self, x: Any) -> Any:
        return self.xp.array(x, copy=True)

    # -- reductions (array methods: the same in NumPy and CuPy, without the module
    # functions' dispatch cost, which every eager op pays) --------------------------
    def sum(self, x: Any, axis: tuple | None, keepdims: bool) -> Any:
        if x.dtype == _F16:                 # accumulate in float32, round once
            return x.sum(axis=axis, dtype=_F32, keepdims=keepdims).astype(_F16)
        if x.dtype.kind in "bi":            # bool and signed ints sum as int64 (NumPy's rule)
            return x.sum(axis=axis, dtype=_I64, keepdims=keepdims)
        return x.sum(axis=axis, keepdims=keepdims)

    def max(self, x: Any, axis: tuple | None, keepdims: bool) -> Any:
        return x.max(axis=axis, keepdims=keepdims)

    # -- movement ----------------------------------------------------------------
    def reshape(self, x: Any, shape: tuple) -> Any:
        return x.reshape(shape)

    def transpose(self, x: Any, axes: tuple) -> Any:
        return x.transpose(axes)

    def broadcast_to(self, x: Any, shape: tuple) -> Any:
        return self.xp.broadcast_to(x, shape)

    def concatenate(self, xs: Sequence[Any], axis: int) -> Any:
        return self.xp.concatenate(list(xs), axis=axis)

    def pad(self, x: Any, pad_width: tuple, value: Any) -> Any:
        return self.xp.pad(x, pad_width, mode="constant", constant_values=value)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return self.xp.where(cond, a, b)

    # -- indexing ----------------------------------------------------------------
    def getitem(self, x: Any, index: tuple) -> Any:
        return x[index]

    def setitem(self, x: Any, index: tuple, value: Any) -> None:
        x[index] = value
