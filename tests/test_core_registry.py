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
    drawn = [_draw(op.domain, rng, s, i) for i, s in enumerate(shapes.input_shapes)]
    xs = [eg.tensor(a, requires_grad=a.dtype.kind == "f") for a in drawn]     # a select's condition: bool
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


@pytest.mark.parametrize("fused,reference", [("softmax", "softmax"), ("log_softmax", "log_softmax"),
                                             ("layer_norm", "layer_norm")])
def test_fused_ops_equal_their_primitive_decomposition(fused, reference, rng):
    """Forward, gradient and second-order gradient of each fused op equal the composite's."""
    op, comp = ops.REGISTRY[fused], ops.COMPOSITES[reference]
    for args, params in op.sample(rng):
        x = [eg.tensor(a, requires_grad=True) for a in args]
        y = [eg.tensor(a, requires_grad=True) for a in args]
        ref_params = {k: v for k, v in params.items()}
        a = op(*x, **params)
        b = comp.fn(*y, **ref_params)
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)
        cot = eg.tensor(rng.standard_normal(a.shape))
        ga = eg.autograd_grad((a * cot).sum(), x, create_graph=True)
        gb = eg.autograd_grad((b * cot).sum(), y, create_graph=True)
        for u, v in zip(ga, gb):
            np.testing.assert_allclose(u.numpy(), v.numpy(), rtol=1e-9, atol=1e-12)
        hess_a = eg.autograd_grad((ga[0] ** 2).sum(), x, allow_unused=True)
        hess_b = eg.autograd_grad((gb[0] ** 2).sum(), y, allow_unused=True)
        for u, v in zip(hess_a, hess_b):
            if u is not None and v is not None:
                np.testing.assert_allclose(u.numpy(), v.numpy(), rtol=1e-8, atol=1e-10)


def test_fused_softmax_masked_rows_match_reference():
    x = np.array([[0.5, -np.inf, 2.0], [-np.inf, -np.inf, -np.inf]])
    for fused in ("softmax", "log_softmax"):
        a = eg.tensor(x, requires_grad=True)
        b = eg.tensor(x, requires_grad=True)
        ya = ops.REGISTRY[fused](a, axis=1)
        yb = ops.COMPOSITES[fused].fn(b, axis=1)
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())
        w = eg.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
        (eg.where(w > 0, ya, 0.0) * w).sum().backward()
        (eg.where(w > 0, yb, 0.0) * w).sum().backward()
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), atol=1e-12)
        assert np.all(np.isfinite(a.grad.numpy()))
