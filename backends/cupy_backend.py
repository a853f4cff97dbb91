"""The CUDA backend: CuPy arrays, with kernels generated from the op specs.

Elementwise ops run as `cupy.ElementwiseKernel`s whose bodies `backends.cprint`
prints from each spec's sympy expression (one kernel per op and compute dtype,
built on first use). Reductions, matmul (cuBLAS), movement and indexing use CuPy
directly; index_add uses `cupy.add.at`; random numbers are the engine's Philox
stream, one elementwise kernel per draw. The hot composites (softmax, log_softmax,
layer_norm) have hand-written fused kernels, kept here as source templates so CI
can compile them with `nvcc` on machines without a GPU.

CuPy is imported only by `create_backend`, which the registry calls the first
time someone asks for "cuda": without CuPy or without a GPU it raises
`BackendUnavailable` with the install hint, never an ImportError from deep inside.
"""
from __future__ import annotations

import functools
import math
import numbers
import string
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from . import cprint
from .base import Backend

INSTALL_HINT = ('install CuPy with `pip install -e ".[cuda]"` (CUDA 12; `.[cuda13]` for CUDA 13) '
                'on a machine with an NVIDIA GPU and driver')

_F16, _F32, _F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
_I64, _U64 = np.dtype(np.int64), np.dtype(np.uint64)

# CuPy ufuncs by op name: used only where a spec has no C form for a dtype
# (an integer power, complex numbers).
_CUPY_UFUNCS = {
    "add": "add", "sub": "subtract", "mul": "multiply", "div": "true_divide", "neg": "negative",
    "pow": "power", "exp": "exp", "log": "log", "sqrt": "sqrt", "abs": "absolute",
    "tanh": "tanh", "sign": "sign", "maximum": "maximum", "minimum": "minimum",
    "eq": "equal", "ne": "not_equal", "lt": "less", "le": "less_equal", "gt": "greater",
    "ge": "greater_equal", "logical_and": "logical_and", "logical_or": "logical_or",
    "logical_not": "logical_not",
}

# Accumulation dtype of cupy.add.at per value dtype (its atomics cover only
# these); int64 adds as uint64, which wraps identically in two's complement.
_SCATTER_DTYPES = {_F16: _F32, _F32: _F32, _F64: _F64, np.dtype(np.int32): np.dtype(np.int32),
                   np.dtype(np.uint32): np.dtype(np.uint32), _U64: _U64, _I64: _U64}


# -- fused kernels (written once, as templates over the storage dtype) -----------------------

FUSED_BLOCK = 256          # most threads per block; the shared reduction buffers are this big
FUSED_DTYPES = (_F16, _F32, _F64)

# Target-specific definitions for CUDA (nvcc and NVRTC alike: no headers needed).
# float16 is stored as 16 raw bits and converted with the PTX instructions that
# cuda_fp16.h itself uses, so the kernels compile under NVRTC without that header.
FUSED_PRELUDE = r"""
#ifndef ENGINE_FUSED_PRELUDE
#define ENGINE_FUSED_PRELUDE
typedef unsigned short engine_half_t;
__device__ __forceinline__ float engine_h2f(engine_half_t h) {
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ engine_half_t engine_f2h(float f) {
  engine_half_t h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float engine_neg_inf_float() { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ double engine_neg_inf_double() {
  return -__longlong_as_double(0x7ff0000000000000LL);
}
#endif
"""

# Device helpers shared by every fused kernel; they use only threadIdx, blockDim
# and __syncthreads, so a CPU emulation can run them too.
FUSED_HELPERS = r"""
#ifndef ENGINE_FUSED_HELPERS
#define ENGINE_FUSED_HELPERS
#define ENGINE_BLOCK %(block)d
// Block-wide reductions over blockDim.x threads (a power of two <= ENGINE_BLOCK).
template <typename A> __device__ __forceinline__ A engine_block_sum(A v, A* buf) {
  buf[threadIdx.x] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  A r = buf[0];
  __syncthreads();                   // buf is reused by the next reduction
  return r;
}
template <typename A> __device__ __forceinline__ A engine_max_nan(A a, A b) {
  return (b > a || b != b) ? b : a;  // NaN propagates, as in NumPy's max
}
template <typename A> __device__ __forceinline__ A engine_block_max(A v, A* buf) {
  buf[threadIdx.x] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] = engine_max_nan(buf[threadIdx.x], buf[threadIdx.x + s]);
    __syncthreads();
  }
  A r = buf[0];
  __syncthreads();
  return r;
}
#endif
""" % {"block": FUSED_BLOCK}

