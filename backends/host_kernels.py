"""The fused ops' forwards (softmax, log_softmax, layer_norm) as C loops for the CPU,
and the scatter-add of whole rows (an embedding's backward).

Each is one pass per row statistic instead of NumPy's five to eight whole-array
calls (each allocating a temporary): ~5-10x faster on small tensors, where per-call
overhead dominates, and ~2-3x on large ones, where memory traffic does. They
compute exactly the primitive decomposition in ops/fused.py (the same row shift,
the same all -inf row rule, the same operation order per element); only sums are
accumulated in another order (eight partial sums), so results agree with NumPy's
to rounding. Used for the last axis of C-contiguous float32/float64 arrays when a
C compiler is present; otherwise the callers keep their NumPy path.
"""
from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from . import cbuild, cparallel

_ROW_SUM = """
/* Thirty-two running sums (several vector registers, so the adds do not wait on each
   other), folded pairwise: vectorises without reassociating. */
static inline {T} row_sum_{S}(const {T}* restrict v, long long n) {{
  {T} acc[32] = {{0}};
  long long j = 0;
  for (; j + 32 <= n; j += 32)
    for (int l = 0; l < 32; ++l) acc[l] += v[j + l];
  for (int w = 16; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  {T} tail = 0;
  for (; j < n; ++j) tail += v[j];
  return acc[0] + tail;
}}

/* The row maximum, 0 for a row of all -inf (so x - m stays -inf). NaNs are skipped
   here and still reach every output through the row sum, as with NumPy's NaN-propagating
   max. With AVX, `max(v, acc)` is one instruction on a whole register (GCC will not
   vectorise this reduction without -ffast-math). */
static inline {T} row_shift_{S}(const {T}* restrict v, long long n) {{
  {T} m = -INFINITY;
  long long j = 0;
#if defined(__AVX__)
  {VEC} acc = {SET1}(-INFINITY);
  for (; j + {LANES} <= n; j += {LANES}) acc = {MAX}({LOADU}(v + j), acc);
  {T} lanes[{LANES}];
  {STOREU}(lanes, acc);
  for (int l = 0; l < {LANES}; ++l) m = lanes[l] > m ? lanes[l] : m;
#endif
  for (; j < n; ++j) m = v[j] > m ? v[j] : m;
  return m == -INFINITY ? 0 : m;
}}

/* y = exp(x - m). libmvec's SIMD exp leaves its fast path for special inputs (-inf:
   masked entries) and tiny results (~2.5x slower), so the vector loop sees arguments
   clamped to {FAST} and exact values are patched in afterwards: 0 for -inf, a scalar exp
   for the rare finite argument below {FAST}. */
static inline void exp_shifted_{S}(const {T}* restrict x, {T} m, {T}* restrict y, long long n) {{
  int masked = 0, tiny = 0;
  for (long long j = 0; j < n; ++j) {{
    const {T} t = x[j] - m;
    y[j] = t < {FAST} ? {FAST} : t;
    masked |= t == -INFINITY;
    tiny |= t < {FAST} && t != -INFINITY;
  }}
  /* A loop of its own: fused with the clamp, GCC hoists exp({FAST}) and calls the masked
     SIMD exp on the raw arguments, -inf included. */
  for (long long j = 0; j < n; ++j) y[j] = exp{F}(y[j]);
  if (masked)
    for (long long j = 0; j < n; ++j) y[j] = x[j] - m == -INFINITY ? 0 : y[j];
  if (tiny)
    for (long long j = 0; j < n; ++j) {{
      const {T} t = x[j] - m;
      if (t < {FAST} && t != -INFINITY) y[j] = exp{F}(t);
    }}
}}

/* One row's exp(x - max) into y; returns the row sum (1 for a row with nothing to sum). */
static inline {T} exp_row_{S}(const {T}* restrict xr, {T}* restrict yr, long long n, {T}* m) {{
  *m = row_shift_{S}(xr, n);
  exp_shifted_{S}(xr, *m, yr, n);
  const {T} s = row_sum_{S}(yr, n);
  return s == 0 ? 1 : s;
}}
"""

