"""Generated CUDA / C source, checked on machines without a GPU.

- Every elementwise op of the registry (forward and derivatives) and every row
  program's printed kernel is compiled with `nvcc -arch=sm_90` (skipped, with the reason, when nvcc
  is absent); float16/float32 code must contain no double-precision instruction.
- The printer's properties: f-suffixed float32 literals, no M_PI / 1.0/2.0,
  expanded small powers, legal infinities.
- Semantics without a GPU: the very kernel bodies the CuPy backend runs are
  compiled with the system C compiler and compared with the NumPy backend, and
  the printed row kernels run on a CPU emulation of CUDA's thread model (one
  pthread per CUDA thread, __syncthreads as a barrier) and are compared with
  their row programs run step by step on NumPy.
"""
from __future__ import annotations

import ctypes
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import sympy

import ops
from backends import cprint, get_backend
from backends import cupy_backend as cb
from backends.rowprint import CudaRowKernel
from backends.numpy_backend import NumpyBackend
from ops.numpy_impls import erf as _erf
from ops.elementwise import OUT, X, Y, ElementwiseOp, _draw
from ops.rows import RowOp, evaluate

NVCC = shutil.which("nvcc")
CC = shutil.which("gcc") or shutil.which("cc")
CXX = shutil.which("g++") or shutil.which("c++")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: install the CUDA toolkit "
                                "to compile the generated CUDA sources")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler (gcc/cc) on PATH")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++/c++) on PATH")

ELEMENTWISE = sorted(n for n, op in ops.REGISTRY.items() if isinstance(op, ElementwiseOp))
FLOATS = ["float16", "float32", "float64"]
# Every row program's printed CUDA kernel, by op name.
ROW_KERNELS = {n: CudaRowKernel(op.rows) for n, op in sorted(ops.REGISTRY.items()) if isinstance(op, RowOp)}
# Integer/bool code exists for every op that does not promise a float result, except
# pow (C has no integer power: the backend uses cupy.power there).
INTEGER_PRINTABLE = [n for n in ELEMENTWISE if not ops.REGISTRY[n].float_result and n != "pow"]

# An expression with every non-finite constant, compiled and evaluated with the rest.
SPECIALS = sympy.Piecewise((sympy.oo, X > 1), (-sympy.oo, X < -1), (sympy.nan, True))


# Reciprocals of sums, products and powers: a bare 1/(x + y) once printed as 1.0/x + y.
RECIPROCALS = {"recip_sum": 1 / (X + Y), "recip_sigmoid": 1 / (1 + sympy.exp(-X)),
               "recip_square_sum": (X + Y) ** -2, "recip_product_sum": 1 / (X * Y + 1),
               "ratio_sum": X / (Y + 1), "recip_cube": X ** -3}


def _kernels(dtype: str) -> list[tuple[str, str, str, str]]:
    """(name, in_params, out_params, body) for every op of the registry in `dtype`:
    forward for all that print, derivatives for the float dtypes."""
    out = []
    for name in ELEMENTWISE:
        op = ops.REGISTRY[name]
        if dtype in FLOATS or name in INTEGER_PRINTABLE:
            out.append((cprint.kernel_name(name, dtype), *cprint.elementwise_kernel_source(op, dtype)))
        if dtype in FLOATS and op.differentiable:
            for i in range(op.nin):
                out.append((cprint.kernel_name(name, dtype, f"_d{i}"),
                            *cprint.derivative_kernel_source(op, i, dtype)))
    if dtype in FLOATS:
        out.append((cprint.kernel_name("specials", dtype),
                    *cprint.expression_kernel_source(SPECIALS, (X,), dtype)))
        for name, expr in RECIPROCALS.items():
            out.append((cprint.kernel_name(name, dtype), *cprint.expression_kernel_source(expr, (X, Y), dtype)))
    return out


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


