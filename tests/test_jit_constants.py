"""Scalar constants in fused kernels keep IEEE semantics: sympy folds 0*x into 0 as it
builds expressions, but 0*inf is NaN, so a jitted kernel must not drop the product."""
from __future__ import annotations

import numpy as np
import pytest

import engine as eg
from engine.compiler import ckernels

INF = np.inf


def _both(fn, *arrays):
    """Eager and jitted results, on arrays long enough that the jit prints its fused
    groups as C kernels (small ones it may run op by op)."""
    reps = -(-ckernels.MIN_ELEMENTS // arrays[0].size)
    ts = [eg.tensor(np.tile(a, reps)) for a in arrays]
    return fn(*ts).numpy(), eg.jit(fn)(*ts).numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", [
    ("lerp weight 0", lambda a, b: eg.lerp(a, b, 0.0)),
    ("times zero", lambda a, b: a + (b * 0.0) * 2.0),
    ("zero times", lambda a, b: (0.0 * b).exp() + a),
    ("power 2.0", lambda a, b: (a - b) ** 2.0 + 1.0),
    ("power 0.5", lambda a, b: (a * a + 1.0) ** 0.5 - b),
])
def test_jit_keeps_nan_and_inf_where_eager_has_them(case, dtype):
    _, fn = case
    a = np.array([1.0, -2.0, 3.0, 0.0, 5.0], dtype=dtype)
    b = np.array([INF, 1.0, -INF, np.nan, 0.5], dtype=dtype)
    with np.errstate(all="ignore"):
        eager, jit = _both(fn, a, b)
    np.testing.assert_array_equal(np.isnan(jit), np.isnan(eager))
    np.testing.assert_allclose(jit, eager, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", [
    ("x - x", lambda a, b: (a - a) + b),
    ("(x + 1) - x", lambda a, b: ((a + 1.0) - a) * b),
    ("x / x", lambda a, b: (a / a) * b),
    ("across steps", lambda a, b: ((a * b) - (-(-(a * b)))).exp()),
    ("(x + y) - y", lambda a, b: ((a + b) - b) * 2.0),
])
def test_jit_computes_each_step_as_eager_does(case, dtype):
    """sympy would combine terms across fused steps ((x + 1) - x -> 1); eager computes
    step by step, where inf - inf is NaN and (1e20 + 1) - 1e20 is 0."""
    _, fn = case
    big = 1e20 if dtype == np.float64 else 1e10
    a = np.array([INF, -INF, np.nan, big, 3.0, 0.0], dtype=dtype)
    b = np.array([1.0, 2.0, 0.5, 1.0, INF, -big], dtype=dtype)
    with np.errstate(all="ignore"):
        eager, jit = _both(fn, a, b)
    np.testing.assert_array_equal(np.isnan(jit), np.isnan(eager))
    np.testing.assert_array_equal(jit, eager)
