"""The reference backend: NumPy arrays on the CPU."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import sympy

from ops import numpy_impls

from . import host_kernels
from .base import Backend
from .host_memory import keep_freed_memory

def _weak_result_dtype(args: Sequence[Any]) -> np.dtype:
    """NumPy's promotion with Python scalars weak (NEP 50), as the ufuncs do."""
    return np.result_type(*args)


def lambdify_numpy(spec: Any) -> Callable[..., Any]:
    """A NumPy callable from a spec's sympy expression (its stable `impl_expr` form),
    keeping the input float dtype.

    Constants are evaluated to Python floats so they stay weakly typed and do not
    upcast float32 arrays.
    """
    expr = spec.impl_expr.evalf()
    fn = sympy.lambdify(spec.symbols, expr, modules=[{"erf": numpy_impls.erf}, "numpy"])
    is_float = spec.float_result

    def run(*args: Any) -> Any:
        dtype = _weak_result_dtype(args)
        if is_float and dtype.kind != "f":
            dtype = np.dtype(np.float32)
        out = fn(*args)
        return np.asarray(out).astype(dtype, copy=False) if spec.result != "bool" else np.asarray(out, dtype=bool)

    return run


class NumpyBackend(Backend):
    name = "cpu"
    array_methods = True

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)
        keep_freed_memory()

    # -- creation and conversion ------------------------------------------------
    def asarray(self, data: Any, dtype: Any = None) -> Any:
        return np.asarray(data, dtype=dtype)

    def to_numpy(self, x: Any) -> Any:
        return x

    def full(self, shape: tuple, value: Any, dtype: Any) -> Any:
        return np.full(shape, value, dtype=dtype)

    def arange(self, start: Any, stop: Any, step: Any, dtype: Any) -> Any:
        return np.arange(start, stop, step, dtype=dtype)

    def astype(self, x: Any, dtype: Any) -> Any:
        return x.astype(dtype, copy=False)

    def copy(self, x: Any) -> Any:
        return np.array(x, copy=True)

    # -- elementwise -------------------------------------------------------------
    def elementwise_fn(self, spec: Any) -> Callable[..., Any]:
        """The spec's own NumPy function where it declares one (the registry tests check
        that it computes the expression), else its lambdified expression."""
        return spec.numpy if spec.numpy is not None else lambdify_numpy(spec)

    # -- reductions and linear algebra -------------------------------------------
    def sum(self, x: Any, axis: tuple | None, keepdims: bool) -> Any:
        if x.dtype == np.float16:               # accumulate in float32, round once
            return np.sum(x, axis=axis, dtype=np.float32, keepdims=keepdims).astype(np.float16)
        return np.sum(x, axis=axis, keepdims=keepdims)

    def max(self, x: Any, axis: tuple | None, keepdims: bool) -> Any:
        return np.max(x, axis=axis, keepdims=keepdims)

    def matmul(self, a: Any, b: Any) -> Any:
        if a.dtype == np.float16 and b.dtype == np.float16:
            # float32 accumulation (NumPy has no float16 BLAS), rounded once.
            return self.matmul(a.astype(np.float32), b.astype(np.float32)).astype(np.float16)
        if a.ndim > 2 and b.ndim == 2 and a.flags.c_contiguous:
            # One GEMM over all rows instead of NumPy's loop over the batch (~1.4x).
            return np.matmul(a.reshape(-1, a.shape[-1]), b).reshape(a.shape[:-1] + b.shape[-1:])
        return np.matmul(a, b)

    # -- row programs (optional; None: the program runs step by step on this backend) ----
    def run_rows(self, program: Any, arrays: tuple, params: dict) -> Any:
        """A row program (ops/rows.py) as its printed C kernel."""
        return host_kernels.run_rows(program, arrays, params)

    def matmul_out(self, a: Any, b: Any, out: Any) -> Any:
        """matmul into a preallocated `out` (None: a new array), for the jit's buffers."""
        if out is None or a.dtype != out.dtype or b.dtype != out.dtype or a.dtype == np.float16:
            return self.matmul(a, b)
        if a.ndim > 2 and b.ndim == 2 and a.flags.c_contiguous and out.flags.c_contiguous:
            np.matmul(a.reshape(-1, a.shape[-1]), b, out=out.reshape(-1, b.shape[-1]))
            return out
        return np.matmul(a, b, out=out)

    # -- movement ----------------------------------------------------------------
    def reshape(self, x: Any, shape: tuple) -> Any:
        return np.reshape(x, shape)

    def transpose(self, x: Any, axes: tuple) -> Any:
        return np.transpose(x, axes)

    def broadcast_to(self, x: Any, shape: tuple) -> Any:
        return np.broadcast_to(x, shape)

    def concatenate(self, xs: Sequence[Any], axis: int) -> Any:
        return np.concatenate(xs, axis=axis)

    def pad(self, x: Any, pad_width: tuple, value: Any) -> Any:
        return np.pad(x, pad_width, mode="constant", constant_values=value)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return np.where(cond, a, b)

    # -- indexing ----------------------------------------------------------------
    def getitem(self, x: Any, index: tuple) -> Any:
        return x[index]

    def index_add(self, shape: tuple, index: tuple, values: Any, advanced: bool) -> Any:
        if advanced and len(index) == 1 and isinstance(index[0], np.ndarray):
            out = host_kernels.scatter_add_rows(shape, index[0], values)
            if out is not None:
                return out
        out = np.zeros(shape, dtype=values.dtype)
        if advanced:
            np.add.at(out, index, values)
        else:
            out[index] = values
        return out

    def setitem(self, x: Any, index: tuple, value: Any) -> None:
        x[index] = value

    # -- random ------------------------------------------------------------------
    def seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def random_normal(self, shape: tuple, dtype: Any) -> Any:
        return self.rng.standard_normal(shape, dtype=np.float64).astype(dtype, copy=False)

    def random_uniform(self, shape: tuple, dtype: Any) -> Any:
        return self.rng.random(shape, dtype=np.float64).astype(dtype, copy=False)

    def bernoulli(self, shape: tuple, p: float, dtype: Any) -> Any:
        return (self.rng.random(shape) < p).astype(dtype)
