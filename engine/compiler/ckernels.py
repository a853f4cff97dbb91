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
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from backends.cbuild import address, available, build as _build, vector_math
from backends.cprint import CPrintError, c_expression, storage_ctype

from .ir import Value

# Below this many elements the per-call cost of ctypes exceeds what fusion saves.
MIN_ELEMENTS = 1 << 15

# Ops the C compiler vectorises without -ffast-math (which would break inf/NaN
# semantics that masking relies on).
C_FRIENDLY = {"add", "sub", "mul", "div", "neg", "sqrt", "rsqrt", "abs", "maximum", "minimum",
              "relu", "heaviside", "sign", "lerp", "ema_sq", "adam_param"}
# Ops calling libm's transcendentals: C-friendly only with libmvec (see backends.cbuild).
VECTOR_MATH_OPS = {"exp", "log", "tanh", "sigmoid", "erf", "gelu", "gelu_tanh"}


def friendly(op_name: str) -> bool:
    return op_name in C_FRIENDLY or (op_name in VECTOR_MATH_OPS and vector_math())


def _mode(shape: tuple, out_shape: tuple, split: int) -> str | None:
    """How an input broadcast to `out_shape` is read in the (outer, inner) loop nest that
    splits the output's axes at `split`: "same" (element i), "scalar" (0), "row" (it
    varies along the inner axes only: element c), "col" (along the outer axes only:
    element o), "suffix" (a trailing block shorter than a row: i % n), or None (the
    broadcast must be materialised first)."""
    nd = len(out_shape)
    padded = (1,) * (nd - len(shape)) + tuple(shape)
    if padded == tuple(out_shape):
        return "same"
    if int(np.prod(shape)) == 1:
        return "scalar"
    if all(d == 1 for d in padded[:split]) and padded[split:] == tuple(out_shape[split:]):
        return "row"
    if padded[:split] == tuple(out_shape[:split]) and all(d == 1 for d in padded[split:]):
        return "col"
    lead = 0
    while lead < nd and padded[lead] == 1:
        lead += 1
    if lead < nd and padded[lead:] == tuple(out_shape[lead:]):
        return "suffix"
    return None


_MODE_SCORE = {"same": 2, "scalar": 2, "row": 2, "col": 2, "suffix": 1, None: 0}


def _layout(shapes: list, out_shape: tuple) -> tuple[int, list]:
    """The split of the output's axes that lets most inputs be read without a modulo or a
    materialised broadcast (ties: the longest inner loop); returns (split, modes)."""
    best: tuple | None = None
    for split in range(len(out_shape) + 1):
        modes = [_mode(s, out_shape, split) for s in shapes]
        score = sum(_MODE_SCORE[m] for m in modes)
        if best is None or score > best[0]:
            best = (score, split, modes)
    return best[1], best[2]


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


def _loads(modes: list[str], ct: str) -> list[str]:
    """Per input (see `_mode`): element i, 0, c (inner index), o (outer index) or i % n."""
    index = {"same": "i", "scalar": "0", "row": "c", "col": "o"}
    return [f"const {ct} in{k} = p{k}[{index.get(m, f'i % n{k}')}];" for k, m in enumerate(modes)]


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
        cfn.argtypes = ([ctypes.c_longlong] * len(self.head)
                        + [ctypes.c_void_p, ctypes.c_longlong] * len(self.modes) + [ctypes.c_void_p])
        head = tuple(self.head)
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
                    keep.append(a)                   # alive until the call returns
                elif type(a) is not np.ndarray or not a.flags.c_contiguous:
                    a = np.ascontiguousarray(a)
                    keep.append(a)
                args += (address(a), n)
            args.append(address(out))
            cfn(*args)
            return out
        return run


# What a step costs NumPy in whole-array calls (1 unless listed): a kernel replacing
# at least MIN_CALLS of them pays for its ctypes call at any size.
_NUMPY_CALLS = {"lerp": 3, "ema_sq": 4, "adam_param": 7, "rsqrt": 2, "sigmoid": 4, "gelu": 5,
                "gelu_tanh": 7, "heaviside": 3}
MIN_CALLS = 3


_REDUCTION_CALLS = 3        # np.sum over an axis tuple costs about three ufunc calls


def _eligible(steps: list, inputs: tuple, dtype: np.dtype, size: int, extra_calls: int = 0) -> bool:
    calls = sum(_NUMPY_CALLS.get(op.name, 1) for op, _ in steps) + extra_calls
    return (available() and (size >= MIN_ELEMENTS or calls >= MIN_CALLS)
            and all(friendly(op.name) for op, _ in steps)
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
    split, modes = _layout([v.shape for v in inputs], out.shape)
    inner = int(np.prod(out.shape[split:]))
    try:
        expr, symbols = group.expression()
        src = kernel_source("k", expr, symbols, [m or "same" for m in modes], out.dtype)
    except (CPrintError, TypeError, ValueError):
        return None
    src, name = _named(src, "k", "k")
    return Planned(src, name, (size // max(inner, 1), inner), modes,
                   [int(np.prod(v.shape)) for v in inputs], out.shape, out.shape, out.dtype)


def plan_reduction(red: Any, inputs: tuple, out: Value) -> Planned | None:
    """A FusedReduction over a leading or trailing block of axes as a C loop, or None."""
    split = red.split()
    if split is None or not _eligible(red.group.steps, inputs, out.dtype, int(np.prod(red.in_shape)),
                                      _REDUCTION_CALLS):
        return None
    outer, inner, layout = split
    nd = len(red.in_shape)
    reduced = nd if red.axis is None else len(red.axis)
    cut = nd - reduced if layout == "rows" else reduced        # the outer axes come first
    modes = [_mode(v.shape, red.in_shape, cut) for v in inputs]
    try:
        expr, symbols = red.group.expression()
        src = reduction_source("r", expr, symbols, [m or "same" for m in modes], out.dtype, layout)
    except (CPrintError, TypeError, ValueError):
        return None
    src, name = _named(src, "r", "r")
    return Planned(src, name, (outer, inner), modes, [int(np.prod(v.shape)) for v in inputs],
                   red.in_shape, out.shape, out.dtype)


def build(planned: list[Planned]) -> list[Callable[..., Any]] | None:
    """Compile every planned kernel of a program in one translation unit (one compiler
    run), and return their runners; None if the compiler fails."""
    if not planned:
        return []
    unique = {p.name: p.source for p in planned}
    try:
        lib = _build("\n".join(unique.values()), vector=vector_math())
    except (RuntimeError, OSError):
        return None
    return [p.runner(getattr(lib, p.name)) for p in planned]