# -- which ops print for which dtypes ---------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS + ["int64", "bool"])
def test_every_op_prints_where_it_should(dtype):
    kernels = _kernels(dtype)                  # raises CPrintError if a float op cannot print
    names = {k[0] for k in kernels}
    for name in ELEMENTWISE:
        assert (cprint.kernel_name(name, dtype) in names) == (dtype in FLOATS or name in INTEGER_PRINTABLE)
    if dtype not in FLOATS:
        for name in sorted(set(ELEMENTWISE) - set(INTEGER_PRINTABLE)):
            with pytest.raises(cprint.CPrintError):
                cprint.elementwise_kernel_source(ops.REGISTRY[name], dtype)


# -- nvcc ----------------------------------------------------------------------------------------

def _nvcc(tmp_path, stem: str, source: str, no_double: bool) -> None:
    cu = tmp_path / f"{stem}.cu"
    cu.write_text(source)
    cmd = [NVCC, "-arch=sm_90", "-c", str(cu), "-o", str(tmp_path / f"{stem}.o")]
    if no_double:
        cmd += ["-Xptxas", "--warn-on-double-precision-use"]
    res = _run(cmd)
    log = res.stdout + res.stderr
    assert res.returncode == 0, f"nvcc failed on {cu}:\n{log[:4000]}"
    if no_double:
        assert "double precision" not in log, f"double-precision code in {stem}:\n{log[:4000]}"


@needs_nvcc
@pytest.mark.parametrize("dtype", FLOATS + ["int64", "bool"])
def test_nvcc_compiles_every_elementwise_kernel(dtype, tmp_path):
    """One translation unit per dtype holding every op's forward and derivative kernels."""
    _nvcc(tmp_path, f"elementwise_{dtype}", cprint.cuda_translation_unit(_kernels(dtype)),
          no_double=dtype in ("float16", "float32"))


@needs_nvcc
@pytest.mark.parametrize("name", ["gelu", "softplus"])
def test_nvcc_compiles_single_op_translation_unit(name, tmp_path):
    _nvcc(tmp_path, name, cprint.elementwise_cuda_source(ops.REGISTRY[name], "float32"),
          no_double=True)


@needs_nvcc
def test_nvcc_compiles_every_row_kernel(tmp_path):
    """Each printed row kernel's source exactly as the backend compiles it (include
    guards let them share one file); float16/float32 ones without doubles."""
    low = [cb.row_kernel_source(k.program, dt) for k in ROW_KERNELS.values() for dt in ("float16", "float32")]
    high = [cb.row_kernel_source(k.program, "float64") for k in ROW_KERNELS.values()]
    _nvcc(tmp_path, "rows_low", "\n".join(low), no_double=True)
    _nvcc(tmp_path, "rows_f64", "\n".join(high), no_double=False)


@needs_nvcc
def test_nvcc_check_catches_broken_source(tmp_path):
    """The compile check can fail: a bad body and double math in float code are caught."""
    bad = cprint.cuda_translation_unit([("k", "float32 in0", "float32 out0", "out0 = in0 +;")])
    with pytest.raises(AssertionError, match="nvcc failed"):
        _nvcc(tmp_path, "bad", bad, no_double=False)
    double = cprint.cuda_translation_unit([("k", "float32 in0", "float32 out0",
                                            "out0 = in0 * sin((double)in0);")])
    with pytest.raises(AssertionError, match="double-precision"):
        _nvcc(tmp_path, "double", double, no_double=True)


# -- printer properties ---------------------------------------------------------------------------

_FLOAT_LITERAL = re.compile(r"(?<![\w.])(\d+\.\d*(?:e[-+]?\d+)?|\d+e[-+]?\d+)(f?)(?![\w.])")
_BARE_INT = re.compile(r"(?<![\w.])\d+(?![\w.])")


def test_float32_code_is_single_precision():
    bodies = [k[3] for k in _kernels("float32") + _kernels("float16")]
    literals = [m for b in bodies for m in _FLOAT_LITERAL.findall(b)]
    assert literals and all(suffix == "f" for _, suffix in literals), literals
    for b in bodies:
        assert not _BARE_INT.findall(b.replace("(float)", "")), b
        assert "M_" not in b and "1.0/2.0" not in b and "1.0f/2.0f" not in b, b
        assert not re.search(r"\b(exp|log|tanh|erf|sqrt|fabs|pow|fmax|fmin)\(", b), b
    f64 = " ".join(k[3] for k in _kernels("float64"))
    assert not re.search(r"\b(expf|logf|tanhf|erff|sqrtf|fabsf|powf)\(", f64)
    assert not [m for m in _FLOAT_LITERAL.findall(f64) if m[1]]


