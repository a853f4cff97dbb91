"""The declared kinks and ties, at the points where they matter (the symbolic proofs
use random points, which never hit a kink): relu'(0) = 0, and maximum / minimum / max /
min (and clip through them) share the gradient evenly between tied inputs. Checked
eagerly, under the jit (whose C kernels print the same expressions), and on the
symbolic backend at exact ties."""
from __future__ import annotations

import numpy as np
import pytest
import sympy

import engine as eg
from engine import symbolic as S


def _grads(fn, *arrays, jit=False):
    xs = [eg.tensor(np.asarray(a, np.float64), requires_grad=True) for a in arrays]
    g = eg.grad(lambda *t: fn(*t).sum(), argnums=tuple(range(len(xs))))
    out = (eg.jit(g) if jit else g)(*xs)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


@pytest.mark.parametrize("jit", [False, True])
def test_relu_derivative_at_zero_is_zero(jit):
    (g,) = _grads(eg.relu, [0.0, -0.0, 1.5, -2.0], jit=jit)
    np.testing.assert_array_equal(g, [0.0, 0.0, 1.0, 0.0])


@pytest.mark.parametrize("jit", [False, True])
def test_maximum_and_minimum_ties_share_the_gradient(jit):
    a, b = [1.0, 2.0, 3.0], [1.0, 5.0, -1.0]
    np.testing.assert_array_equal(_grads(eg.maximum, a, b, jit=jit), [[0.5, 0.0, 1.0], [0.5, 1.0, 0.0]])
    np.testing.assert_array_equal(_grads(eg.minimum, a, b, jit=jit), [[0.5, 1.0, 0.0], [0.5, 0.0, 1.0]])


@pytest.mark.parametrize("jit", [False, True])
def test_max_and_min_reductions_share_ties_evenly(jit):
    x = [[2.0, 2.0, 1.0], [0.0, 0.0, 0.0]]
    (g,) = _grads(lambda t: t.max(axis=-1), x, jit=jit)
    np.testing.assert_allclose(g, [[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]], rtol=1e-15)
    (g,) = _grads(lambda t: eg.min(t, axis=-1), x, jit=jit)
    np.testing.assert_allclose(g, [[0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]], rtol=1e-15)


def test_clip_at_its_bounds_takes_half_the_gradient():
    (g,) = _grads(lambda t: eg.clip(t, -1.0, 1.0), [-1.0, 1.0, 0.0, 3.0])
    np.testing.assert_array_equal(g, [0.5, 0.5, 1.0, 0.0])


def test_symbolic_backend_agrees_at_exact_ties():
    """The same conventions hold on sympy arrays (where the proofs run): a tie there is
    an exact equality of rationals."""
    x = S.symbolic_tensor(np.array([sympy.Integer(2), sympy.Integer(2), sympy.Integer(1)], dtype=object))
    (g,) = eg.autograd_grad(x.max(), [x])
    assert list(g._data.data) == [sympy.Rational(1, 2), sympy.Rational(1, 2), 0]
    z = S.symbolic_tensor(np.array([sympy.Integer(0), sympy.Integer(3)], dtype=object))
    (g,) = eg.autograd_grad(eg.relu(z).sum(), [z])
    assert list(g._data.data) == [0, 1]
