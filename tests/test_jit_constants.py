"""Scalar constants in fused kernels keep IEEE semantics: sympy folds 0*x into 0 as it
builds expressions, but 0*inf is NaN, so a jitted kernel must not drop the product."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import engine as eg
import ops
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


SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 3.0, -3.0, 100.0, -100.0, 1e30, -1e30, 1e-310, INF, -INF,
           np.nan]
ELEMENTWISE = sorted(name for name, op in ops.REGISTRY.items()
                     if op.kind == "elementwise" and op.condition is None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_printed_kernel_of_every_elementwise_op_agrees_with_eager_on_special_values(name, dtype):
    """Each op's printed C (a fused pair: op, then * 1) against its eager NumPy function on
    zeros of both signs, infinities, NaN, subnormals and large values (every pair for
    binary ops, a sample for wider ones): NaN where eager has NaN, the same infinities,
    finite values to rounding. (Eager once computed rsqrt as x**-0.5: rsqrt(-inf) = 0 and
    rsqrt(-0) = +inf, where the kernel, as PyTorch, gives NaN and -inf.)"""
    op = ops.REGISTRY[name]
    if op.nin <= 2:
        cols = [np.array(c, dtype) for c in zip(*itertools.product(SPECIAL, repeat=op.nin))]
    else:
        rng = np.random.default_rng(0)
        cols = [rng.choice(np.array(SPECIAL, dtype), 4096) for _ in range(op.nin)]
    one = np.ones(len(cols[0]), dtype)
    fn = lambda *xs: op(*xs[:-1]) * xs[-1]                   # noqa: E731
    reps = -(-ckernels.MIN_ELEMENTS // len(one))
    with np.errstate(all="ignore"):
        eager = fn(*(eg.tensor(c) for c in cols), eg.tensor(one)).numpy()
        jit = eg.jit(fn)(*(eg.tensor(np.tile(c, reps)) for c in cols + [one])).numpy()[:len(one)]
    np.testing.assert_array_equal(np.isnan(jit), np.isnan(eager))
    np.testing.assert_array_equal(np.where(np.isinf(jit), jit, 0), np.where(np.isinf(eager), eager, 0))
    finite = np.isfinite(eager)
    np.testing.assert_allclose(jit[finite], eager[finite], rtol=1e-4 if dtype == np.float32 else 1e-12)


UNARY = ["exp", "tanh", "sigmoid", "neg", "relu", "abs", "erf", "log", "sqrt", "rsqrt", "sign", "gelu_tanh",
         "silu", "softplus"]
BINARY = ["add", "sub", "mul", "div", "maximum", "minimum", "pow"]


@st.composite
def _programs(draw):
    steps = []
    for _ in range(draw(st.integers(2, 6))):
        kind = draw(st.sampled_from(["unary", "binary", "scalar", "where"]))
        if kind == "unary":
            steps.append((kind, draw(st.sampled_from(UNARY))))
        elif kind == "binary":
            steps.append((kind, draw(st.sampled_from(BINARY))))
        elif kind == "scalar":
            steps.append((kind, draw(st.sampled_from(["add", "mul", "sub", "div"])),
                          draw(st.sampled_from([0.0, 1.0, -1.0, 2.5, 1e-3]))))
        else:
            steps.append((kind,))
    return steps


@settings(max_examples=12, deadline=None, derandomize=True)
@given(steps=_programs(), dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 99))
def test_fused_programs_on_special_values_equal_eager(steps, dtype, seed):
    """Random fused programs (each step a registry op, a Python scalar or a where) on a mix
    of special values and normal ones, as printed C kernels, against eager: the same NaNs
    and infinities everywhere, finite values to rounding. Values and gradients."""
    rng = np.random.default_rng(seed)
    n = ckernels.MIN_ELEMENTS
    a, b = (rng.choice(np.array(SPECIAL, dtype), n) for _ in range(2))
    normal = rng.random(n) < 0.5
    a[normal] = rng.standard_normal(normal.sum()).astype(dtype)

    def program(x, y):
        vals = [x, y]
        for s in steps:
            p, q = vals[-1], vals[-2]
            v = (ops.REGISTRY[s[1]](p) if s[0] == "unary" else ops.REGISTRY[s[1]](p, q) if s[0] == "binary"
                 else ops.REGISTRY[s[1]](p, s[2]) if s[0] == "scalar" else eg.where(p > q, p, q * 2.0))
            vals.append(v)
        return vals[-1] + vals[-2] * 0.5 - vals[-1]

    grad = eg.grad(lambda x, y: (program(x, y) * 0.5).sum())
    x, y = eg.tensor(a), eg.tensor(b)
    rtol = 1e-3 if dtype == np.float32 else 1e-9
    with np.errstate(all="ignore"):
        pairs = [(program(x, y).numpy(), eg.jit(program)(x, y).numpy()),
                 (grad(x, y).numpy(), eg.jit(grad)(x, y).numpy())]
    for eager, jit in pairs:
        np.testing.assert_array_equal(np.isnan(jit), np.isnan(eager))
        np.testing.assert_array_equal(np.where(np.isinf(jit), jit, 0), np.where(np.isinf(eager), eager, 0))
        finite = np.isfinite(eager)
        np.testing.assert_allclose(jit[finite], eager[finite], rtol=rtol, atol=1e-30)