def test_constants_are_folded_and_rounded_per_dtype():
    x = {X: "x"}
    lit32 = cprint.c_expression(sympy.pi * X, x, "float32").split("*")[0]
    lit64 = cprint.c_expression(sympy.pi * X, x, "float64").split("*")[0]
    assert lit32.endswith("f") and np.float32(lit32[:-1]) == np.float32(math.pi)
    assert float(lit64) == math.pi
    gelu = cprint.elementwise_kernel_source(ops.REGISTRY["gelu_tanh"], "float32")[2]
    assert "sqrt" not in gelu and "pi" not in gelu.lower().replace("in0", "")
    assert cprint.c_expression(X / 2, x, "float32") == "0.5f*x"


def test_powers_are_expanded():
    x = {X: "x"}
    assert cprint.c_expression(X ** 3, x, "float32") == "(x*x*x)"
    assert cprint.c_expression(X ** 2, x, "float64") == "(x*x)"
    assert cprint.c_expression(X ** -2, x, "float32") == "(1.0f/(x*x))"
    assert cprint.c_expression(sympy.sqrt(X), x, "float32") == "sqrtf(x)"
    assert cprint.c_expression(1 / sympy.sqrt(X), x, "float32") == "(1.0f/sqrtf(x))"
    assert cprint.c_expression((X + 1) ** 2, x, "float64") == "((x + 1.0)*(x + 1.0))"
    assert "in0*in0*in0" in cprint.elementwise_kernel_source(ops.REGISTRY["gelu_tanh"], "float32")[2]
    assert "pow" not in cprint.derivative_kernel_source(ops.REGISTRY["rsqrt"], 0, "float32")[2]


def test_non_finite_constants_are_legal_c():
    x = {X: "x"}
    for dt in ("float32", "float64"):
        assert cprint.c_expression(sympy.oo, x, dt) == "INFINITY"
        assert cprint.c_expression(-sympy.oo, x, dt) == "(-INFINITY)"
        assert cprint.c_expression(sympy.nan, x, dt) == "NAN"
        assert cprint.c_expression(X + sympy.oo, x, dt) == "INFINITY"
        assert cprint.c_expression(sympy.Float(1e300) * X, x, "float32").startswith("INFINITY*")
    assert "#define INFINITY" in cprint.CUDA_PREAMBLE and "#define NAN" in cprint.CUDA_PREAMBLE


def test_kinks_and_logic_print_as_ternaries():
    x = {X: "x", Y: "y"}
    h = cprint.c_expression(sympy.Heaviside(X, 0), x, "float32")
    assert "?" in h and "Heaviside" not in h
    assert cprint.c_expression(sympy.Max(X, 0), x, "int64") == "((x > 0) ? x : 0)"
    assert "fmax" not in cprint.c_expression(sympy.Max(X, Y), x, "float32")
    assert cprint.c_expression(sympy.And(X > 0, sympy.Not(Y < 1)), x, "float64") == \
        "((y >= 1.0) && (x > 0.0))"
    assert cprint.c_expression(X + 1, x, "int64") == "x + 1"


def test_unprintable_expressions_raise():
    with pytest.raises(cprint.CPrintError, match="exp"):
        cprint.c_expression(sympy.exp(X), {X: "x"}, "int64")
    with pytest.raises(cprint.CPrintError, match="no C name"):
        cprint.c_expression(X + Y, {X: "x"}, "float32")
    with pytest.raises(cprint.CPrintError, match="complex"):
        cprint.c_expression(sympy.I * X, {X: "x"}, "float32")
    with pytest.raises(cprint.CPrintError, match="dtype"):
        cprint.c_expression(X, {X: "x"}, "complex64")


# -- semantics on the CPU: generated C vs the NumPy backend ------------------------------------------

