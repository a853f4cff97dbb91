"""Autograd behaviour: accumulation, graph freeing, higher order, functional API."""
import gc
import tracemalloc

import numpy as np
import pytest

import engine as eg
import ops


def test_diamond_fan_out_accumulates():
    x = eg.tensor([1.5, -2.0], requires_grad=True)
    a = x * 3.0
    y = (a * a + a.exp()).sum()          # a is used twice
    y.backward()
    xv = x.numpy()
    np.testing.assert_allclose(x.grad.numpy(), 3 * (2 * 3 * xv + np.exp(3 * xv)), rtol=1e-6)


def test_leaf_grads_accumulate_across_backward_calls():
    x = eg.tensor([1.0, 2.0], requires_grad=True)
    (x * x).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [4.0, 8.0])


def test_shared_gradient_buffers_are_not_aliased():
    """add passes the same gradient to both inputs; accumulating into one leaf's
    .grad must not change the other's."""
    a = eg.tensor([1.0], requires_grad=True)
    b = eg.tensor([1.0], requires_grad=True)
    (a + b).sum().backward()
    (a * 5.0).sum().backward()
    assert a.grad.item() == 6.0 and b.grad.item() == 1.0


def test_long_chain_has_no_recursion_limit():
    x = eg.tensor(1.0, dtype=eg.float64, requires_grad=True)
    y = x
    for _ in range(100_000):
        y = y * 1.0
    y.backward()
    assert x.grad.item() == 1.0
    del y
    gc.collect()


def test_graph_is_freed_and_second_backward_raises():
    x = eg.tensor([1.0, 2.0], requires_grad=True)
    y = (x.tanh() * 2).sum()
    y.backward()
    with pytest.raises(eg.GradError, match="second time"):
        y.backward()


def test_retain_graph_allows_second_backward():
    x = eg.tensor([1.0, 2.0], requires_grad=True)
    y = (x.tanh() * 2).sum()
    y.backward(retain_graph=True)
    g1 = x.grad.numpy().copy()
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * g1)


def test_backward_on_non_scalar_needs_gradient():
    x = eg.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(eg.GradError, match=r"shape \(2,\) needs a gradient"):
        (x * 2).backward()
    y = x * 2
    y.backward(eg.tensor([1.0, 10.0]))
    np.testing.assert_allclose(x.grad.numpy(), [2.0, 20.0])


def test_integer_tensors_cannot_require_grad():
    with pytest.raises(eg.DTypeError, match="int64"):
        eg.tensor([1, 2], requires_grad=True)
    with pytest.raises(eg.DTypeError):
        eg.arange(3).requires_grad_()


def test_backward_without_grad_requirement_raises():
    with pytest.raises(eg.GradError, match="does not require grad"):
        eg.tensor([1.0]).sum().backward()


def test_no_grad_and_detach():
    x = eg.tensor([1.0, 2.0], requires_grad=True)
    with eg.no_grad():
        y = x * 2
    assert not y.requires_grad and y.is_leaf
    z = (x * 2).detach()
    assert not z.requires_grad

    @eg.no_grad()
    def f(t):
        return t * 3
    assert not f(x).requires_grad
    assert eg.is_grad_enabled()


def test_retain_grad_on_non_leaf():
    x = eg.tensor([1.0, 2.0], requires_grad=True)
    h = (x * 3).retain_grad()
    (h * h).sum().backward()
    np.testing.assert_allclose(h.grad.numpy(), 2 * h.numpy())
    np.testing.assert_allclose(x.grad.numpy(), 18 * x.numpy())


def test_functional_grad_and_value_and_grad():
    f = lambda a, b: (a * b.exp()).sum()
    a, b = eg.tensor([1.0, 2.0]), eg.tensor([0.5, -1.0])
    ga = eg.grad(f)(a, b)
    np.testing.assert_allclose(ga.numpy(), np.exp(b.numpy()), rtol=1e-6)
    val, (ga2, gb) = eg.value_and_grad(f, argnums=(0, 1))(a, b)
    np.testing.assert_allclose(val.item(), f(a, b).item(), rtol=1e-6)
    np.testing.assert_allclose(gb.numpy(), a.numpy() * np.exp(b.numpy()), rtol=1e-6)
    (v, aux), g = eg.value_and_grad(lambda t: ((t * t).sum(), "aux"), has_aux=True)(a)
    assert aux == "aux"


def test_grad_of_grad_nests():
    x = eg.tensor([0.3, -0.7], dtype=eg.float64)
    d2 = eg.grad(lambda t: eg.grad(lambda u: eg.tanh(u).sum())(t).sum())(x)
    t = np.tanh(x.numpy())
    np.testing.assert_allclose(d2.numpy(), -2 * t * (1 - t * t), rtol=1e-10)


