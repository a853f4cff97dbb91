"""The CUDA backend: CuPy arrays, with kernels generated from the op specs.

Elementwise ops run as `cupy.ElementwiseKernel`s whose bodies `backends.cprint`
prints from each spec's sympy expression (one kernel per op and compute dtype,
built on first use). Reductions, matmul (cuBLAS), movement and indexing use CuPy
directly; index_add uses `cupy.add.at`; random numbers are the engine's Philox
stream, one elementwise kernel per draw. Row programs (softmax, log_softmax, layer_norm,
...) run as CUDA kernels printed from their declarations by `backends.rowprint`
(one block per row), so CI can compile them with `nvcc` on machines without a GPU.

CuPy is imported only by `create_backend`, which the registry calls the first
time someone asks for "cuda": without CuPy or without a GPU it raises
`BackendUnavailable` with the install hint, never an ImportError from deep inside.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable

import numpy as np

from ops import attention as attention_ops
from ops.fused import SOFTMAX, SOFTMAX_GRAD
from ops.random import BERNOULLI

from . import attnprint, cprint, cuda_graphs, rowprint
from .array_backend import ArrayBackend
from .base import BackendUnavailable

INSTALL_HINT = ('install CuPy with `pip install -e ".[cuda]"` (CUDA 12; `.[cuda13]` for CUDA 13) '
                'on a machine with an NVIDIA GPU and driver')

_F16, _F32, _F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
_I64, _U64 = np.dtype(np.int64), np.dtype(np.uint64)

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

def row_kernel_source(program: Any, dtype: Any) -> str:
    """The complete CUDA source of a row program's printed kernel (what RawKernel compiles)."""
    return rowprint.cuda_rows_source(program, dtype, FUSED_PRELUDE + FUSED_HELPERS)


def launch_config(rows: int, cols: int) -> tuple[int, int]:
    """(blocks, threads) for a row-wise kernel: one block per row (at most 65536 blocks,
    striding over the rest), a power of two of 32..FUSED_BLOCK threads covering a row."""
    threads = 32
    while threads < cols and threads < FUSED_BLOCK:
        threads *= 2
    return max(1, min(rows, 65536)), threads


# The fused attention's kernels, printed from the row programs and the Bernoulli draw.
ATTENTION_KERNELS = {(k.direction, k.mask, k.dropout, k.scores): k
                     for k in attnprint.all_kernels(SOFTMAX, SOFTMAX_GRAD, BERNOULLI)}
# What the fused attention is offered for: a row of scores and a block's worth of keys.
ATTENTION_MAX_SEQ = 256
ATTENTION_MAX_HEAD = 128


def attention_kernel_source(kernel: Any, dtype: Any) -> str:
    """The complete CUDA source of a printed attention kernel (what RawKernel compiles)."""
    return kernel.full_source(dtype, FUSED_PRELUDE + FUSED_HELPERS)


def attention_declines(q: Any, k_t: Any, v: Any, mask: Any, scale: Any, dropout_p: Any) -> str | None:
    """Why the fused attention kernel does not take these inputs (shape and dtype only),
    or None when it does."""
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        return "the scale is not a Python number"
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= float(dropout_p) < 1.0:
        return "dropout_p is not a probability below 1"
    dt = np.dtype(q.dtype)
    if dt not in attnprint.DTYPES:
        return f"dtype {dt} (the kernel is float32 and float64)"
    try:
        attention_ops.fused_attention.infer(q, k_t, v, *(() if mask is None else (mask,)),
                                            scale=scale, dropout_p=dropout_p)
    except Exception as e:            # shapes or dtypes the op does not take
        return str(e)
    t, d, s, dv = q.shape[-2], q.shape[-1], k_t.shape[-1], v.shape[-1]
    if max(t, s) > ATTENTION_MAX_SEQ or max(d, dv) > ATTENTION_MAX_HEAD or min(t, s, d, dv) == 0:
        return f"sizes T={t}, S={s}, d={d}, dv={dv} outside 1..{ATTENTION_MAX_SEQ} / 1..{ATTENTION_MAX_HEAD}"
    return None


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