@pytest.fixture(scope="module")
def clib(tmp_path_factory):
    """Every kernel of every dtype, compiled with the system C compiler, by dtype."""
    if CC is None:
        pytest.skip("no C compiler (gcc/cc) on PATH")
    d = tmp_path_factory.mktemp("cprint")
    libs = {}
    for dtype in FLOATS + ["int64", "bool"]:
        src = d / f"{dtype}.c"
        src.write_text(cprint.c_translation_unit(_kernels(dtype)))
        so = d / f"{dtype}.so"
        res = _run([CC, "-O1", "-std=c99", "-shared", "-fPIC", str(src), "-o", str(so), "-lm"])
        if res.returncode != 0 and dtype == "float16" and "_Float16" in res.stderr:
            continue                         # this C compiler has no _Float16
        assert res.returncode == 0, f"{CC} failed on {src}:\n{res.stderr[:4000]}"
        libs[dtype] = ctypes.CDLL(str(so))
    return libs


def _call(lib: ctypes.CDLL, name: str, inputs: list[np.ndarray], out_dtype: np.dtype) -> np.ndarray:
    n = inputs[0].size
    ins = [np.ascontiguousarray(a) for a in inputs]
    out = np.empty(n, out_dtype)
    fn = getattr(lib, name)
    fn.restype = None
    fn(ctypes.c_longlong(n), *[a.ctypes.data_as(ctypes.c_void_p) for a in ins],
       out.ctypes.data_as(ctypes.c_void_p))
    return out


_SPECIAL_VALUES = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e30, -1e30, 3.0, -3.0])


def _inputs(op: ElementwiseOp, dtype: str, rng: np.random.Generator) -> list[np.ndarray]:
    """64 inputs per operand in `dtype`; float ones end with NaN, +-inf, +-0 and huge values."""
    if dtype == "int64":
        return [rng.integers(-5, 6, 64).astype(np.int64) for _ in range(op.nin)]
    if dtype == "bool" or op.domain == "bool":
        return [(rng.random(64) < 0.5).astype(dtype) for _ in range(op.nin)]
    xs = [_draw(op.domain, rng, (48,), i) for i in range(op.nin)]
    values = _SPECIAL_VALUES
    if op.domain == "positive":              # -0 and -inf lie outside: 1/sqrt(-0) is not pow(-0, -0.5)
        values = values[~(np.signbit(values) & ~np.isnan(values))]
    specials = [rng.permutation(np.tile(values, 3))[:16] for _ in range(op.nin)]
    if op.domain == "separated":             # ties and NaN pairs on purpose
        specials[-1][:4] = specials[0][:4]
    with np.errstate(over="ignore"):         # 1e30 is inf in float16
        return [np.concatenate([a, s]).astype(dtype) for a, s in zip(xs, specials)]


def _tolerance(dtype: str) -> dict:
    return {"float16": dict(rtol=2e-3, atol=1e-4), "float32": dict(rtol=1e-5, atol=1e-6),
            "float64": dict(rtol=1e-12, atol=1e-14)}.get(dtype, dict(rtol=0, atol=0))


@needs_cc
@pytest.mark.parametrize("name,dtype", [(n, d) for n in ELEMENTWISE for d in FLOATS + ["int64", "bool"]
                                        if d in FLOATS or n in INTEGER_PRINTABLE])
def test_generated_forward_matches_numpy_backend(clib, name, dtype, rng):
    """The kernel body the CuPy backend runs, compiled for the CPU, computes what
    the NumPy backend computes (special values included: NaN, +-inf, +-0)."""
    op = ops.REGISTRY[name]
    if dtype not in clib:
        pytest.skip(f"the C compiler has no {dtype} support")
    xs = _inputs(op, dtype, rng)
    ref_in = [x.astype(np.float32) for x in xs] if dtype == "float16" else xs
    try:
        with np.errstate(all="ignore"):
            want = np.asarray(NumpyBackend().elementwise_fn(op)(*ref_in))
    except TypeError as e:
        pytest.skip(f"NumPy itself rejects {name} on {dtype}: {e}")
    out_dtype = np.dtype(bool) if op.result == "bool" else np.dtype(dtype)
    got = _call(clib[dtype], cprint.kernel_name(name, dtype), xs, out_dtype)
    with np.errstate(all="ignore"):
        want = want.astype(out_dtype)
    if out_dtype.kind == "f":
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), equal_nan=True,
                                   err_msg=f"{name} {dtype} inputs {xs}", **_tolerance(dtype))
    else:
        np.testing.assert_array_equal(got, want, err_msg=f"{name} {dtype} inputs {xs}")


