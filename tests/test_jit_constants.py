"""Scalar constants in fused kernels keep IEEE semantics: sympy folds 0*x into 0 as it
builds expressions, but 0*inf is NaN, so a jitted kernel must not drop the product."""
from __future__ import annotations

import numpy as np
import pytest

import engine as eg

INF = np.inf


def _both(fn, *arrays):
    ts = [eg.tensor(a) for a in arrays]
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
