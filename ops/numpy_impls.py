"""NumPy functions computing elementwise specs exactly, faster than their lambdified
expressions; each spec names its own in `numpy=` (the registry tests check it equals
the expression). Only NumPy here: the backends pick them up from the spec."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

_erf_object = np.frompyfunc(math.erf, 1, 1)


def erf(x: Any) -> Any:
    """erf with full float64 accuracy (NumPy has none; SciPy is not a dependency)."""
    x = np.asarray(x)
    dtype = x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)
    return np.asarray(_erf_object(x), dtype=object).astype(dtype)


def heaviside(x: Any, h: Any) -> Any:
    """np.heaviside, ~40x faster: NumPy's ufunc has no SIMD loop, comparisons do.
    (Same values, NaN included; relu's gradient mask runs through this.)"""
    x = np.asarray(x)
    if not isinstance(h, (int, float)) or x.dtype.kind != "f":
        return np.heaviside(x, h)
    out = np.array(x > 0, dtype=x.dtype)
    if h != 0:
        out[x == 0] = h
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.nan
    return out


def relu(x: Any, out: Any = None) -> Any:
    """max(x, 0) with NaN propagated, as the spec says (sympy's lambdified form is
    ~1.4x slower: it promotes through a Python reduce)."""
    return np.maximum(x, 0, out=out)


def rsqrt(x: Any, out: Any = None) -> Any:
    """1 / sqrt(x), as the printed kernels compute it. (sympy writes the spec as x**-0.5,
    whose lambdified NumPy power gives 0 at -inf and +inf at -0; here, as in PyTorch and
    the kernels, those are NaN and -inf.)"""
    return np.divide(1, np.sqrt(x), out=out)


def lerp(start: Any, end: Any, weight: Any, out: Any = None) -> Any:
    """start + weight * (end - start) in the spec's order; the last step writes `out`."""
    return np.add(start, weight * np.subtract(end, start), out=out)


def ema_sq(avg: Any, value: Any, beta: Any, out: Any = None) -> Any:
    """avg * beta + value**2 * (1 - beta)."""
    return np.add(avg * beta, value * value * (1 - beta), out=out)


def adam_param(param: Any, m: Any, v: Any, step_size: Any, bc2_sqrt: Any, decay: Any, eps: Any,
                out: Any = None) -> Any:
    """decay * param - m * step_size / (eps + sqrt(v) / bc2_sqrt)."""
    return np.subtract(decay * param, m * step_size / (eps + np.sqrt(v) / bc2_sqrt), out=out)


# Functions with out= (the jit writes planned buffers and optimizer state in place through them).
for _fn in (relu, rsqrt, lerp, ema_sq, adam_param):
    _fn.writes_out = True