def test_autograd_grad_with_create_graph():
    x = eg.tensor([0.5, 1.5], dtype=eg.float64, requires_grad=True)
    y = (x ** 3).sum()
    (g,) = eg.autograd_grad(y, [x], create_graph=True)
    (h,) = eg.autograd_grad(g.sum(), [x])
    np.testing.assert_allclose(h.numpy(), 6 * x.numpy())
    assert x.grad is None


def test_second_order_softmax_and_mlp(rng):
    x = eg.tensor(rng.standard_normal((2, 4)), requires_grad=True)
    v = eg.tensor(rng.standard_normal((2, 4)))
    assert eg.gradcheck(lambda t: eg.grad(lambda u: (eg.softmax(u, -1) * v).sum())(t), x)
    w1 = eg.tensor(rng.standard_normal((4, 5)), requires_grad=True)
    w2 = eg.tensor(rng.standard_normal((5, 1)), requires_grad=True)
    mlp = lambda w1, w2: (eg.tanh(x.detach() @ w1) @ w2).sum()
    assert eg.gradcheck(lambda a, b: eg.grad(mlp, argnums=(0, 1))(a, b)[0], w1, w2)


def test_inplace_on_saved_tensor_is_caught_at_backward():
    x = eg.tensor([1.0, 2.0], requires_grad=True)
    c = eg.tensor([3.0, 4.0])
    y = (x * c).sum()
    c += 1.0                          # mul's VJP needs the old c
    with pytest.raises(eg.GradError, match=r"mul: input 1 .* modified in place"):
        y.backward()


def test_inplace_on_output_used_by_backward_is_caught():
    x = eg.tensor([1.0, 2.0], requires_grad=True)
    y = x.exp()
    z = y.detach()                    # shares data and version counter with y
    s = (y + 2.0).sum()               # add does not read y: only exp does
    z *= 0.0
    with pytest.raises(eg.GradError, match="exp: its output"):
        s.backward()


def test_inplace_change_of_a_value_backward_does_not_read_is_fine():
    x = eg.tensor([1.0, 2.0], requires_grad=True)
    c = eg.tensor([3.0, 4.0])
    y = (x + c).sum()                 # add's VJP reads neither input
    c += 1.0
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), [1.0, 1.0])


def test_inplace_on_views_shares_the_version():
    x = eg.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    c = eg.tensor([[1.0, 1.0], [1.0, 1.0]])
    view = c.reshape(4)
    y = (x * c).sum()
    view[0] = 5.0
    with pytest.raises(eg.GradError, match="modified in place"):
        y.backward()


def test_inplace_on_graph_tensors_is_refused_with_grad_on():
    x = eg.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(eg.GradError, match="in-place"):
        x += 1.0
    y = x * 2
    with pytest.raises(eg.GradError, match="part of an autograd graph"):
        y[0] = 3.0
    with eg.no_grad():
        x -= 0.5                      # how optimizers update parameters
    np.testing.assert_allclose(x.numpy(), [0.5, 1.5])


def test_memory_does_not_grow_over_training_steps(rng):
    w = eg.tensor(rng.standard_normal((32, 32)) * 0.1, dtype=eg.float32, requires_grad=True)
    x = eg.tensor(rng.standard_normal((16, 32)), dtype=eg.float32)

    def step():
        loss = (eg.softmax(eg.tanh(x @ w) @ w, -1) ** 2).mean()
        loss.backward()
        with eg.no_grad():
            w.__isub__(0.01 * w.grad)
        w.grad = None

    for _ in range(20):
        step()
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for _ in range(200):
        step()
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert grown < 200_000, f"memory grew by {grown} bytes over 200 steps"


def test_mlp_learns_with_sgd():
    from examples.fit_mlp import main
    assert main(["--steps", "1500", "--seed", "0"]) < 0.02


def test_gradcheck_reports_the_faulty_op(rng, monkeypatch):
    op = ops.REGISTRY["tanh"]
    monkeypatch.setattr(op, "vjp", lambda g, out, inputs, needs: (g * 1.1,))
    x = eg.tensor(rng.standard_normal(3), requires_grad=True)
    with pytest.raises(eg.GradcheckError) as e:
        eg.gradcheck(lambda t: (t * 2.0).tanh().exp(), x)
    msg = str(e.value)
    assert "worst element" in msg and "analytic" in msg and "numeric" in msg
    assert "op path: mul -> tanh -> exp" in msg
    assert "first op whose own gradient fails: tanh" in msg
