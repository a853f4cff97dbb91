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
from dataclasses import dataclass
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
    """A C function `name(outer, inner, in0, n0, in1, n1, ..., out)` computing `expr` per
    element of an (outer, inner) view of the output. `inner` is the largest broadcast
    block (a bias's length), so a suffix input of that size is read at `j`: the inner
    loop has no modulo and vectorises."""
    ct = storage_ctype(dtype, "c")
    args = ["long long outer", "long long inner"]
    for k in range(len(modes)):
        args += [f"const {ct}* restrict p{k}", f"long long n{k}"]
    args.append(f"{ct}* restrict out")
    loads = " ".join(_loads(modes, ct))
    body = c_expression(expr, {s: f"in{k}" for k, s in enumerate(symbols)}, dtype)
    return (f"void {name}({', '.join(args)}) {{\n"
            f"  for (long long o = 0; o < outer; ++o) {{\n"
            f"    const long long base = o * inner;\n"
            f"    for (long long j = 0; j < inner; ++j) {{\n"
            f"      const long long i = base + j, c = j; {loads}\n      out[i] = {body};\n    }}\n  }}\n}}\n")


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
    """Per input: "same" reads element i, "scalar" element 0, "row" (a suffix block as
    long as the inner loop) element c (the inner index), "suffix" element i % n."""
    index = {"same": "i", "scalar": "0", "row": "c"}
    return [f"const {ct} in{k} = p{k}[{index.get(m, f'i % n{k}')}];" for k, m in enumerate(modes)]


def _rows(modes: list[str | None], sizes: list[int], total: int) -> tuple[int, list]:
    """(inner, modes): the inner extent is the largest suffix block, whose inputs are
    then read by the inner index; without suffix inputs, one row of everything."""
    blocks = [n for m, n in zip(modes, sizes) if m == "suffix"]
    inner = max(blocks) if blocks else total
    return inner, ["row" if m == "suffix" and n == inner else m for m, n in zip(modes, sizes)]


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
            f"      for (int l = 0; l < 8; ++l) {{ const long long c = j + l, i = o * inner + c; {loads} acc[l] += {body}; }}",
            "    }",
            f"    {ct} tail = 0;",
            f"    for (; j < inner; ++j) {{ const long long c = j, i = o * inner + c; {loads} tail += {body}; }}",
            "    out[o] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;",
            "  }"]
    else:
        loop = [
            "  for (long long j = 0; j < inner; ++j) out[j] = 0;",
            "  for (long long o = 0; o < outer; ++o) {",
            f"    for (long long j = 0; j < inner; ++j) {{ const long long c = j, i = o * inner + c; {loads} out[j] += {body}; }}",
            "  }"]
    return f"void {name}({', '.join(args)}) {{\n" + "\n".join(loop) + "\n}\n"


@dataclass
class Planned:
    """A kernel to build: its C source, function name, and how to call it."""
    source: str
    name: str
    head: tuple                # leading integer arguments (n, or outer and inner)
    modes: list                # per input: how it is indexed (None: materialise)
    sizes: list                # per input: its element count
    full_shape: tuple          # the shape inputs broadcast to
    out_shape: tuple
    dtype: np.dtype

    def runner(self, cfn: Any) -> Callable[..., Any]:
        cfn.restype = None
        head = [ctypes.c_longlong(h) for h in self.head]
        full, size = self.full_shape, int(np.prod(self.full_shape))
        modes, sizes, shape, dtype = self.modes, self.sizes, self.out_shape, self.dtype

        def run(*arrays: Any, out: Any = None) -> Any:
            if out is None:
                out = np.empty(shape, dtype)
            elif not out.flags.c_contiguous:         # e.g. a donated buffer that is a view
                out[...] = run(*arrays)
                return out
            args = list(head)
            keep = []
            for a, mode, n in zip(arrays, modes, sizes):
                if mode is None:
                    a, n = np.ascontiguousarray(np.broadcast_to(a, full)), size
                elif not a.flags.c_contiguous:
                    a = np.ascontiguousarray(a)
                keep.append(a)                       # alive until the call returns
                args += [ctypes.c_void_p(a.ctypes.data), ctypes.c_longlong(n)]
            args.append(ctypes.c_void_p(out.ctypes.data))
            cfn(*args)
            return out
        return run


def _eligible(steps: list, inputs: tuple, dtype: np.dtype, size: int) -> bool:
    return (available() and size >= MIN_ELEMENTS and all(op.name in C_FRIENDLY for op, _ in steps)
            and dtype in (np.dtype(np.float32), np.dtype(np.float64))
            and all(isinstance(v, Value) and v.dtype == dtype for v in inputs))


def _named(source: str, placeholder: str, prefix: str) -> tuple[str, str]:
    name = f"{prefix}_{hashlib.sha1(source.encode()).hexdigest()[:12]}"
    return source.replace(f"void {placeholder}(", f"void {name}("), name


def plan_group(group: Any, inputs: tuple, out: Value) -> Planned | None:
    """A fused elementwise group as a C loop, or None if not worthwhile or not printable."""
    size = int(np.prod(out.shape))
    if not _eligible(group.steps, inputs, out.dtype, size):
        return None
    modes = [_index_mode(v.shape, out.shape) for v in inputs]
    sizes = [int(np.prod(v.shape)) for v in inputs]
    inner, loop_modes = _rows(modes, sizes, size)
    try:
        expr, symbols = group.expression()
        src = kernel_source("k", expr, symbols, [m or "same" for m in loop_modes], out.dtype)
    except (CPrintError, TypeError, ValueError):
        return None
    src, name = _named(src, "k", "k")
    return Planned(src, name, (size // inner, inner), modes, sizes, out.shape, out.shape, out.dtype)


def plan_reduction(red: Any, inputs: tuple, out: Value) -> Planned | None:
    """A FusedReduction over a leading or trailing block of axes as a C loop, or None."""
    split = red.split()
    if split is None or not _eligible(red.group.steps, inputs, out.dtype, int(np.prod(red.in_shape))):
        return None
    modes = [_index_mode(v.shape, red.in_shape) for v in inputs]
    outer, inner, layout = split
    sizes = [int(np.prod(v.shape)) for v in inputs]
    loop_modes = ["row" if m == "suffix" and n == inner else m or "same" for m, n in zip(modes, sizes)]
    try:
        expr, symbols = red.group.expression()
        src = reduction_source("r", expr, symbols, loop_modes, out.dtype, layout)
    except (CPrintError, TypeError, ValueError):
        return None
    src, name = _named(src, "r", "r")
    return Planned(src, name, (outer, inner), modes, sizes, red.in_shape, out.shape, out.dtype)


def build(planned: list[Planned]) -> list[Callable[..., Any]] | None:
    """Compile every planned kernel of a program in one translation unit (one compiler
    run), and return their runners; None if the compiler fails."""
    if not planned:
        return []
    unique = {p.name: p.source for p in planned}
    try:
        lib = _build("\n".join(unique.values()))
    except (RuntimeError, OSError):
        return None
    return [p.runner(getattr(lib, p.name)) for p in planned]
