"""Compile C source with the system compiler and load it with ctypes.

Shared by the jit's fused kernels (engine.compiler.ckernels) and the NumPy
backend's hand-written kernels. Libraries are cached on disk by a hash of their
source, so a program compiles once per machine, in a directory only this user can
write (backends/kernel_cache.py says why and how that is checked); without a C
compiler (`available()` is False) callers keep their NumPy code paths.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import weakref
from typing import Any

import numpy as np

from . import kernel_cache

_compiler = shutil.which("cc") or shutil.which("gcc")
_loaded: dict[str, Any] = {}
_PRELUDE = "#include <math.h>\n#include <stdbool.h>\n"

# glibc's vector math library (libmvec): declared `simd`, libm's exp/log/log1p/tanh/erf
# are called on whole SIMD registers, ~10x faster than scalar calls and about as
# accurate as NumPy's own SIMD loops. (log1p, tanh and erf came in glibc 2.35, exp and
# log in 2.22: the probe calls the newer ones too, so an older libmvec means no vector
# math rather than a kernel that fails to load.)
_VECTOR_FUNCTIONS = ("exp", "log", "log1p", "tanh", "erf")
VECTOR_MATH_HEADER = "".join(
    f'__attribute__((simd("notinbranch"))) {t} {f}{sfx}({t});\n'
    for f in _VECTOR_FUNCTIONS for t, sfx in (("float", "f"), ("double", "")))
_vector_math: bool | None = None
# The first library the engine builds (see vector_math).
PROBE_SOURCE = ("void probe(long long n, const float* restrict a, float* restrict o) {\n"
                "  for (long long i = 0; i < n; ++i) o[i] = expf(a[i]) + tanhf(a[i]) + log1pf(fabsf(a[i]));\n}\n")


def available() -> bool:
    return _compiler is not None and os.environ.get("ENGINE_NO_C", "") != "1"


def vector_math() -> bool:
    """Can kernels call libmvec (probed once by building a kernel that uses it)?"""
    global _vector_math
    if _vector_math is None:
        _vector_math = False
        if available() and os.environ.get("ENGINE_NO_VECTOR_MATH", "") != "1":
            try:
                lib = build(PROBE_SOURCE, vector=True)
                x = np.array([0.0, 1.0, -np.inf, np.inf, np.nan] * 4, dtype=np.float32)
                out = np.empty_like(x)
                lib.probe(ctypes.c_longlong(x.size), ctypes.c_void_p(x.ctypes.data),
                          ctypes.c_void_p(out.ctypes.data))
                want = np.exp(x) + np.tanh(x) + np.log1p(np.abs(x))
                _vector_math = bool(np.allclose(out, want, rtol=1e-6, equal_nan=True))
            except (RuntimeError, OSError, AttributeError):
                pass
    return _vector_math


def _target() -> str:
    """What a library built with -march=native depends on besides its source: the
    compiler and the CPU's instruction sets. A cache in a home directory shared by
    several machines must not hand one machine's AVX-512 build to another."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return f"{_compiler}|{platform.machine()}|{platform.processor()}|{flags}"


_TARGET = _target()


def library_name(source: str, vector: bool = False) -> str:
    """The cache file name of the library `build(source, vector)` makes: a hash of
    its whole source and of the machine it is built for."""
    if vector:
        source = VECTOR_MATH_HEADER + source
    return f"k{hashlib.sha1((_TARGET + source).encode()).hexdigest()[:20]}.so"


def build(source: str, vector: bool = False, global_symbols: bool = False) -> Any:
    """Compile `source` to a shared library (cached by content) and load it; `vector`
    declares libm's functions SIMD and links libmvec; `global_symbols` lets libraries
    loaded later call its functions (the thread pool, backends.cparallel)."""
    name = library_name(source, vector)
    lib = _loaded.get(name)
    if lib is None:
        text = _PRELUDE + (VECTOR_MATH_HEADER if vector else "") + source
        path = kernel_cache.library(name, lambda out: _compile(text, vector, out))
        lib = _loaded[name] = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL if global_symbols else ctypes.DEFAULT_MODE)
    return lib


def _compile(text: str, vector: bool, out: str) -> None:
    """Compile C `text` into the shared library `out` (a path in a private scratch
    directory). The compiler runs from an argument list, never through a shell."""
    src = out[:-len(".so")] + ".c"
    with open(src, "w") as f:
        f.write(text)
    flags = ["-O3", "-std=c99", "-D_POSIX_C_SOURCE=200809L", "-shared", "-fPIC", "-fno-math-errno",
             "-pthread"]
    libs = ["-lmvec", "-lm"] if vector else ["-lm"]
    for extra in (["-march=native"], []):
        res = subprocess.run([_compiler, *flags, *extra, src, "-o", out, *libs],
                             capture_output=True, text=True)
        if res.returncode == 0:
            return
    raise RuntimeError(f"C compiler failed:\n{res.stderr[:2000]}")


_addresses: dict[int, tuple] = {}


def address(a: np.ndarray) -> int:
    """The data pointer of a NumPy array, for a ctypes call.

    `a.ctypes.data` costs ~0.8 us, more than a small kernel; the arrays a compiled
    program passes are mostly the same objects every call (planned buffers, state
    written in place), so pointers are remembered per live array (a weak reference
    tells a dead array's reused id apart)."""
    hit = _addresses.get(id(a))
    if hit is not None and hit[0]() is a:
        return hit[1]
    if len(_addresses) > 4096:
        for key in [k for k, (ref, _) in _addresses.items() if ref() is None]:
            del _addresses[key]
    pointer = a.ctypes.data
    _addresses[id(a)] = (weakref.ref(a), pointer)
    return pointer