def _numpy_grad(op: ElementwiseOp, i: int):
    return sympy.lambdify(tuple(op.symbols) + (OUT,), op.grads[i], modules=[{"erf": _erf}, "numpy"])


@needs_cc
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", sorted(n for n in ELEMENTWISE if ops.REGISTRY[n].differentiable))
def test_generated_derivatives_match_sympy(clib, name, dtype, rng):
    """Derivative kernels (stable forms written with `out`) against the same sympy
    expressions evaluated by NumPy in float64 on the same rounded inputs."""
    op = ops.REGISTRY[name]
    if dtype not in clib:
        pytest.skip(f"the C compiler has no {dtype} support")
    xs = [_draw(op.domain, rng, (64,), k).astype(dtype) for k in range(op.nin)]
    with np.errstate(all="ignore"):
        out = np.asarray(NumpyBackend().elementwise_fn(op)(*[x.astype(np.float64) for x in xs]))
    out = np.broadcast_to(out, xs[0].shape).astype(dtype)
    for i in range(op.nin):
        with np.errstate(all="ignore"):
            want = np.broadcast_to(_numpy_grad(op, i)(*[a.astype(np.float64) for a in xs + [out]]),
                                   xs[0].shape)
        got = _call(clib[dtype], cprint.kernel_name(name, dtype, f"_d{i}"), xs + [out], np.dtype(dtype))
        tol = dict(_tolerance(dtype))
        tol["atol"] = max(tol["atol"], 10 * float(np.finfo(dtype).eps))   # 1 - out**2 cancels
        np.testing.assert_allclose(got.astype(np.float64), want, err_msg=f"d{name}/d{i} {dtype}", **tol)


@needs_cc
@pytest.mark.parametrize("dtype", FLOATS)
def test_non_finite_constants_evaluate(clib, dtype):
    if dtype not in clib:
        pytest.skip(f"the C compiler has no {dtype} support")
    got = _call(clib[dtype], cprint.kernel_name("specials", dtype),
                [np.array([2.0, -2.0, 0.0], dtype)], np.dtype(dtype))
    assert got[0] == np.inf and got[1] == -np.inf and np.isnan(got[2])


# -- fused kernels on a CPU emulation of CUDA's thread model ---------------------------------------

EMU_PRELUDE = r"""
#include <math.h>
#include <string.h>
#include <pthread.h>
struct engine_dim3 { unsigned x, y, z; };
static thread_local engine_dim3 threadIdx;
static engine_dim3 blockIdx, blockDim, gridDim;
static pthread_barrier_t engine_barrier;
// Dynamic shared memory: all ones bits (NaN in float and double) before every block, so
// a kernel reading shared memory it did not write shows it.
static unsigned char engine_dynamic_smem[1 << 16] __attribute__((aligned(16)));
#define ENGINE_DYNAMIC_SHARED(name) unsigned char* name = engine_dynamic_smem
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads() pthread_barrier_wait(&engine_barrier)
typedef _Float16 engine_half_t;
static inline float engine_h2f(engine_half_t h) { return (float)h; }
static inline engine_half_t engine_f2h(float f) { return (engine_half_t)f; }
static inline float engine_neg_inf_float() { return -INFINITY; }
static inline double engine_neg_inf_double() { return -(double)INFINITY; }

struct engine_thread_args { void (*body)(void*); void* args; unsigned tid; };
static void* engine_thread(void* p) {
  engine_thread_args* t = (engine_thread_args*)p;
  threadIdx.x = t->tid; threadIdx.y = 0; threadIdx.z = 0;
  t->body(t->args);
  return 0;
}
// Run every block in turn; a block's threads run concurrently, one pthread each.
static void engine_emulate(unsigned grid, unsigned block, void (*body)(void*), void* args) {
  gridDim.x = grid; gridDim.y = gridDim.z = 1;
  blockDim.x = block; blockDim.y = blockDim.z = 1;
  pthread_barrier_init(&engine_barrier, 0, block);
  pthread_t threads[1024];
  engine_thread_args targs[1024];
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx.x = b; blockIdx.y = blockIdx.z = 0;
    memset(engine_dynamic_smem, 0xff, sizeof engine_dynamic_smem);
    for (unsigned t = 0; t < block; ++t) {
      targs[t].body = body; targs[t].args = args; targs[t].tid = t;
      pthread_create(&threads[t], 0, engine_thread, &targs[t]);
    }
    for (unsigned t = 0; t < block; ++t) pthread_join(threads[t], 0);
  }
  pthread_barrier_destroy(&engine_barrier);
}
"""

