"""Fused elementwise groups as C loops, compiled with the system C compiler.

The loop body is the group's sympy expression printed by `backends.cprint` (the
same printer the CUDA kernels use), so fused kernels on the CPU and the GPU come
from one source. Each kernel is compiled once per source text (cached on disk
by its hash) and called through ctypes; without a C compiler, or when building
fails, the caller keeps its NumPy ufunc chain.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Any, Callable

import numpy as np

from backends.cprint import CPrintError, c_expression, storage_ctype

from .ir import Value

_CACHE_DIR = os.environ.get("ENGINE_KERNEL_CACHE",
                            os.path.join(tempfile.gettempdir(), f"engine-kernels-{os.getuid()}"))
_compiler = shutil.which("cc") or shutil.which("gcc")
_loaded: dict[str, Any] = {}

# Below this many elements the per-call cost of ctypes exceeds what fusion saves.
MIN_ELEMENTS = 1 << 15

# Ops the C compiler vectorises without -ffast-math (which would break inf/NaN
# semantics that masking relies on). Transcendentals (exp, tanh, ...) stay with
# NumPy's SIMD ufuncs, which beat scalar libm calls by ~10x here.
C_FRIENDLY = {"add", "sub", "mul", "div", "neg", "sqrt", "rsqrt", "abs", "maximum", "minimum",
              "relu", "heaviside", "sign"}


def available() -> bool:
    return _compiler is not None and os.environ.get("ENGINE_NO_C", "") != "1"


def _index_mode(shape: tuple, out_shape: tuple) -> str | None:
    """How input element i is found: "same" (i), "scalar" (0), "suffix" (i % n),
    or None when the broadcast needs the input materialised first."""
    if tuple(shape) == tuple(out_shape):
        return "same"
    size = int(np.prod(shape))
    if size == 1:
        return "scalar"
    stripped = tuple(shape)
    while stripped and stripped[0] == 1:
        stripped = stripped[1:]
    if stripped and tuple(out_shape[-len(stripped):]) == stripped:
        return "suffix"
    return None


def kernel_source(name: str, expr: Any, symbols: tuple, modes: list[str], dtype: np.dtype) -> str:
    """A C function `name(n, in0, n0, in1, n1, ..., out)` computing `expr` per element."""
    ct = storage_ctype(dtype, "c")
    args = ["long long n"]
    loads = []
    for k, mode in enumerate(modes):
        args += [f"const {ct}* restrict p{k}", f"long long n{k}"]
        idx = {"same": "i", "scalar": "0", "suffix": f"i % n{k}"}[mode]
        loads.append(f"const {ct} in{k} = p{k}[{idx}];")
    args.append(f"{ct}* restrict out")
    body = c_expression(expr, {s: f"in{k}" for k, s in enumerate(symbols)}, dtype)
    return (f"void {name}({', '.join(args)}) {{\n"
            f"  for (long long i = 0; i < n; ++i) {{\n"
            f"    {' '.join(loads)}\n    out[i] = {body};\n  }}\n}}\n")


def _build(source: str) -> Any:
    """Compile `source` to a shared library (cached by content) and load it."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:20]
    lib = _loaded.get(digest)
    if lib is not None:
        return lib
    os.makedirs(_CACHE_DIR, exist_ok=True)
    so = os.path.join(_CACHE_DIR, f"k{digest}.so")
    if not os.path.exists(so):
        src = os.path.join(_CACHE_DIR, f"k{digest}.{os.getpid()}.c")
        with open(src, "w") as f:
            f.write("#include <math.h>\n#include <stdbool.h>\n" + source)
        tmp = so + f".{os.getpid()}.tmp"
        flags = ["-O3", "-std=c99", "-shared", "-fPIC", "-fno-math-errno"]
        for extra in (["-march=native"], []):
            res = subprocess.run([_compiler, *flags, *extra, src, "-o", tmp, "-lm"],
                                 capture_output=True, text=True)
            if res.returncode == 0:
                break
        os.remove(src)
        if res.returncode != 0:
            raise RuntimeError(f"C compiler failed:\n{res.stderr[:2000]}")
        os.replace(tmp, so)                   # atomic: concurrent builders never see half a file
    lib = _loaded[digest] = ctypes.CDLL(so)
    return lib


def _loads(modes: list[str], ct: str) -> list[str]:
    return [f"const {ct} in{k} = p{k}[{ {'same': 'i', 'scalar': '0', 'suffix': f'i % n{k}'}[m] }];"
            for k, m in enumerate(modes)]


