"""The reference backend: NumPy arrays on the CPU."""
from __future__ import annotations

import ctypes
import math
from typing import Any, Callable, Sequence

import numpy as np
import sympy

from ops import numpy_impls

from . import cbuild, eager_kernels, host_kernels
from .array_backend import ArrayBackend
from .host_memory import keep_freed_memory

_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)

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


class NumpyBackend(ArrayBackend):
    name = "cpu"
    xp = np

    def __init__(self) -> None:
        self._philox: dict[tuple, Any] = {}
        keep_freed_memory()

    def to_numpy(self, x: Any) -> Any:
        return x

    # -- elementwise -------------------------------------------------------------
    def elementwise_fn(self, spec: Any) -> Callable[..., Any]:
        """The spec's own NumPy function where it declares one (the registry tests check
        that it computes the expression), else its lambdified expression; on large
        arrays its printed C kernel on the thread pool (backends/eager_kernels.py)."""
        return eager_kernels.wrap(spec, spec.numpy if spec.numpy is not None else lambdify_numpy(spec))

    # -- linear algebra ------------------------------------------------------------
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

    # -- indexing ----------------------------------------------------------------
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

    # -- random ------------------------------------------------------------------
    def random(self, draw: Any, shape: tuple, dtype: Any, p: float = 0.0) -> Any:
        """The draw's C loop when a C compiler is present (uniform and Bernoulli are
        bit-identical to the NumPy path, normal within a few ulp of libm), else NumPy."""
        n = math.prod(shape)
        start = self.claim_counters(n)
        dt = np.dtype(dtype)
        fn = self._philox_kernel(draw, dt) if n else None
        if fn is None:
            return draw.host(start, n, self.rng_key, dt, p=p).reshape(shape)
        out = np.empty(shape, dt)
        fn(ctypes.c_longlong(n), ctypes.c_ulonglong(start), ctypes.c_uint(self.rng_key[0]),
           ctypes.c_uint(self.rng_key[1]), ctypes.c_uint(draw.threshold(p)),
           ctypes.c_void_p(out.ctypes.data))
        return out

    def _philox_kernel(self, draw: Any, dt: np.dtype) -> Any:
        """The compiled host loop of `draw` for float32/float64 output, or None."""
        if dt not in (_F32, _F64) or not cbuild.available():
            return None
        key = (draw.name, dt)
        if key not in self._philox:
            name, source = draw.host_c_source(dt)
            try:
                self._philox[key] = getattr(cbuild.build(source), name)
            except (RuntimeError, OSError):
                self._philox[key] = None
        return self._philox[key]