class CupyBackend(ArrayBackend):
    """Raw arrays are `cupy.ndarray`s on one GPU.

    `cupy_module` is passed in (by `create_backend`) rather than
    imported here, so this module imports without CuPy: its kernel sources are
    compiled by CI on machines without a GPU.
    """

    # Methods that must run with this backend's GPU current ("cuda:N" with N given).
    _DEVICE_METHODS = ("asarray", "full", "arange", "astype", "copy", "sum", "max", "matmul",
                       "reshape", "transpose", "broadcast_to", "concatenate", "pad", "where",
                       "getitem", "index_add", "setitem", "random", "from_dlpack", "run_rows", "to_numpy",
                       "matmul_out", "run_attention", "run_attention_backward")

    def __init__(self, cupy_module: Any, device: str = "cuda") -> None:
        self.cp = self.xp = cupy_module      # `cp` reads as CuPy in the device-only code
        self.name = device
        index = int(device.split(":", 1)[1]) if ":" in device else None
        self._device = cupy_module.cuda.Device(index) if index is not None else None
        self._kernels: dict[tuple, Callable[..., Any]] = {}
        self.fused_runs = 0                  # launches of the fused attention kernels (for tests)
        self._offered = {attention_ops.fused_attention: self._offer_attention}
        if self._device is not None:
            for name in self._DEVICE_METHODS:
                setattr(self, name, self._on_device(getattr(self, name)))
        self.seed(0)

    def _on_device(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` run with this backend's GPU as the current CuPy device."""
        dev = self._device

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with dev:
                return fn(*args, **kwargs)
        return run

    # -- creation and conversion ------------------------------------------------
    def to_numpy(self, x: Any) -> Any:
        return self.cp.asnumpy(x)

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
                # no C form for this dtype (an integer power): CuPy's ufunc of the same
                # name as the spec's NumPy ufunc, if it declares one
                native = spec.numpy
                ufunc = getattr(self.cp, native.__name__, None) if isinstance(native, np.ufunc) else None
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

    # -- linear algebra ---------------------------------------------------------
    def matmul(self, a: Any, b: Any) -> Any:
        # cuBLAS; float16 accumulates in float32
        if a.ndim > 2 and b.ndim == 2 and a.flags.c_contiguous:
            # (..., m, k) @ (k, n) as one 2-D GEMM over all rows: CuPy would run a strided
            # batched GEMM with a broadcast right operand, and spend more host time on it.
            return self.cp.matmul(a.reshape(-1, a.shape[-1]), b).reshape(a.shape[:-1] + b.shape[-1:])
        return self.cp.matmul(a, b)

    def matmul_out(self, a: Any, b: Any, out: Any) -> Any:
        """matmul into a preallocated `out` (None: a new array), for the jit's buffers."""
        if out is None:
            return self.matmul(a, b)
        if a.ndim > 2 and b.ndim == 2 and a.flags.c_contiguous and out.flags.c_contiguous:
            self.cp.matmul(a.reshape(-1, a.shape[-1]), b, out=out.reshape(-1, b.shape[-1]))
            return out
        return self.cp.matmul(a, b, out=out)

    # -- indexing ----------------------------------------------------------------
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

    # -- random ------------------------------------------------------------------
    def random(self, draw: Any, shape: tuple, dtype: Any, p: float = 0.0) -> Any:
        """One elementwise kernel printed from the Philox spec (ops/random.py): the
        same counters and integer bits as the CPU, so uniform and Bernoulli draws are
        bit-identical to it (normal draws differ by the ulps of logf/cosf)."""
        recording = cuda_graphs.recording_rng()
        if recording is not None:           # inside a CUDA graph: the counter is read on device
            return recording.draw(draw, shape, dtype, p)
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
        if draw.thresholded:
            scalars.append(np.uint32(draw.threshold(p)))
        return kernel(*scalars, out)

    # -- row programs (optional Backend method used by ops.rows) -------------------
    def run_rows(self, program: Any, arrays: tuple, params: dict) -> Any:
        """A row program (ops/rows.py) as its printed CUDA kernel, one block per row; the
        row axis is moved last (and made contiguous) when it is not. Index inputs (one
        per row) go as int64; a reducing program gives one value per row."""
        cp = self.cp
        x = arrays[0]
        axis = params[program.axis] if program.axis else x.ndim - 1
        n_rows, n_floats = len(program.rows), len(program.rows) + len(program.cols) + len(program.scalars)
        dt = np.result_type(*(a.dtype for a in arrays[:n_floats - len(program.scalars)]))
        if x.ndim == 0 or dt not in FUSED_DTYPES:
            dt = _F32
        last = axis == x.ndim - 1
        moved = [cp.ascontiguousarray(a.astype(dt, copy=False) if last else cp.moveaxis(a.astype(dt), axis, -1))
                 for a in arrays[:n_rows]]
        cols = [cp.ascontiguousarray(c.astype(dt, copy=False)) for c in arrays[n_rows:n_floats]]  # and per-row
        index = [cp.ascontiguousarray(i.astype(np.int64, copy=False)) for i in arrays[n_floats:]]
        y = cp.empty(moved[0].shape[:-1] if program.reduces else moved[0].shape, dtype=dt)
        if moved[0].size:
            n = moved[0].shape[-1]
            rows = moved[0].size // n
            grid, block = launch_config(rows, n)
            acc = np.float64 if dt == _F64 else np.float32
            self._row_kernel(program, dt)(
                (grid,), (block,),
                (*moved, *cols, *index, y, np.int64(rows), np.int64(n),
                 *(acc(params[p]) for p in program.param_names)))
        return y if last or program.reduces else cp.moveaxis(y, -1, axis)

    # -- the fused attention (ops/attention.py) ------------------------------------
    def offers(self, op: Any, args: tuple, params: dict) -> bool:
        """The optional ops this backend runs, by op object: the fused attention for short
        sequences (attention_declines)."""
        offer = self._offered.get(op)
        return offer is not None and offer(*args, **params)

    def _offer_attention(self, q: Any, k_t: Any, v: Any, *mask: Any, scale: Any, dropout_p: Any) -> bool:
        return attention_declines(q, k_t, v, mask[0] if mask else None, scale, dropout_p) is None

    def _attention_kernel(self, kernel: Any, dtype: np.dtype) -> Any:
        key = ("attention", kernel.kernel_name(dtype))
        raw = self._kernels.get(key)
        if raw is None:
            raw = self._kernels[key] = self.cp.RawKernel(attention_kernel_source(kernel, dtype),
                                                         kernel.kernel_name(dtype))
        return raw

    def _attention_args(self, q: Any, k_t: Any, v: Any, mask: Any) -> tuple:
        """Contiguous q, k_t, v, the mask broadcast to the scores (or none), and sizes."""
        cp = self.cp
        dt = np.dtype(q.dtype)
        t, d, s, dv = q.shape[-2], q.shape[-1], k_t.shape[-1], v.shape[-1]
        batch = tuple(q.shape[:-2])
        arrays = [cp.ascontiguousarray(a) for a in (q, k_t, v)]
        if mask is not None:
            m = mask if mask.dtype == np.dtype(bool) else mask.astype(dt, copy=False)
            arrays.append(cp.ascontiguousarray(cp.broadcast_to(m, batch + (t, s))))
        kind = "none" if mask is None else "bool" if mask.dtype == np.dtype(bool) else "add"
        return arrays, kind, batch, (t, d, s, dv)

    @staticmethod
    def _attention_block(s: int, d: int, dv: int) -> int:
        threads = 32
        while threads < max(s, d, dv) and threads < FUSED_BLOCK:
            threads *= 2
        return threads

    def run_attention(self, q: Any, k_t: Any, v: Any, mask: Any, scale: float, dropout_p: float) -> Any:
        """[weights | out] of the fused attention: one block per query row."""
        if attention_declines(q, k_t, v, mask, scale, dropout_p) is not None:
            return None
        cp = self.cp
        dt = np.dtype(q.dtype)
        arrays, kind, batch, (t, d, s, dv) = self._attention_args(q, k_t, v, mask)
        rows = math.prod(batch) * t
        y = cp.empty(batch + (t, s + dv), dtype=dt)
        acc = dt.type
        kernel = ATTENTION_KERNELS[("fwd", kind, bool(dropout_p), False)]
        extra: tuple = ()
        if dropout_p:
            # the draw of the composite's dropout: counters for the weights' shape, row-major
            n = rows * s
            recording = cuda_graphs.recording_rng()
            if recording is not None:
                state, offset = recording.claim(n)
            else:
                state = cp.asarray(np.array([self.claim_counters(n), *self.rng_key], dtype=np.uint64))
                offset = np.uint64(0)
            p = 1.0 - float(dropout_p)
            extra = (state, np.uint64(offset), np.uint32(BERNOULLI.threshold(p)), acc(1.0 / p))
        self._attention_kernel(kernel, dt)(
            (max(1, min(rows, 65536)),), (self._attention_block(s, d, dv),),
            (*arrays, y, np.int64(rows), np.int64(t), np.int64(s), np.int64(d), np.int64(dv), acc(scale), *extra),
            shared_mem=kernel.shared_bytes(dt, s, d, dv))
        self.fused_runs += 1
        return y

    def run_attention_backward(self, g: Any, y: Any, q: Any, k_t: Any, v: Any, mask: Any, scale: float,
                               dropout_p: float, with_scores: bool) -> Any:
        """[dQ | dK^T | dV | dScores] of the fused attention: one block per batch element."""
        if attention_declines(q, k_t, v, mask, scale, dropout_p) is not None:
            return None
        cp = self.cp
        dt = np.dtype(q.dtype)
        arrays, kind, batch, (t, d, s, dv) = self._attention_args(q, k_t, v, mask)
        n = math.prod(batch)
        width = t * d + d * s + s * dv + (t * s if with_scores else 0)
        dx = cp.empty(batch + (width,), dtype=dt)
        acc = dt.type
        kernel = ATTENTION_KERNELS[("bwd", kind, False, bool(with_scores))]
        keep = acc(1.0 / (1.0 - float(dropout_p))) if dropout_p else acc(1.0)
        self._attention_kernel(kernel, dt)(
            (max(1, min(n, 65536)),), (self._attention_block(s, d, dv),),
            (cp.ascontiguousarray(g.astype(dt, copy=False)), cp.ascontiguousarray(y), *arrays, dx,
             np.int64(n), np.int64(t), np.int64(s), np.int64(d), np.int64(dv), acc(scale), keep,
             np.int32(1 if dropout_p else 0)),
            shared_mem=kernel.shared_bytes(dt, s, d, dv))
        self.fused_runs += 1
        return dx

    def _row_kernel(self, program: Any, dtype: np.dtype) -> Any:
        """The RawKernel of `program` in `dtype`, compiled once (cached on the program)."""
        key = ("cuda", self.name, dtype)
        raw = program._impls.get(key)
        if raw is None:
            raw = program._impls[key] = self.cp.RawKernel(
                row_kernel_source(program, dtype), rowprint.CudaRowKernel(program).kernel_name(dtype))
        return raw


def create_backend(device: str = "cuda") -> CupyBackend:
    """Start CuPy on `device` ("cuda" = the current GPU, "cuda:N" = GPU N).

    Raises BackendUnavailable, saying what is missing and how to install it, when
    CuPy cannot be imported or no usable GPU is present.
    """
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


__all__ = ["CupyBackend", "create_backend", "ATTENTION_KERNELS", "attention_kernel_source",
           "attention_declines", "FUSED_PRELUDE", "FUSED_HELPERS", "FUSED_DTYPES",
           "FUSED_BLOCK", "row_kernel_source", "launch_config", "INSTALL_HINT"]