# Parameter roles -> C declarations ($T storage type, $A accumulation type).
_ROLE_DECL = {"in": "const $T* __restrict__", "out": "$T* __restrict__", "i64": "long long",
              "acc": "$A", "i32": "int"}


@dataclass(frozen=True)
class FusedKernel:
    """A hand-written row-wise CUDA kernel, a template over the storage dtype.

    One block handles one row (grid-stride over rows); `params` are (role, name)
    pairs, roles as in _ROLE_DECL; `body` is the kernel body with $-placeholders
    ($T, $A, $load, $store, $exp, $log, $sqrt, $neg_inf).
    """
    name: str
    params: tuple[tuple[str, str], ...]
    body: str

    def kernel_name(self, dtype: Any) -> str:
        return f"engine_{self.name}_{np.dtype(dtype).name}"

    def source(self, dtype: Any) -> str:
        """The kernel alone (it needs FUSED_PRELUDE, or an emulation's, and FUSED_HELPERS)."""
        dt = np.dtype(dtype)
        if dt not in FUSED_DTYPES:
            raise TypeError(f"fused {self.name}: no kernel for dtype {dt}")
        acc = "double" if dt == _F64 else "float"
        subs = {
            "T": {_F16: "engine_half_t", _F32: "float", _F64: "double"}[dt], "A": acc,
            "load": "engine_h2f" if dt == _F16 else f"({acc})",
            "store": "engine_f2h" if dt == _F16 else f"({acc})",
            "exp": "expf" if acc == "float" else "exp",
            "log": "logf" if acc == "float" else "log",
            "sqrt": "sqrtf" if acc == "float" else "sqrt",
            "neg_inf": f"engine_neg_inf_{acc}()",
        }
        decl = ", ".join(f"{_ROLE_DECL[role]} {name}" for role, name in self.params)
        text = (f'extern "C" __global__ void {self.kernel_name(dt)}({decl}) {{\n'
                f"  __shared__ $A buf[ENGINE_BLOCK];\n{self.body}}}\n")
        return string.Template(text).substitute(subs)


_ROW_LOOP = """\
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const $T* xr = x + r * cols;
    $T* yr = y + r * cols;
"""

_MAX_SHIFT = """\
    $A m = $neg_inf;
    for (long long j = threadIdx.x; j < cols; j += blockDim.x) m = engine_max_nan(m, $load(xr[j]));
    m = engine_block_max(m, buf);
    if (m == $neg_inf) m = 0;           // a row of all -inf: exp(x - 0) = 0, never NaN
    $A s = 0;
    for (long long j = threadIdx.x; j < cols; j += blockDim.x) s += $exp($load(xr[j]) - m);
    s = engine_block_sum(s, buf);
    if (s == 0) s = 1;                  // ... and its outputs are 0 (softmax) or -inf (log)
"""

SOFTMAX = FusedKernel(
    "softmax", (("in", "x"), ("out", "y"), ("i64", "rows"), ("i64", "cols")),
    _ROW_LOOP + _MAX_SHIFT + """\
    for (long long j = threadIdx.x; j < cols; j += blockDim.x) yr[j] = $store($exp($load(xr[j]) - m) / s);
  }
""")

LOG_SOFTMAX = FusedKernel(
    "log_softmax", (("in", "x"), ("out", "y"), ("i64", "rows"), ("i64", "cols")),
    _ROW_LOOP + _MAX_SHIFT + """\
    const $A ls = $log(s);
    for (long long j = threadIdx.x; j < cols; j += blockDim.x) yr[j] = $store(($load(xr[j]) - m) - ls);
  }
""")

LAYER_NORM = FusedKernel(
    "layer_norm", (("in", "x"), ("in", "w"), ("in", "b"), ("out", "y"), ("i64", "rows"),
                   ("i64", "cols"), ("acc", "eps"), ("i32", "has_w"), ("i32", "has_b")),
    _ROW_LOOP + """\
    $A s = 0;
    for (long long j = threadIdx.x; j < cols; j += blockDim.x) s += $load(xr[j]);
    const $A mean = engine_block_sum(s, buf) / ($A)cols;
    $A q = 0;
    for (long long j = threadIdx.x; j < cols; j += blockDim.x) {
      const $A d = $load(xr[j]) - mean;
      q += d * d;
    }
    const $A var = engine_block_sum(q, buf) / ($A)cols;     // biased, as the composite
    const $A rstd = ($A)1 / $sqrt(var + eps);
    for (long long j = threadIdx.x; j < cols; j += blockDim.x) {
      $A v = ($load(xr[j]) - mean) * rstd;
      if (has_w) v = v * $load(w[j]);
      if (has_b) v = v + $load(b[j]);
      yr[j] = $store(v);
    }
  }
""")