_EMU_CTYPES = {"float16": ("engine_half_t", "float"), "float32": ("float", "float"),
               "float64": ("double", "double")}


def _emu_wrapper(kernel: CudaRowKernel, dtype: str) -> str:
    """A C entry point `emu_<kernel>(grid, block, params...)` launching the kernel."""
    t, a = _EMU_CTYPES[dtype]
    decl = {"in": f"const {t}*", "index": "const long long*", "out": f"{t}*", "i64": "long long", "acc": a,
            "i32": "int"}
    kname = kernel.kernel_name(dtype)
    fields = " ".join(f"{decl[r]} {n};" for r, n in kernel.params)
    names = ", ".join(n for _, n in kernel.params)
    params = ", ".join(f"{decl[r]} {n}" for r, n in kernel.params)
    return (f"struct args_{kname} {{ {fields} }};\n"
            f"static void body_{kname}(void* p) {{ args_{kname}* a = (args_{kname}*)p; "
            f"{kname}({', '.join('a->' + n for _, n in kernel.params)}); }}\n"
            f'extern "C" void emu_{kname}(unsigned grid, unsigned block, {params}) {{\n'
            f"  args_{kname} a = {{ {names} }};\n  engine_emulate(grid, block, body_{kname}, &a);\n}}\n")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler (g++/c++) on PATH")
    d = tmp_path_factory.mktemp("emu")
    parts = [EMU_PRELUDE, cb.FUSED_HELPERS]
    for k in ROW_KERNELS.values():
        for dt in FLOATS:
            parts += [k.source(dt), _emu_wrapper(k, dt)]
    src = d / "fused_emu.cpp"
    src.write_text("\n".join(parts))
    so = d / "fused_emu.so"
    res = _run([CXX, "-O1", "-std=c++17", "-shared", "-fPIC", "-pthread", str(src), "-o", str(so)])
    assert res.returncode == 0, f"{CXX} failed on the emulated fused kernels:\n{res.stderr[:4000]}"
    return ctypes.CDLL(str(so))


_ATTN_DECL = {"in": "const {t}*", "mask": "const {m}*", "out": "{t}*", "i64": "long long", "acc": "{t}",
              "i32": "int", "u32": "unsigned int", "u64": "unsigned long long",
              "state": "const unsigned long long*"}


def attention_emu_source(kernel, dtype: str) -> str:
    """A C++ file running one printed attention kernel on the emulation: the kernel and
    `emu_<kernel>(grid, block, params...)`."""
    t = _EMU_CTYPES[dtype][0]
    m = "bool" if kernel.mask == "bool" else t
    decl = {r: d.format(t=t, m=m) for r, d in _ATTN_DECL.items()}
    kname = kernel.kernel_name(dtype)
    fields = " ".join(f"{decl[r]} {n};" for r, n in kernel.params)
    names = ", ".join(n for _, n in kernel.params)
    params = ", ".join(f"{decl[r]} {n}" for r, n in kernel.params)
    wrapper = (f"struct args_{kname} {{ {fields} }};\n"
               f"static void body_{kname}(void* p) {{ args_{kname}* a = (args_{kname}*)p; "
               f"{kname}({', '.join('a->' + n for _, n in kernel.params)}); }}\n"
               f'extern "C" void emu_{kname}(unsigned grid, unsigned block, {params}) {{\n'
               f"  args_{kname} a = {{ {names} }};\n  engine_emulate(grid, block, body_{kname}, &a);\n}}\n")
    return "\n".join([EMU_PRELUDE, cb.FUSED_HELPERS, kernel.source(dtype), wrapper])


