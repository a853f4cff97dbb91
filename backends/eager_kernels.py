"""Eager elementwise ops on large CPU arrays as printed C kernels on the thread pool.

NumPy's ufuncs run on one core, and an op without a ufunc (gelu, sigmoid, the
optimizer's updates) costs several whole-array NumPy calls. Above `MIN_ELEMENTS`
output elements an eager elementwise op instead runs its spec's expression
(`impl_expr`, printed by `backends.cprint`, the printer of the jit's kernels) as one
C loop split across `backends.cparallel`'s pool.

One kernel per (op, dtype, input types, innermost-stride pattern): shapes and
strides are run-time arguments, so a new shape compiles nothing. Each element is
computed on its own from the same expression, so the result is the same on any
number of threads; arithmetic, sqrt and selects are correctly rounded in C as in
NumPy (bit-identical results), exp/log/log1p/tanh/erf come from libm's vector functions
(within the jit's tolerance of NumPy's). Integer kernels are offered only for sums
and products, computed in unsigned arithmetic so that overflow wraps as in NumPy.

Everything else keeps the NumPy function: small arrays, mixed dtypes, bool results,
float16, an `out=` overlapping an input, or no C compiler.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Any, Callable

import numpy as np
import sympy

from . import cbuild, cparallel
from .cprint import CPrintError, c_expression, storage_ctype

# Elements below which NumPy is as fast as a kernel: a kernel call costs ~10-20 us of
# Python and ctypes. Measured on a 2-core machine, one thread: exp, sigmoid and
# adam_param gain 1.1-1.6x from 64K elements (2-7x from 1M), add loses ~10% at
# any size (both are memory-bound), so a single-call op without transcendentals
# (add, mul, maximum, ...) uses a kernel only when threads can share it, from
# 4 * MIN_ELEMENTS.
MIN_ELEMENTS = 1 << 16
# A row longer than this is cut into chunks of it, so threads can share one long row.
CHUNK = 1 << 14
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_WEAK = (float, int, bool)
_BOOL = np.dtype(bool)
_MAX_DIMS = 64

_lock = threading.Lock()
_kernels: dict[tuple, Any] = {}
_min_elements = MIN_ELEMENTS
_calls = 0


def set_min_elements(n: int) -> int:
    """Use kernels from `n` input elements on (0: every op the kernels handle, also
    single-call ones on one thread); returns the previous value."""
    global _min_elements
    previous, _min_elements = _min_elements, max(0, int(n))
    return previous


def kernel_calls() -> int:
    """How many eager ops so far ran as a kernel (tests read it to see the path taken)."""
    return _calls


def _heavy(spec: Any) -> bool:
    """Worth a kernel on one thread too (costly math, or libmvec's vector functions)?"""
    return spec.cost > 1 or spec.c_math == "vector"


_integer_ops: dict[Any, bool] = {}


def _integer_exact(spec: Any) -> bool:
    """Is the spec only sums, products and positive integer powers, which integer C
    computes exactly (wrapping) as NumPy does? Read once per spec (the spec object:
    two specs may share a name)."""
    if spec not in _integer_ops:
        _integer_ops[spec] = _polynomial(spec.impl_expr)
    return _integer_ops[spec]


def _polynomial(expr: sympy.Expr) -> bool:
    """Only sums, products and positive integer powers?"""
    for e in sympy.preorder_traversal(expr):
        if isinstance(e, sympy.Pow):
            if not (e.exp.is_Integer and e.exp > 0):
                return False
        elif not (e.is_Symbol or e.is_Integer or isinstance(e, (sympy.Add, sympy.Mul))):
            return False
    return True


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    """Floats as themselves; integers in unsigned arithmetic of at least 32 bits, which
    wraps on overflow (signed overflow in C is undefined) and never promotes to int."""
    if dtype.kind == "f":
        return dtype
    return np.dtype(np.uint64) if dtype.itemsize == 8 else np.dtype(np.uint32)


def kernel_source(name: str, spec: Any, dtype: np.dtype, in_dtypes: tuple, pattern: str) -> str:
    """A C function `name(items, work, nd, meta, inner, chunks, p0, ..., out)` computing
    `spec` over an output of `nd` merged axes (C-contiguous), `meta` holding the axes'
    extents and then each input's element strides along them (0 where broadcast).
    `pattern` holds each input's innermost stride: "c" (1), "b" (0) or "s" (any other,
    read at run time). The pool's items are (row, chunk) pairs; each part walks its rows
    with an odometer, not a division per row."""
    ct = storage_ctype(dtype, "c")
    compute = _compute_dtype(dtype)
    cc = storage_ctype(compute, "c")
    ins = ["unsigned char" if d == _BOOL else storage_ctype(d, "c") for d in in_dtypes]
    params = ["long long items", "long long work", "long long nd", "const long long* meta",
              "long long inner", "long long chunks"]
    params += [f"const {t}* restrict p{k}" for k, t in enumerate(ins)]
    params.append(f"{ct}* restrict out")
    body = c_expression(spec.impl_expr, {s: f"in{k}" for k, s in enumerate(spec.symbols)}, compute)
    n = len(ins)
    index = {"c": "j", "b": "0", "s": "j * {s}"}
    loads = " ".join(f"const {cc} in{k} = ({cc})q{k}[{index[m].format(s=f's{k}')}];"
                     for k, m in enumerate(pattern))
    lines = ["const long long* shape = meta;",
             *[f"const long long* st{k} = meta + {k + 1}LL * nd;" for k in range(n)],
             *[f"const long long s{k} = st{k}[nd - 1]; (void)s{k};" for k in range(n)],
             f"long long idx[{_MAX_DIMS}];",
             "long long r = lo / chunks, c = lo % chunks, rest = r;",
             *[f"long long o{k} = 0;" for k in range(n)],
             "for (long long d = nd - 2; d >= 0; --d) {",
             "  idx[d] = rest % shape[d];",
             "  rest /= shape[d];",
             *[f"  o{k} += idx[d] * st{k}[d];" for k in range(n)],
             "}",
             "for (long long item = lo; item < hi; ++item) {",
             f"  const long long j0 = c * {CHUNK}LL, j1 = j0 + {CHUNK}LL < inner ? j0 + {CHUNK}LL : inner;",
             *[f"  const {t}* restrict q{k} = p{k} + o{k};" for k, t in enumerate(ins)],
             f"  {ct}* restrict y = out + r * inner;",
             f"  for (long long j = j0; j < j1; ++j) {{ {loads} y[j] = ({ct})({body}); }}",
             "  if (++c == chunks) {",
             "    c = 0;",
             "    ++r;",
             "    for (long long d = nd - 2; d >= 0; --d) {",
             *[f"      o{k} += st{k}[d];" for k in range(n)],
             "      if (++idx[d] < shape[d]) break;",
             *[f"      o{k} -= st{k}[d] * shape[d];" for k in range(n)],
             "      idx[d] = 0;",
             "    }",
             "  }",
             "}"]
    return cparallel.parallel_function(name, params, "items", "work", lines)


def _kernel(spec: Any, dtype: np.dtype, in_dtypes: tuple, pattern: str) -> Any:
    """The compiled kernel for this key (built once), or None where it has no C form.
    Keyed by the spec object, not its name: an unregistered op (a row program's map
    step, a test's) may share a name with another expression."""
    key = (spec, dtype, in_dtypes, pattern)
    fn = _kernels.get(key, False)
    if fn is not False:
        return fn
    with _lock:
        if key not in _kernels:
            fn = None
            try:
                name = "_".join(["eager", spec.name, *(d.name for d in (dtype, *in_dtypes)), pattern])
                source = kernel_source(name, spec, dtype, in_dtypes, pattern)
                fn = getattr(cparallel.build(source, vector=cbuild.vector_math()), name)
                fn.restype = None
                fn.argtypes = [ctypes.c_longlong] * 3 + [ctypes.c_void_p] + [ctypes.c_longlong] * 2 \
                    + [ctypes.c_void_p] * (len(in_dtypes) + 1)
            except (CPrintError, RuntimeError, OSError, AttributeError):
                fn = None
            _kernels[key] = fn
        return _kernels[key]


def merge_axes(shape: tuple, strides: list[list[int]], keep_last: bool = False
               ) -> tuple[list[int], list[list[int]]]:
    """(extents, per-operand strides) of the loops over `shape`: size-1 axes dropped,
    neighbours merged wherever every operand steps through them as through one axis
    (never into the last axis with `keep_last`: it is a row of its own)."""
    dims: list[int] = []
    merged: list[list[int]] = [[] for _ in strides]
    last = len(shape) - 1
    for d, extent in enumerate(shape):
        if extent == 1 and not (keep_last and d == last):
            continue
        if dims and not (keep_last and d == last) and \
                all(m[-1] == st[d] * extent for m, st in zip(merged, strides)):
            dims[-1] *= extent
            for m, st in zip(merged, strides):
                m[-1] = st[d]
        else:
            dims.append(extent)
            for m, st in zip(merged, strides):
                m.append(st[d])
    if not dims:
        return [1], [[0] for _ in strides]
    return dims, merged


def _element_strides(a: np.ndarray, shape: tuple) -> list[int] | None:
    """a's element strides broadcast to `shape` (0 along broadcast axes), or None when a
    stride is not a whole number of elements."""
    lead = len(shape) - a.ndim
    out = [0] * len(shape)
    for d, (extent, step) in enumerate(zip(a.shape, a.strides)):
        if extent != 1:
            if step % a.itemsize:
                return None
            out[lead + d] = step // a.itemsize
    return out


def _contiguous_strides(shape: tuple) -> list[int]:
    out, step = [0] * len(shape), 1
    for d in reversed(range(len(shape))):
        out[d] = step
        step *= shape[d]
    return out


def run(spec: Any, args: tuple, out: Any = None) -> Any:
    """`spec` over `args` (arrays and Python scalars) as one C kernel, or None where the
    kernel does not apply (the caller then runs NumPy)."""
    if spec.result != "same":
        return None
    arrays = []
    dtype = shape = None
    same = True                          # every array C-contiguous, of one shape
    for k, a in enumerate(args):
        if type(a) is np.ndarray and k != spec.condition:
            if dtype is None:
                dtype, shape, same = a.dtype, a.shape, a.flags.c_contiguous
            elif a.dtype != dtype:
                return None
            elif a.shape != shape or not a.flags.c_contiguous:
                same = False
    if dtype is None or (dtype not in _FLOATS and not (dtype.kind in "iu" and not spec.float_result
                                                          and _integer_exact(spec))):
        return None
    for k, a in enumerate(args):
        want = _BOOL if k == spec.condition else dtype
        if type(a) is not np.ndarray:
            # Python scalars are weak: NumPy casts them to the arrays' dtype (a float
            # with integer arrays would promote: not this kernel's case)
            if type(a) not in _WEAK or (dtype.kind != "f" and type(a) is float):
                return None
            try:
                a = np.asarray(a, dtype=want)
            except OverflowError:
                return None              # NumPy raises its own error
        elif a.dtype != want or not a.flags.aligned:
            return None
        elif k == spec.condition and (a.shape != shape or not a.flags.c_contiguous):
            same = False
        arrays.append(a)
    if not same:
        try:
            shape = np.broadcast_shapes(*(a.shape for a in arrays))
        except ValueError:
            return None
    elif shape is None:
        shape = ()
    if out is not None and (type(out) is not np.ndarray or out.shape != shape or out.dtype != dtype
                            or not out.flags.c_contiguous or not out.flags.writeable
                            or any(np.may_share_memory(out, a) for a in arrays)):
        return None
    result = np.empty(shape, dtype) if out is None else out
    size = result.size
    if size == 0:
        return result
    if same:                             # the common case: one flat loop
        dims = [size]
        merged = [[1 if a.ndim else 0] for a in arrays]
    else:
        strides = [_element_strides(a, shape) for a in arrays]
        if any(s is None for s in strides):
            return None
        dims, merged = merge_axes(shape, [_contiguous_strides(shape)] + strides)
        merged = merged[1:]
    pattern = "".join("c" if m[-1] == 1 else "b" if m[-1] == 0 else "s" for m in merged)
    fn = _kernel(spec, dtype, tuple(a.dtype for a in arrays), pattern)
    if fn is None:
        return None
    inner = dims[-1]
    chunks = -(-inner // CHUNK)
    meta = dims + [st for m in merged for st in m]
    meta = (ctypes.c_longlong * len(meta))(*meta)
    fn(size // inner * chunks, size, len(dims), ctypes.addressof(meta), inner, chunks,
       *(cbuild.address(a) for a in arrays), result.ctypes.data)
    global _calls
    _calls += 1
    return result


def wrap(spec: Any, numpy_fn: Callable[..., Any]) -> Callable[..., Any]:
    """`numpy_fn` (the spec's NumPy function) with large arrays sent to `run`. Keeps its
    `out=` support (the jit writes into planned buffers through it)."""
    friendly = spec.c_math == "plain" or (spec.c_math == "vector" and cbuild.vector_math())
    writes_out = isinstance(numpy_fn, np.ufunc) or getattr(numpy_fn, "writes_out", False)
    if not friendly or spec.result != "same" or not cbuild.available():
        return numpy_fn

    heavy = _heavy(spec)

    def elementwise(*args: Any, out: Any = None) -> Any:
        # the input elements from which the kernel runs now (None: not at all); cheap, as
        # it runs on every eager op. Cheap math pays for a kernel only on several threads.
        limit = (_min_elements if heavy or _min_elements == 0
                 else 4 * _min_elements if cparallel.threads() > 1 else None)
        if limit is not None:
            size = 0
            for a in args:
                if type(a) is np.ndarray and a.size > size:
                    size = a.size
            if size >= limit and size:
                result = run(spec, args, out)
                if result is not None:
                    return result
        return numpy_fn(*args) if out is None else numpy_fn(*args, out=out)

    def for_size(elements: int) -> Callable[..., Any]:
        """The function to bind where the size is fixed (a compiled program's buffers):
        NumPy's own below the size from which any thread count runs the kernel, as
        `elementwise` would decide at every call (set_min_elements applies from then on)."""
        return numpy_fn if elements < _min_elements else elementwise

    elementwise.writes_out = writes_out
    elementwise.for_size = for_size
    elementwise.__name__ = f"{spec.name}_eager"
    return elementwise