FUSED_KERNELS: dict[str, FusedKernel] = {k.name: k for k in (SOFTMAX, LOG_SOFTMAX, LAYER_NORM)}


def fused_source(kernel: FusedKernel, dtype: Any) -> str:
    """The complete CUDA source of one fused kernel (what RawKernel compiles)."""
    return FUSED_PRELUDE + FUSED_HELPERS + kernel.source(dtype)


def fused_translation_unit(dtypes: Sequence[Any] = FUSED_DTYPES) -> str:
    """Every fused kernel in every dtype as one `.cu` file (for `nvcc -c` in CI)."""
    return FUSED_PRELUDE + FUSED_HELPERS + "\n".join(
        k.source(dt) for k in FUSED_KERNELS.values() for dt in dtypes)


def launch_config(rows: int, cols: int) -> tuple[int, int]:
    """(blocks, threads) for a row-wise kernel: one block per row (at most 65536 blocks,
    striding over the rest), a power of two of 32..FUSED_BLOCK threads covering a row."""
    threads = 32
    while threads < cols and threads < FUSED_BLOCK:
        threads *= 2
    return max(1, min(rows, 65536)), threads


# -- the backend --------------------------------------------------------------------------

def _scalar_proto(k: Any) -> Any:
    """A stand-in with the dtype (array) or Python type (scalar) `k`, for result_type."""
    return np.empty(0, k) if isinstance(k, np.dtype) else k(0)


def reduction_preamble(in_params: str, out_params: str) -> str:
    """The CUDA preamble of a generated `ReductionKernel`, with the raw-type names of its
    first input and output declared.

    CuPy (14) sends a one-input reduction over trailing contiguous axes to its CUB block
    reduction, whose template reads `type_in0_raw`/`type_out0_raw`; only CuPy's own
    reductions declare them, so a user kernel with concrete dtypes fails to compile
    there. Declaring them ourselves is harmless elsewhere (an identical typedef may repeat).
    """
    (in_dtype, _), *_ = cprint.parse_params(in_params)
    (out_dtype, _), *_ = cprint.parse_params(out_params)
    return (f"typedef {cprint.storage_ctype(in_dtype, 'cupy')} type_in0_raw;\n"
            f"typedef {cprint.storage_ctype(out_dtype, 'cupy')} type_out0_raw;\n"
            + cprint.CUDA_PREAMBLE)