def reduction_source(name: str, expr: Any, symbols: tuple, modes: list[str], dtype: np.dtype,
                     layout: str) -> str:
    """A C function `name(outer, inner, in0, n0, ..., out)` summing `expr` over each row
    ("rows": out[o] = sum_j f(o*inner + j), eight partial sums so it vectorises without
    reassociating) or down each column ("cols": out[j] = sum_o f(o*inner + j))."""
    ct = storage_ctype(dtype, "c")
    args = ["long long outer", "long long inner"]
    for k in range(len(modes)):
        args += [f"const {ct}* restrict p{k}", f"long long n{k}"]
    args.append(f"{ct}* restrict out")
    body = c_expression(expr, {s: f"in{k}" for k, s in enumerate(symbols)}, dtype)
    loads = " ".join(_loads(modes, ct))
    if layout == "rows":
        loop = [
            "  for (long long o = 0; o < outer; ++o) {",
            f"    {ct} acc[8] = {{0}};",
            "    long long j = 0;",
            "    for (; j + 8 <= inner; j += 8) {",
            f"      for (int l = 0; l < 8; ++l) {{ const long long i = o * inner + j + l; {loads} acc[l] += {body}; }}",
            "    }",
            f"    {ct} tail = 0;",
            f"    for (; j < inner; ++j) {{ const long long i = o * inner + j; {loads} tail += {body}; }}",
            "    out[o] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;",
            "  }"]
    else:
        loop = [
            "  for (long long j = 0; j < inner; ++j) out[j] = 0;",
            "  for (long long o = 0; o < outer; ++o) {",
            f"    for (long long j = 0; j < inner; ++j) {{ const long long i = o * inner + j; {loads} out[j] += {body}; }}",
            "  }"]
    return f"void {name}({', '.join(args)}) {{\n" + "\n".join(loop) + "\n}\n"


def compile_reduction(red: Any, inputs: tuple, out: Value) -> tuple[Callable, str] | None:
    """(callable(*arrays, out=None), source) for a FusedReduction, or None."""
    split = red.split()
    size = int(np.prod(red.in_shape))
    if not available() or split is None or size < MIN_ELEMENTS:
        return None
    if any(op.name not in C_FRIENDLY for op, _ in red.group.steps):
        return None
    dtype = out.dtype
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)) or \
            any(not isinstance(v, Value) or v.dtype != dtype for v in inputs):
        return None
    modes = [_index_mode(v.shape, red.in_shape) for v in inputs]
    outer, inner, layout = split
    try:
        expr, symbols = red.group.expression()
        src = reduction_source("r", expr, symbols, [m or "same" for m in modes], dtype, layout)
        fn_name = f"r_{hashlib.sha1(src.encode()).hexdigest()[:12]}"
        src = src.replace("void r(", f"void {fn_name}(")
        cfn = getattr(_build(src), fn_name)
    except (CPrintError, RuntimeError, OSError, TypeError, ValueError):
        return None
    cfn.restype = None
    shape, in_shape = out.shape, red.in_shape
    sizes = [int(np.prod(v.shape)) for v in inputs]

    def run(*arrays: Any, out: Any = None) -> Any:
        if out is None:
            out = np.empty(shape, dtype)
        args = [ctypes.c_longlong(outer), ctypes.c_longlong(inner)]
        keep = []
        for a, mode, n in zip(arrays, modes, sizes):
            if mode is None:
                a = np.ascontiguousarray(np.broadcast_to(a, in_shape))
                n = size
            elif not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
            keep.append(a)
            args += [ctypes.c_void_p(a.ctypes.data), ctypes.c_longlong(n)]
        args.append(ctypes.c_void_p(out.ctypes.data))
        cfn(*args)
        return out
    return run, src


def compile_group(group: Any, inputs: tuple, out: Value) -> tuple[Callable, str] | None:
    """(callable(*arrays, out=None), source) for a fused group, or None if not worthwhile
    or not expressible in C."""
    if not available() or int(np.prod(out.shape)) < MIN_ELEMENTS:
        return None
    if any(op.name not in C_FRIENDLY for op, _ in group.steps):
        return None
    dtype = out.dtype
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        return None
    if any(not isinstance(v, Value) or v.dtype != dtype for v in inputs):
        return None
    modes = [_index_mode(v.shape, out.shape) for v in inputs]
    try:
        expr, symbols = group.expression()
        name = "fused"
        source = kernel_source(name, expr, symbols, [m or "same" for m in modes], dtype)
        source = source.replace(f"void {name}(", f"void k_{hashlib.sha1(source.encode()).hexdigest()[:12]}(")
        fn_name = source.split("(", 1)[0].split()[-1]
        lib = _build(source)
    except (CPrintError, RuntimeError, OSError, TypeError, ValueError):
        return None
    cfn = getattr(lib, fn_name)
    cfn.restype = None
    n = int(np.prod(out.shape))
    shape = out.shape
    sizes = [int(np.prod(v.shape)) for v in inputs]

    def run(*arrays: Any, out: Any = None) -> Any:
        if out is None:
            out = np.empty(shape, dtype)
        args = [ctypes.c_longlong(n)]
        keep = []
        for a, mode, size in zip(arrays, modes, sizes):
            if mode is None:
                a = np.ascontiguousarray(np.broadcast_to(a, shape))
            elif not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
            keep.append(a)
            args += [ctypes.c_void_p(a.ctypes.data), ctypes.c_longlong(size if mode else n)]
        args.append(ctypes.c_void_p(out.ctypes.data))
        cfn(*args)
        return out
    return run, source
