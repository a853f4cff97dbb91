"""Compile C source with the system compiler and load it with ctypes.

Shared by the jit's fused kernels (engine.compiler.ckernels) and the NumPy
backend's hand-written kernels. Libraries are cached on disk by a hash of their
source, so a program compiles once per machine; without a C compiler
(`available()` is False) callers keep their NumPy code paths.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import weakref
from typing import Any

import numpy as np

_CACHE_DIR = os.environ.get("ENGINE_KERNEL_CACHE",
                            os.path.join(tempfile.gettempdir(), f"engine-kernels-{os.getuid()}"))
_compiler = shutil.which("cc") or shutil.which("gcc")
_loaded: dict[str, Any] = {}

# glibc's vector math library (libmvec): declared `simd`, libm's exp/log/tanh/erf
# are called on whole SIMD registers, ~10x faster than scalar calls and about as
# accurate as NumPy's own SIMD loops.
_VECTOR_FUNCTIONS = ("exp", "log", "tanh", "erf")
VECTOR_MATH_HEADER = "".join(
    f'__attribute__((simd("notinbranch"))) {t} {f}{sfx}({t});\n'
    for f in _VECTOR_FUNCTIONS for t, sfx in (("float", "f"), ("double", "")))
_vector_math: bool | None = None


def available() -> bool:
    return _compiler is not None and os.environ.get("ENGINE_NO_C", "") != "1"


def vector_math() -> bool:
    """Can kernels call libmvec (probed once by building a kernel that uses it)?"""
    global _vector_math
    if _vector_math is None:
        _vector_math = False
        if available() and os.environ.get("ENGINE_NO_VECTOR_MATH", "") != "1":
            probe = ("void probe(long long n, const float* restrict a, float* restrict o) {\n"
                     "  for (long long i = 0; i < n; ++i) o[i] = expf(a[i]) + tanhf(a[i]);\n}\n")
            try:
                lib = build(probe, vector=True)
                x = np.array([0.0, 1.0, -np.inf, np.inf, np.nan] * 4, dtype=np.float32)
                out = np.empty_like(x)
                lib.probe(ctypes.c_longlong(x.size), ctypes.c_void_p(x.ctypes.data),
                          ctypes.c_void_p(out.ctypes.data))
                want = np.exp(x) + np.tanh(x)
                _vector_math = bool(np.allclose(out, want, rtol=1e-6, equal_nan=True))
            except (RuntimeError, OSError, AttributeError):
                pass
    return _vector_math


def build(source: str, vector: bool = False, global_symbols: bool = False) -> Any:
    """Compile `source` to a shared library (cached by content) and load it; `vector`
    declares libm's functions SIMD and links libmvec; `global_symbols` lets libraries
    loaded later call its functions (the thread pool, backends.cparallel)."""
    if vector:
        source = VECTOR_MATH_HEADER + source
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
        flags = ["-O3", "-std=c99", "-D_POSIX_C_SOURCE=200809L", "-shared", "-fPIC", "-fno-math-errno",
                 "-pthread"]
        libs = ["-lmvec", "-lm"] if vector else ["-lm"]
        for extra in (["-march=native"], []):
            res = subprocess.run([_compiler, *flags, *extra, src, "-o", tmp, *libs],
                                 capture_output=True, text=True)
            if res.returncode == 0:
                break
        os.remove(src)
        if res.returncode != 0:
            raise RuntimeError(f"C compiler failed:\n{res.stderr[:2000]}")
        os.replace(tmp, so)                   # atomic: concurrent builders never see half a file
    lib = _loaded[digest] = ctypes.CDLL(so, mode=ctypes.RTLD_GLOBAL if global_symbols else ctypes.DEFAULT_MODE)
    return lib




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