class CupyBackend(Backend):
    """Raw arrays are `cupy.ndarray`s on one GPU.

    `cupy_module` is passed in (by `create_backend`) rather than
    imported here, so this module imports without CuPy: its kernel sources are
    compiled by CI on machines without a GPU.
    """

    array_methods = True

    # Methods that must run with this backend's GPU current ("cuda:N" with N given).
    _DEVICE_METHODS = ("asarray", "full", "arange", "astype", "copy", "sum", "max", "matmul",
                       "reshape", "transpose", "broadcast_to", "concatenate", "pad", "where",
                       "getitem", "index_add", "setitem", "random", "from_dlpack", "softmax",
                       "log_softmax", "layer_norm", "to_numpy", "matmul_out")

    def __init__(self, cupy_module: Any, device: str = "cuda") -> None:
        self.cp = cupy_module
        self.name = device
        index = int(device.split(":", 1)[1]) if ":" in device else None
        self._device = cupy_module.cuda.Device(index) if index is not None else None
        self._kernels: dict[tuple, Callable[..., Any]] = {}
        self._fused: dict[tuple[str, np.dtype], Any] = {}
        if self._device is not None:
            for name in self._DEVICE_METHODS:
                setattr(self, name, self._on_device(getattr(self, name)))

    def _on_device(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` run with this backend's GPU as the current CuPy device."""
        dev = self._device

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with dev:
                return fn(*args, **kwargs)
        return run

    # -- creation and conversion ------------------------------------------------
    def asarray(self, data: Any, dtype: Any = None) -> Any:
        if isinstance(data, self.cp.ndarray):
            return data if dtype is None else data.astype(dtype, copy=False)
        return self.cp.asarray(np.asarray(data, dtype=dtype))

    def to_numpy(self, x: Any) -> Any:
        return self.cp.asnumpy(x)

    def full(self, shape: tuple, value: Any, dtype: Any) -> Any:
        return self.cp.full(shape, value, dtype=dtype)

    def arange(self, start: Any, stop: Any, step: Any, dtype: Any) -> Any:
        return self.cp.arange(start, stop, step, dtype=dtype)

    def astype(self, x: Any, dtype: Any) -> Any:
        return x.astype(dtype, copy=False)

    def copy(self, x: Any) -> Any:
        return x.copy()

    def from_dlpack(self, obj: Any) -> Any:
        """A CuPy array sharing memory with a CUDA DLPack producer (PyTorch, CuPy, ...)."""
        return self.cp.from_dlpack(obj)

    # -- elementwise -------------------------------------------------------------
    def elementwise_fn(self, spec: Any) -> Callable[..., Any]:
        """A callable picking, per input dtypes, the kernel printed from `spec`.

        The compute dtype follows NumPy's promotion with Python scalars weak (as the
        NumPy backend); arrays are cast to it and scalars passed as kernel scalars.
        """
        plans: dict[tuple, Callable[..., Any]] = {}

        def run(*args: Any) -> Any:
            key = tuple(type(a) if isinstance(a, numbers.Number) else a.dtype for a in args)
            plan = plans.get(key)
            if plan is None:
                plan = plans[key] = self._plan(spec, key)
            return plan(*args)

        return self._on_device(run) if self._device is not None else run

    def _plan(self, spec: Any, key: tuple) -> Callable[..., Any]:
        compute = np.result_type(*(_scalar_proto(k) for k in key))
        if spec.float_result and compute.kind not in "fc":
            compute = _F32
        kernel = self._elementwise_kernel(spec, compute)
        casts = [(lambda a: compute.type(a)) if not isinstance(k, np.dtype)
                 else (lambda a: a) if k == compute else (lambda a: a.astype(compute))
                 for k in key]

        def call(*args: Any) -> Any:
            return kernel(*[c(a) for c, a in zip(casts, args)])
        return call

    def _elementwise_kernel(self, spec: Any, dtype: np.dtype) -> Callable[..., Any]:
        """The ElementwiseKernel of `spec` in `dtype`, built once (CuPy compiles it on
        first call and caches the binary on disk)."""
        key = (spec.name, dtype)
        kern = self._kernels.get(key)
        if kern is None:
            try:
                in_params, out_params, body = cprint.elementwise_kernel_source(spec, dtype)
            except cprint.CPrintError as e:
                ufunc = getattr(self.cp, _CUPY_UFUNCS.get(spec.name, ""), None)
                if ufunc is None:
                    raise TypeError(f"{spec.name}: no CUDA kernel for dtype {dtype}: {e}") from None
                kern = ufunc
            else:
                kern = self.cp.ElementwiseKernel(
                    in_params, out_params, body, name=cprint.kernel_name(spec.name, dtype),
                    preamble=cprint.CUDA_PREAMBLE)
            self._kernels[key] = kern
        return kern

    def reduction_kernel(self, in_params: str, out_params: str, map_expr: str, reduce_expr: str,
                         post_map_expr: str, identity: str, name: str) -> Callable[..., Any]:
        """A `cupy.ReductionKernel` (the jit's fused group + sum), built once per source;
        call it as `k(*inputs, axis=..., keepdims=...)`."""
        key = ("reduce", in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name)
        kern = self._kernels.get(key)
        if kern is None:
            kern = self._kernels[key] = self.cp.ReductionKernel(
                in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name=name,
                preamble=reduction_preamble(in_params, out_params))
        return kern

    def elementwise_kernel(self, in_params: str, out_params: str, body: str,
                           name: str) -> Callable[..., Any]:
        """A `cupy.ElementwiseKernel` for a body printed by cprint (the jit's fused
        groups), built once per source; call it as `k(*inputs)` or `k(*inputs, out)`."""
        key = ("expr", in_params, out_params, body, name)
        kern = self._kernels.get(key)
        if kern is None:
            kern = self._kernels[key] = self.cp.ElementwiseKernel(
                in_params, out_params, body, name=name, preamble=cprint.CUDA_PREAMBLE)
        return self._on_device(kern) if self._device is not None else kern

    # -- reductions and linear algebra -------------------------------------------
    def sum(self, x: Any, axis: tuple | None, keepdims: bool) -> Any:
        if x.dtype == _F16:                 # accumulate in float32, round once
            return self.cp.sum(x, axis=axis, dtype=_F32, keepdims=keepdims).astype(_F16)
        if x.dtype.kind in "bi":
            return self.cp.sum(x, axis=axis, dtype=_I64, keepdims=keepdims)
        return self.cp.sum(x, axis=axis, keepdims=keepdims)

    def max(self, x: Any, axis: tuple | None, keepdims: bool) -> Any:
        return self.cp.max(x, axis=axis, keepdims=keepdims)

    def matmul(self, a: Any, b: Any) -> Any:
        return self.cp.matmul(a, b)         # cuBLAS; float16 accumulates in float32

    def matmul_out(self, a: Any, b: Any, out: Any) -> Any:
        """matmul into a preallocated `out` (None: a new array), for the jit's buffers."""
        return self.cp.matmul(a, b) if out is None else self.cp.matmul(a, b, out=out)

    # -- movement ----------------------------------------------------------------
    def reshape(self, x: Any, shape: tuple) -> Any:
        return self.cp.reshape(x, shape)

    def transpose(self, x: Any, axes: tuple) -> Any:
        return self.cp.transpose(x, axes)

    def broadcast_to(self, x: Any, shape: tuple) -> Any:
        return self.cp.broadcast_to(x, shape)

    def concatenate(self, xs: Sequence[Any], axis: int) -> Any:
        return self.cp.concatenate(list(xs), axis=axis)

    def pad(self, x: Any, pad_width: tuple, value: Any) -> Any:
        return self.cp.pad(x, pad_width, mode="constant", constant_values=value)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return self.cp.where(cond, a, b)

    # -- indexing ----------------------------------------------------------------
    def getitem(self, x: Any, index: tuple) -> Any:
        return x[index]

    def index_add(self, shape: tuple, index: tuple, values: Any, advanced: bool) -> Any:
        cp = self.cp
        dt = values.dtype
        if not advanced:
            out = cp.zeros(shape, dtype=dt)
            out[index] = values
            return out
        work = _SCATTER_DTYPES.get(dt)
        if work is None:                    # small ints and bool: add in int64 (as uint64)
            work = _U64
            values = values.astype(_I64)
        if values.dtype == _I64 and work == _U64:
            values = values.view(_U64)
        else:
            values = values.astype(work, copy=False)
        out = cp.zeros(shape, dtype=work)
        cp.add.at(out, index, values)
        if work == _U64 and dt != _U64:
            out = out.view(_I64)
        return out != 0 if dt.kind == "b" else out.astype(dt, copy=False)

    def setitem(self, x: Any, index: tuple, value: Any) -> None:
        x[index] = value

    # -- random ------------------------------------------------------------------
    def random(self, draw: Any, shape: tuple, dtype: Any, p: float = 0.0) -> Any:
        """One elementwise kernel printed from the Philox spec (ops/random.py): the
        same counters and integer bits as the CPU, so uniform and Bernoulli draws are
        bit-identical to it (normal draws differ by the ulps of logf/cosf)."""
        dt = np.dtype(dtype)
        n = math.prod(shape)
        start = self.claim_counters(n)
        out = self.cp.empty(shape, dtype=dt)
        if n == 0:
            return out
        key = ("philox", draw.name, dt)
        kernel = self._kernels.get(key)
        if kernel is None:
            ins, outs, body = draw.kernel_source(dt)
            kernel = self._kernels[key] = self.cp.ElementwiseKernel(
                ins, outs, body, f"engine_philox_{draw.name}_{dt.name}")
        scalars = [np.uint64(start), np.uint32(self.rng_key[0]), np.uint32(self.rng_key[1])]
        if draw.name == "bernoulli":
            scalars.append(np.uint32(draw.threshold(p)))
        return kernel(*scalars, out)

    # -- fused kernels (optional Backend methods used by ops.fused) ----------------
    def _raw_kernel(self, kernel: FusedKernel, dtype: np.dtype) -> Any:
        key = (kernel.name, dtype)
        raw = self._fused.get(key)
        if raw is None:
            raw = self._fused[key] = self.cp.RawKernel(fused_source(kernel, dtype),
                                                       kernel.kernel_name(dtype))
        return raw

    def _float(self, x: Any) -> Any:
        return x if x.dtype in FUSED_DTYPES else x.astype(_F32)

    def _rowwise(self, kernel: FusedKernel, x: Any, axis: int) -> Any:
        """Run a row kernel along `axis` (moved last and made contiguous if needed)."""
        cp = self.cp
        x = self._float(x)
        last = axis == x.ndim - 1
        xt = cp.ascontiguousarray(x if last else cp.moveaxis(x, axis, -1))
        y = cp.empty(xt.shape, dtype=xt.dtype)
        if xt.size:
            cols = xt.shape[-1]
            rows = xt.size // cols
            grid, block = launch_config(rows, cols)
            self._raw_kernel(kernel, xt.dtype)((grid,), (block,),
                                               (xt, y, np.int64(rows), np.int64(cols)))
        return y if last else cp.moveaxis(y, -1, axis)

    def softmax(self, x: Any, axis: int) -> Any:
        """exp(x - max) / sum(exp(x - max)) along `axis` in one kernel; all -inf rows give 0."""
        return self._rowwise(SOFTMAX, x, axis)

    def log_softmax(self, x: Any, axis: int) -> Any:
        """(x - max) - log(sum(exp(x - max))) along `axis`; all -inf rows give -inf."""
        return self._rowwise(LOG_SOFTMAX, x, axis)

    def layer_norm(self, x: Any, weight: Any, bias: Any, eps: float) -> Any:
        """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (biased
        variance), in one kernel; weight and bias may be None."""
        cp = self.cp
        params = [p for p in (weight, bias) if p is not None]
        dt = np.result_type(x.dtype, *(p.dtype for p in params))
        if dt not in FUSED_DTYPES:
            dt = _F32
        x = cp.ascontiguousarray(x.astype(dt, copy=False))
        cols = x.shape[-1] if x.ndim else 1
        prepared = []
        for name, p in (("weight", weight), ("bias", bias)):
            if p is None:
                prepared.append(x)          # never read (its has_ flag is 0)
                continue
            if p.size != cols:
                raise ValueError(f"layer_norm: {name} of shape {tuple(p.shape)} does not match "
                                 f"the last axis ({cols}) of x with shape {tuple(x.shape)}")
            prepared.append(cp.ascontiguousarray(p.astype(dt, copy=False).reshape(cols)))
        y = cp.empty(x.shape, dtype=dt)
        if x.size:
            rows = x.size // cols
            grid, block = launch_config(rows, cols)
            acc = np.float64(eps) if dt == _F64 else np.float32(eps)
            self._raw_kernel(LAYER_NORM, dt)(
                (grid,), (block,),
                (x, prepared[0], prepared[1], y, np.int64(rows), np.int64(cols), acc,
                 np.int32(weight is not None), np.int32(bias is not None)))
        return y


def create_backend(device: str = "cuda") -> CupyBackend:
    """Start CuPy on `device` ("cuda" = the current GPU, "cuda:N" = GPU N).

    Raises BackendUnavailable, saying what is missing and how to install it, when
    CuPy cannot be imported or no usable GPU is present.
    """
    from . import BackendUnavailable
    try:
        import cupy
    except Exception as e:            # ImportError, or CuPy failing to load CUDA libraries
        raise BackendUnavailable(
            f"device {device!r} needs CuPy, which could not be imported "
            f"({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as e:            # no driver, or a driver too old for this CuPy
        raise BackendUnavailable(
            f"device {device!r}: CuPy is installed but cannot reach a CUDA GPU "
            f"({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    if count == 0:
        raise BackendUnavailable(f"device {device!r}: CuPy is installed but no CUDA GPU is "
                                 f"present; {INSTALL_HINT}")
    if ":" in device:
        index = device.split(":", 1)[1]
        if not index.isdigit() or int(index) >= count:
            raise BackendUnavailable(f"device {device!r}: no such GPU (this machine has {count}: "
                                     f"cuda:0 .. cuda:{count - 1})")
    return CupyBackend(cupy, device)


__all__ = ["CupyBackend", "create_backend", "FusedKernel", "FUSED_KERNELS", "FUSED_PRELUDE",
           "FUSED_HELPERS", "FUSED_DTYPES", "FUSED_BLOCK", "SOFTMAX", "LOG_SOFTMAX", "LAYER_NORM",
           "fused_source", "fused_translation_unit", "launch_config", "INSTALL_HINT"]