def launch_attention(lib, kernel, dtype: str, grid: int, block: int, args: list) -> None:
    """Run an attention kernel built from attention_emu_source on host arrays/scalars."""
    acc = ctypes.c_double if dtype == "float64" else ctypes.c_float
    ptr = lambda v: v.ctypes.data_as(ctypes.c_void_p)      # noqa: E731
    conv = {"in": ptr, "mask": ptr, "out": ptr, "state": ptr, "i64": ctypes.c_longlong, "acc": acc,
            "i32": ctypes.c_int, "u32": ctypes.c_uint, "u64": ctypes.c_ulonglong}
    fn = getattr(lib, f"emu_{kernel.kernel_name(dtype)}")
    fn.restype = None
    fn(ctypes.c_uint(grid), ctypes.c_uint(block), *[conv[role](v) for (role, _), v in zip(kernel.params, args)])


def _launch(lib, kernel: CudaRowKernel, dtype: str, grid: int, block: int, args: list) -> None:
    acc = ctypes.c_double if dtype == "float64" else ctypes.c_float
    conv = {"in": lambda v: v.ctypes.data_as(ctypes.c_void_p),
            "index": lambda v: v.ctypes.data_as(ctypes.c_void_p),
            "out": lambda v: v.ctypes.data_as(ctypes.c_void_p),
            "i64": ctypes.c_longlong, "acc": acc, "i32": ctypes.c_int}
    fn = getattr(lib, f"emu_{kernel.kernel_name(dtype)}")
    fn.restype = None
    fn(ctypes.c_uint(grid), ctypes.c_uint(block),
       *[conv[role](v) for (role, _), v in zip(kernel.params, args)])


