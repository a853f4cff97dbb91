"""C kernels for the CPU: row programs (softmax, log_softmax, layer_norm, ... as
printed by `backends.rowprint` from their declarations in ops) and the scatter-add of
whole rows (an embedding's backward).

A row kernel is one pass per row statistic instead of NumPy's five to eight
whole-array calls (each allocating a temporary): ~5-10x faster on small tensors,
where per-call overhead dominates, and ~2-3x on large ones, where memory traffic
does. It computes the program's steps in their order per element; only sums are
accumulated in another order (32 partial sums), so results agree with NumPy's to
rounding. Used for the last axis of C-contiguous float32/float64 arrays when a C
compiler is present; otherwise the program runs on NumPy.
"""
from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from . import cbuild, cparallel, rowprint
from .cprint import CPrintError

# out[idx[i], :] += values[i, :] for rows of length d; indices already checked. Threads
# share the columns, so each column's additions stay in index order: the result does
# not depend on the thread count.
_SCATTER_PARAMS = ["long long count", "long long d", "long long rows", "const long long* restrict idx",
                   "const {T}* restrict values", "{T}* restrict out"]
_SCATTER_BODY = """
for (long long i = 0; i < count; ++i) {{
  const long long r = idx[i] < 0 ? idx[i] + rows : idx[i];
  {T}* restrict dst = out + r * d;
  const {T}* restrict src = values + i * d;
  for (long long j = lo; j < hi; ++j) dst[j] += src[j];
}}"""

_TYPES = {np.dtype(np.float32): ("float", "f32"), np.dtype(np.float64): ("double", "f64")}
_lib: Any = None
_tried = False


def c_source() -> str:
    """The scatter kernels' C source for both float types."""
    return "".join(cparallel.parallel_function(f"scatter_add_rows_{s}", [p.format(T=t) for p in _SCATTER_PARAMS],
                                               "d", "count * d", _SCATTER_BODY.format(T=t).strip().splitlines())
                   for t, s in _TYPES.values())


def _library() -> Any:
    """The compiled kernels (built on first use), or None without a C compiler."""
    global _lib, _tried
    if not _tried:
        _tried = True
        if cbuild.available():
            try:
                _lib = cparallel.build(c_source(), vector=cbuild.vector_math())
            except (RuntimeError, OSError):
                _lib = None
    return _lib


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(cbuild.address(a))


def _new(a: np.ndarray) -> ctypes.c_void_p:
    """A fresh array's pointer (not worth remembering)."""
    return ctypes.c_void_p(a.ctypes.data)


def _rows_library(program: Any, dtype: np.dtype) -> Any:
    """The compiled kernel of `program` in `dtype` (built once; cached on the program),
    or None without a C compiler or when the program has no C form. Its argument types
    are declared, so a call passes plain ints and floats (no ctypes object per argument)."""
    cache = program._impls
    key = ("c", dtype)
    if key not in cache:
        cache[key] = None
        if cbuild.available():
            try:
                source = rowprint.C_HEADER + rowprint.c_rows_source(program, dtype)
                fn = getattr(cparallel.build(source, vector=cbuild.vector_math()),
                             rowprint.rows_function_name(program, dtype))
                pointers = len(program.rows) + len(program.cols) + len(program.scalars) + \
                    len(program.indices) + 1
                fn.restype = None
                fn.argtypes = ([ctypes.c_longlong] * 2 + [ctypes.c_void_p] * (pointers - 1)
                               + [ctypes.c_double] * len(program.param_names) + [ctypes.c_void_p])
                cache[key] = fn
            except (CPrintError, RuntimeError, OSError):
                cache[key] = None
    return cache[key]


def run_rows(program: Any, arrays: tuple, params: dict) -> np.ndarray | None:
    """`program` over the rows of its inputs as one C call, or None where the kernel
    does not apply: rows along the last axis of C-contiguous float32/float64 arrays
    of one dtype, with at least one element. Per-row inputs (a cotangent) have the
    rows' dtype, index inputs are read as int64; a reducing program's output has the
    row axis removed."""
    n_rows, n_cols = len(program.rows), len(program.rows) + len(program.cols)
    n_floats = n_cols + len(program.scalars)
    if len(arrays) != n_floats + len(program.indices):
        raise TypeError(f"row program {program.name}: expected {n_floats + len(program.indices)} arrays "
                        f"(rows {program.rows}, columns {program.cols}, per-row {program.scalars}, "
                        f"indices {program.indices}), got {len(arrays)}")
    x = arrays[0]
    if type(x) is not np.ndarray or x.dtype not in _TYPES or x.ndim == 0 or x.size == 0 or \
            (program.axis and params[program.axis] != x.ndim - 1):
        return None
    dtype, shape, row_shape = x.dtype, x.shape, x.shape[:-1]
    pointers = []
    keep = []                                  # converted copies, alive until the call returns
    for k, a in enumerate(arrays):
        if type(a) is not np.ndarray:
            return None
        want = dtype
        if k < n_rows:                         # whole rows: used in place
            if a.dtype != dtype or a.shape != shape or not a.flags.c_contiguous:
                return None
        elif k < n_cols:                       # per-column vectors
            if a.dtype != dtype:
                return None
        elif k < n_floats:                     # per-row scalars
            if a.dtype != dtype or a.shape != row_shape:
                return None
        else:                                  # per-row indices
            if a.dtype.kind not in "iu" or a.shape != row_shape:
                return None
            want = np.dtype(np.int64)
        if a.dtype != want or not a.flags.c_contiguous:
            a = np.ascontiguousarray(a, dtype=want)
            keep.append(a)
            pointers.append(a.ctypes.data)     # a fresh array: not worth remembering
        else:
            pointers.append(cbuild.address(a))
    fn = _rows_library(program, dtype)
    if fn is None:
        return None
    y = np.empty(row_shape if program.reduces else shape, dtype=dtype)
    n = shape[-1]
    fn(x.size // n, n, *pointers, *(params[p] for p in program.param_names), y.ctypes.data)
    return y


def scatter_add_rows(shape: tuple, idx: np.ndarray, values: np.ndarray) -> np.ndarray | None:
    """zeros(shape) with values[i] added to row idx[i] (repeats accumulate, in order), as
    `np.add.at(out, (idx,), values)` but ~30x faster; None when not a row scatter."""
    kind = _TYPES.get(values.dtype)
    if (kind is None or idx.dtype.kind not in "iu" or not shape
            or values.shape != idx.shape + tuple(shape[1:])):
        return None
    lib = _library()
    if lib is None:
        return None
    flat = np.ascontiguousarray(idx, dtype=np.int64).ravel()
    if flat.size and (flat.min() < -shape[0] or flat.max() >= shape[0]):
        return None                      # let NumPy raise its IndexError
    values = np.ascontiguousarray(values)
    out = np.zeros(shape, dtype=values.dtype)
    d = int(np.prod(shape[1:], dtype=np.int64))
    getattr(lib, f"scatter_add_rows_{kind[1]}")(
        ctypes.c_longlong(flat.size), ctypes.c_longlong(d), ctypes.c_longlong(shape[0]),
        _new(flat), _ptr(values), _new(out))
    return out
