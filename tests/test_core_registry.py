"""Registry-driven tests: every op in ops.REGISTRY and every composite in
ops.COMPOSITES is checked against NumPy, against its own shape/dtype rule, and
gradchecked in float64. A new op is covered by adding it to the registry."""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

import engine as eg
import ops
from ops.elementwise import ElementwiseOp, _draw
from tests.conftest import to_tensor

RANDOM_OPS = {name for name, op in ops.REGISTRY.items() if op.random}
SAMPLED = sorted(name for name, op in ops.REGISTRY.items() if not op.random)
DIFFERENTIABLE = sorted(name for name in SAMPLED if ops.REGISTRY[name].differentiable)
ELEMENTWISE = sorted(n for n, op in ops.REGISTRY.items() if isinstance(op, ElementwiseOp))


def test_every_op_declares_how_to_test_it():
    for name in SAMPLED:
        op = ops.REGISTRY[name]
        assert op.sample is not None and op.reference is not None, name
    assert RANDOM_OPS == {"random_normal", "random_uniform", "bernoulli"}


@pytest.mark.parametrize("name", SAMPLED)
def test_forward_matches_numpy_and_shape_rule(name, rng):
    op = ops.REGISTRY[name]
    for args, params in op.sample(rng):
        out = op(*[to_tensor(a) for a in args], **params)
        ref = np.asarray(op.reference(*args, **params))
        shape, dtype = op.infer(*[to_tensor(a) for a in args], **params)
        assert out.shape == ref.shape == shape, (name, params)
        assert out.dtype == dtype, (name, out.dtype, dtype)
        np.testing.assert_allclose(out.numpy().astype(np.float64), ref.astype(np.float64),
                                   rtol=1e-6, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_gradcheck_samples(name, rng):
    op = ops.REGISTRY[name]
    for args, params in op.sample(rng):
        inputs = [to_tensor(a, requires_grad=True) for a in args]
        if any(isinstance(t, eg.Tensor) and t.requires_grad for t in inputs):
            assert eg.gradcheck(lambda *xs: op(*xs, **params), *inputs)


@pytest.mark.parametrize("name", sorted(n for n in ELEMENTWISE if ops.REGISTRY[n].differentiable))
@given(data=st.data())
def test_elementwise_gradcheck_on_drawn_broadcast_shapes(name, data):
    op = ops.REGISTRY[name]
    shapes = data.draw(mutually_broadcastable_shapes(num_shapes=op.nin, max_dims=3, max_side=3))
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    xs = [eg.tensor(_draw(op.domain, rng, s, i), requires_grad=True)
          for i, s in enumerate(shapes.input_shapes)]
    out = op(*xs)
    assert out.shape == shapes.result_shape
    assert eg.gradcheck(lambda *a: op(*a), *xs)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_native_forward_equals_its_sympy_expression(name, rng):
    """Backends may use a native function; it must compute the spec's expression."""
    op = ops.REGISTRY[name]
    for args, _ in op.sample(rng)[:3]:
        got = op(*[to_tensor(a) for a in args]).numpy()
        want = op.reference(*[np.asarray(a) for a in args])
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-7, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("name", sorted(ops.COMPOSITES))
def test_composite_forward_and_gradcheck(name, rng):
    comp = ops.COMPOSITES[name]
    for args, params in comp.sample(rng):
        out = comp.fn(*[to_tensor(a) for a in args], **params)
        np.testing.assert_allclose(out.numpy(), comp.reference(*args, **params), rtol=1e-6,
                                   atol=1e-9, err_msg=name)
        inputs = [to_tensor(a, requires_grad=True) for a in args]
        if any(isinstance(t, eg.Tensor) and t.requires_grad for t in inputs):
            assert eg.gradcheck(lambda *xs: comp.fn(*xs, **params), *inputs)


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "exp", "log", "gelu", "mul", "div", "pow"])
def test_second_order_elementwise(name, rng):
    """Gradients of gradients: the VJPs are ops, so they differentiate again."""
    op = ops.REGISTRY[name]
    xs = [eg.tensor(_draw(op.domain, rng, (3,), i), requires_grad=True) for i in range(op.nin)]
    first = lambda *a: eg.grad(lambda *b: op(*b).sum(), argnums=tuple(range(op.nin)))(*a)[0]
    assert eg.gradcheck(first, *xs)


def test_float32_is_kept_and_python_scalars_are_weak():
    x = eg.ones(3)
    assert (x * 2.5).dtype == np.float32
    assert (2 ** x).dtype == np.float32
    assert (x + np.float64(1.0)).dtype == np.float32      # NumPy scalars act as Python scalars
    assert (eg.arange(3) + 0.5).dtype == np.float64       # NumPy-style promotion of ints
    assert eg.exp(eg.arange(3)).dtype == np.float32       # float functions give the default float
    assert (eg.arange(3) / 2).dtype == np.float32
    assert (x.double() + x).dtype == np.float64