def _rows(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    x = rng.standard_normal((rows, cols)) * 3
    x[1, :] = -np.inf                    # a fully masked row
    x[2, ::2] = -np.inf                  # a partly masked row
    x[3, 0] = 1000.0                     # exp would overflow without the max shift
    return x


# (grid, block): fewer blocks than rows and fewer threads than columns exercise
# both strides; the backend's own launch_config is the last case.
_CONFIGS = [(2, 4), (5, 32), None]


@needs_cxx
@pytest.mark.parametrize("config", _CONFIGS, ids=["stride", "wide", "backend"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", sorted(ROW_KERNELS))
def test_printed_row_kernels_match_the_program(emu, name, dtype, config, rng):
    """Every row program's printed CUDA kernel, run on the emulation, equals the same
    program run step by step on NumPy in float64 (masked, partly masked and overflowing
    rows included)."""
    kernel = ROW_KERNELS[name]
    prog = kernel.program
    masked = prog.axis or prog.indices
    x = _rows(rng, 5, 11).astype(dtype) if masked else (rng.standard_normal((6, 10)) * 5 + 3).astype(dtype)
    cols = [rng.standard_normal(x.shape[-1]).astype(dtype) for _ in prog.cols]
    per_row = [rng.standard_normal(x.shape[:-1]).astype(dtype) for _ in prog.scalars]
    indices = [np.array([-100, 3, 5, 0, 10]) for _ in prog.indices]   # row 0 ignored; row 2's 5 is finite
    if indices:
        x[0, 1:] = np.nan                             # an ignored row's values never reach its loss
    params = {str(p): {"label_smoothing": 0.1, "ignore_index": -100}.get(str(p), 1e-3) for p in prog.params}
    grid, block = config or cb.launch_config(*x.shape)
    y = np.full(x.shape[:-1] if prog.reduces else x.shape, 7, dtype)
    _launch(emu, kernel, dtype, grid, block, [x, *cols, *per_row, *indices, y, *x.shape, *params.values()])
    with np.errstate(all="ignore"):
        want = evaluate(prog, get_backend("cpu"), [a.astype(np.float64) for a in [x] + cols + per_row] + indices,
                        dict(params, **({prog.axis: 1} if prog.axis else {})))
    if name == "softmax":
        assert np.all(y[1] == 0)                        # all -inf row: zeros, no NaN
    elif name in ("log_softmax", "logsumexp"):
        assert np.all(y[1] == -np.inf)
    elif indices and prog.reduces:
        assert y[0] == 0 and y[1] == np.inf and np.isfinite(y[2:]).all()
    elif indices:                                       # a loss's gradient: 0 on the ignored row
        assert (y[0] == 0).all() and np.isfinite(y.astype(np.float64)).all()
    assert not np.isnan(y.astype(np.float64)).any()
    tol = {"float16": dict(rtol=5e-3, atol=5e-3), "float32": dict(rtol=2e-5, atol=1e-5),
           "float64": dict(rtol=1e-12, atol=1e-12)}[dtype]
    np.testing.assert_allclose(y.astype(np.float64), want, **tol)


def test_launch_config_covers_rows():
    assert cb.launch_config(10, 5) == (10, 32)
    assert cb.launch_config(3, 100) == (3, 128)
    assert cb.launch_config(10 ** 6, 4096) == (65536, cb.FUSED_BLOCK)
    with pytest.raises(TypeError, match="no kernel"):
        ROW_KERNELS["softmax"].source("int32")


@needs_cc
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(RECIPROCALS))
def test_printed_reciprocals_divide_by_the_whole_divisor(clib, name, dtype, rng):
    x, y = rng.uniform(0.5, 3.0, 64).astype(dtype), rng.uniform(0.5, 3.0, 64).astype(dtype)
    want = sympy.lambdify((X, Y), RECIPROCALS[name], "numpy")(x.astype(np.float64), y.astype(np.float64))
    got = _call(clib[dtype], cprint.kernel_name(name, dtype), [x, y], np.dtype(dtype))
    np.testing.assert_allclose(got, np.broadcast_to(want, x.shape), rtol=1e-5 if dtype == "float32" else 1e-12)


@needs_cc
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_printed_softplus_keeps_its_digits_far_below_zero(clib, dtype):
    """The body the CuPy backend runs for softplus calls log1p: log(1 + exp(-20)) was 0 in
    float32 (softplus(-20) is 2.06e-9), log(1 + exp(-40)) 0 in float64."""
    body = cprint.elementwise_kernel_source(ops.REGISTRY["softplus"], dtype)[2]
    assert ("log1pf(" if dtype == "float32" else "log1p(") in body, body
    x = np.array([-100.0, -40.0, -20.0, -17.0], dtype)
    want = np.log1p(np.exp(x.astype(np.float64)))
    got = _call(clib[dtype], cprint.kernel_name("softplus", dtype), [x], np.dtype(dtype))
    np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == "float32" else 1e-13,
                               atol=np.finfo(np.float32).smallest_subnormal if dtype == "float32" else 0)


@needs_cc
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_printed_pow_derivatives_are_finite_at_a_zero_base(clib, dtype):
    """The derivative kernels the CuPy backend runs for pow (its declared Piecewise
    gradients, printed as selects) give PyTorch's values at x = 0: 0 where the textbook
    forms are 0 * inf (d/dx at y = 0, d/dy at y >= 0), the infinities of y < 0, NaN in
    d/dy at a negative base."""
    x = np.array([0.0, 0.0, 0.0, 0.0, 0.0, -0.0, 2.0, -2.0, -2.0, 0.0], dtype)
    y = np.array([0.0, 0.5, 1.0, 2.0, 3.0, 2.0, 0.0, 0.0, 3.0, -1.0], dtype)
    with np.errstate(all="ignore"):
        out = np.power(x, y)
    d0 = np.array([0.0, np.inf, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 12.0, -np.inf])
    d1 = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, np.log(2.0), np.nan, np.nan, -np.inf])
    for i, want in enumerate((d0, d1)):
        got = _call(clib[dtype], cprint.kernel_name("pow", dtype, f"_d{i}"), [x, y, out], np.dtype(dtype))
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-6, err_msg=f"d{i} {dtype}")