# The kernels: (name, parameters, items, work, body over the items [lo, hi)). Threads
# share the rows (each row is computed whole by one thread), or for the scatter the
# columns (each column's additions stay in index order): results do not depend on
# the thread count.
_ROWS = ["long long rows", "long long n", "const {T}* restrict x"]
_KERNELS = [
    ("softmax_{S}", _ROWS + ["{T}* restrict y"], "rows", "rows * n", """
for (long long r = lo; r < hi; ++r) {{
  {T} m;
  const {T} s = exp_row_{S}(x + r * n, y + r * n, n, &m);
  for (long long j = 0; j < n; ++j) y[r * n + j] = y[r * n + j] / s;
}}"""),
    ("log_softmax_{S}", _ROWS + ["{T}* restrict y"], "rows", "rows * n", """
for (long long r = lo; r < hi; ++r) {{
  {T} m;
  const {T} ls = log{F}(exp_row_{S}(x + r * n, y + r * n, n, &m));
  for (long long j = 0; j < n; ++j) y[r * n + j] = (x[r * n + j] - m) - ls;
}}"""),
    ("layer_norm_{S}", _ROWS + ["const {T}* restrict w", "const {T}* restrict b", "double eps",
                                "{T}* restrict y"], "rows", "rows * n", """
for (long long r = lo; r < hi; ++r) {{
  const {T}* xr = x + r * n;
  {T}* yr = y + r * n;
  const {T} mean = row_sum_{S}(xr, n) / ({T})n;
  for (long long j = 0; j < n; ++j) {{ const {T} c = xr[j] - mean; yr[j] = c * c; }}
  const {T} var = row_sum_{S}(yr, n) / ({T})n;
  const {T} rstd = 1 / sqrt{F}(var + ({T})eps);
  for (long long j = 0; j < n; ++j) yr[j] = ((xr[j] - mean) * rstd) * w[j] + b[j];
}}"""),
    # out[idx[i], :] += values[i, :] for rows of length d; indices already checked.
    ("scatter_add_rows_{S}", ["long long count", "long long d", "long long rows",
                              "const long long* restrict idx", "const {T}* restrict values",
                              "{T}* restrict out"], "d", "count * d", """
for (long long i = 0; i < count; ++i) {{
  const long long r = idx[i] < 0 ? idx[i] + rows : idx[i];
  {T}* restrict dst = out + r * d;
  const {T}* restrict src = values + i * d;
  for (long long j = lo; j < hi; ++j) dst[j] += src[j];
}}"""),
]


def _kernels_source(**names: Any) -> str:
    return "".join(cparallel.parallel_function(name.format(**names), [p.format(**names) for p in params],
                                               items, work, body.format(**names).strip().splitlines())
                   for name, params, items, work, body in _KERNELS)

_TYPES = {np.dtype(np.float32): ("float", "f32", "f"), np.dtype(np.float64): ("double", "f64", "")}
_FAST = {"f32": "-87.0f", "f64": "-708.0"}      # exp's result is still a normal number here
_AVX = {"f32": dict(VEC="__m256", SET1="_mm256_set1_ps", MAX="_mm256_max_ps", LOADU="_mm256_loadu_ps",
                    STOREU="_mm256_storeu_ps", LANES=8),
        "f64": dict(VEC="__m256d", SET1="_mm256_set1_pd", MAX="_mm256_max_pd", LOADU="_mm256_loadu_pd",
                    STOREU="_mm256_storeu_pd", LANES=4)}
_HEADER = "#if defined(__AVX__)\n#include <immintrin.h>\n#endif\n"
_lib: Any = None
_tried = False


def c_source() -> str:
    """The kernels' C source for both float types (the jit's row kernels reuse its
    static row helpers: row_shift, exp_row, row_sum)."""
    return _HEADER + "".join(_ROW_SUM.format(T=t, S=s, F=f, FAST=_FAST[s], **_AVX[s])
                             + _kernels_source(T=t, S=s, F=f) for t, s, f in _TYPES.values())


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


def _rows(x: Any, axis: int) -> tuple[Any, str] | None:
    """(library, type suffix) when `x` can take the C path: the last axis of a
    C-contiguous float32/float64 array with at least one element."""
    kind = _TYPES.get(x.dtype)
    if kind is None or axis != x.ndim - 1 or not x.flags.c_contiguous or x.size == 0:
        return None
    lib = _library()
    return None if lib is None else (lib, kind[1])


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(cbuild.address(a))


def _new(a: np.ndarray) -> ctypes.c_void_p:
    """A fresh array's pointer (not worth remembering)."""
    return ctypes.c_void_p(a.ctypes.data)


def softmax(x: np.ndarray, axis: int, log: bool = False) -> np.ndarray | None:
    found = _rows(x, axis)
    if found is None:
        return None
    lib, suffix = found
    y = np.empty_like(x)
    n = x.shape[-1]
    fn = getattr(lib, f"{'log_softmax' if log else 'softmax'}_{suffix}")
    fn(ctypes.c_longlong(x.size // n), ctypes.c_longlong(n), _ptr(x), _new(y))
    return y


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray | None:
    found = _rows(x, x.ndim - 1) if x.ndim else None
    if found is None or w.dtype != x.dtype or b.dtype != x.dtype:
        return None
    lib, suffix = found
    w, b = np.ascontiguousarray(w), np.ascontiguousarray(b)
    y = np.empty_like(x)
    n = x.shape[-1]
    getattr(lib, f"layer_norm_{suffix}")(ctypes.c_longlong(x.size // n), ctypes.c_longlong(n),
                                         _ptr(x), _ptr(w), _ptr(b), ctypes.c_double(eps), _new(y))
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
