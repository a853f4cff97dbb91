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


# -- the graph keeps only what VJPs read ------------------------------------------------------
# A node records a non-leaf input as an Edge (no data) unless its op's `saves` names it,
# so an intermediate no VJP reads is freed as soon as the forward drops it.

import weakref

from engine.dispatch import Edge
from engine.state import keep_graph_inputs


def _grads(f, *leaves, keep=False):
    """Gradients of f(*leaves) w.r.t. the leaves, recording the graph with all inputs
    kept (the old behaviour) or only the saved ones."""
    xs = [eg.tensor(x.numpy(), dtype=x.dtype, requires_grad=True) for x in leaves]
    with keep_graph_inputs(keep):
        out = f(*xs)
    out.backward()
    return [x.grad.numpy() for x in xs]


def test_unsaved_intermediate_is_freed_after_forward(rng):
    x = eg.tensor(rng.standard_normal((4, 8)), requires_grad=True)
    w = eg.tensor(rng.standard_normal((8, 5)), requires_grad=True)
    b = eg.tensor(rng.standard_normal(5), requires_grad=True)
    h = x @ w                         # read by no VJP: add saves nothing
    a = h + b
    t = a.tanh()                      # tanh's VJP reads its output
    y = (t * 2.0).sum()
    h_data, t_data, a_data = weakref.ref(h._data), weakref.ref(t._data), weakref.ref(a._data)
    assert isinstance(t._ctx.inputs[0], Edge) and isinstance(a._ctx.inputs[0], Edge)
    del h, a, t                       # no gc.collect(): freeing must not need the cycle GC
    assert h_data() is None and a_data() is None
    assert t_data() is not None       # saved (by tanh for -1 and by mul for input 0)
    y.backward()
    f = lambda x, w, b: ((x @ w + b).tanh() * 2.0).sum()
    for got, kept in zip((x.grad, w.grad, b.grad), _grads(f, x, w, b, keep=True)):
        np.testing.assert_allclose(got.numpy(), kept, rtol=1e-12)
    assert eg.gradcheck(f, x, w, b)


def test_graph_holds_only_saved_bytes():
    """A chain of adds (whose VJPs read nothing) holds no intermediate after forward."""
    n, steps = 1 << 16, 10             # 512 KiB per float64 intermediate
    x = eg.tensor(np.ones(n), requires_grad=True)
    b = eg.tensor(np.ones(n), requires_grad=True)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    y = x
    for _ in range(steps):
        y = y + b
    s = (y * 1.0).sum()               # mul saves y: the last intermediate stays
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert held < 2.5 * n * 8, f"the graph holds {held} bytes after forward"
    s.backward()
    np.testing.assert_allclose(x.grad.numpy(), 1.0)
    np.testing.assert_allclose(b.grad.numpy(), float(steps))


def test_value_used_by_saving_and_non_saving_consumers_gets_one_summed_gradient():
    x = eg.tensor([0.5, -1.5], dtype=eg.float64, requires_grad=True)
    for f in (lambda h: h * h + h, lambda h: h + h * h, lambda h: (h + 1.0) * h + h.exp()):
        h = x * 3.0
        y = f(h).sum()
        del h
        x.grad = None
        y.backward()
        kept = _grads(lambda x: f(x * 3.0).sum(), x, keep=True)[0]
        np.testing.assert_allclose(x.grad.numpy(), kept, rtol=1e-12)
    h = x * 3.0                       # saved by mul, an edge in add
    (g,) = eg.autograd_grad((h * h + h).sum(), [x])
    np.testing.assert_allclose(g.numpy(), 3 * (2 * 3 * x.numpy() + 1))


def test_retain_grad_on_an_edged_intermediate():
    x = eg.tensor([1.0, 2.0], dtype=eg.float64, requires_grad=True)
    h = x * 3.0
    z = h + 1.0                       # h is an edge in add's node
    h.retain_grad()                   # after the edge was made
    (z * z).sum().backward()
    np.testing.assert_allclose(h.grad.numpy(), 2 * z.numpy())
    h2 = (x * 3.0).retain_grad()      # before
    ((h2 + 1.0) * 2.0).sum().backward()
    np.testing.assert_allclose(h2.grad.numpy(), [2.0, 2.0])
    h3 = (x * 3.0).retain_grad()      # dropped before backward: nothing to store into
    s = (h3 + 1.0).sum()
    del h3
    s.backward()


def test_autograd_grad_with_respect_to_an_edged_intermediate():
    x = eg.tensor([1.0, 2.0], dtype=eg.float64, requires_grad=True)
    h = x.exp()
    y = ((h + 1.0) * 2.0).sum()       # add records h as an edge
    gh, gx = eg.autograd_grad(y, [h, x])
    np.testing.assert_allclose(gh.numpy(), [2.0, 2.0])
    np.testing.assert_allclose(gx.numpy(), 2 * np.exp(x.numpy()))
    assert x.grad is None and h.grad is None


def test_second_order_through_ops_saving_their_output_reached_by_edges(rng):
    """exp and softmax read their output; reached only through edges (the output
    tensors are dropped), backward rebuilds it, and create_graph differentiates
    through it: check Hessian-vector products against differences of gradients."""
    v = rng.standard_normal((2, 4))
    c = eg.tensor(rng.standard_normal((2, 4)))
    fns = {
        "exp": lambda t: ((t.exp() + 1.0) ** 2).sum(),
        "softmax": lambda t: (((eg.softmax(t, -1) + c) ** 2) * eg.tensor(v)).sum(),
        "log_softmax": lambda t: ((eg.log_softmax(t, -1) - 1.0) ** 2).sum(),
    }

    def first(f, xv):
        x = eg.tensor(xv, requires_grad=True)
        (g,) = eg.autograd_grad(f(x), [x])
        return g.numpy()

    x0, u = rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    for name, f in fns.items():
        x = eg.tensor(x0, requires_grad=True)
        y = f(x)
        (g,) = eg.autograd_grad(y, [x], create_graph=True)
        (hu,) = eg.autograd_grad((g * eg.tensor(u)).sum(), [x])
        eps = 1e-6
        num = (first(f, x0 + eps * u) - first(f, x0 - eps * u)) / (2 * eps)
        np.testing.assert_allclose(hu.numpy(), num, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(g.numpy(), first(f, x0), rtol=1e-12, err_msg=name)


def test_output_rebuilt_for_the_vjp_has_the_node_and_version():
    x = eg.tensor([0.5, 1.0], dtype=eg.float64, requires_grad=True)
    e = x.exp()
    node = e._ctx
    s = (e + 1.0).sum()
    edge = s._ctx.inputs[0]._ctx.inputs[0]
    assert isinstance(edge, Edge) and edge._ctx is node and edge._version is e._version
    del e
    out = node.output(edge)
    assert out._ctx is node and out._version is edge._version and out.requires_grad
    np.testing.assert_allclose(out.numpy(), np.exp(x.numpy()))
    s.backward()
    np.testing.assert_allclose(x.grad.numpy(), np.exp(x.numpy()))


def test_backward_twice_through_edges_raises():
    x = eg.tensor([1.0, 2.0], requires_grad=True)
    h = x.exp()
    a = (h + 1.0).sum()               # h as an edge
    b = (h * 2.0).sum()               # h itself (mul saves it)
    a.backward()
    assert h._ctx.freed               # freed in place: every holder sees it
    with pytest.raises(eg.GradError, match="second time"):
        b.backward()
    with pytest.raises(eg.GradError, match="second time"):
        a.backward()


def test_inplace_change_of_a_saved_value_reached_by_an_edge_is_caught():
    x = eg.tensor([1.0, 2.0], requires_grad=True)
    y = x.exp()
    z = y.detach()                    # shares data and version counter with y
    s = (y + 2.0).sum()
    del y                             # exp's node is reached only through add's edge
    z *= 0.0
    with pytest.raises(eg.GradError, match="exp: its output"):
        s.backward()
    c = eg.tensor([3.0, 4.0])
    h = x * 2.0
    y = (h + c) * c                   # mul saves its inputs; add's edge of h is fine
    c += 1.0
    with pytest.raises(eg.GradError, match=r"mul: input 1 .* modified in place"):
        y.sum().backward()


def test_an_edge_has_no_value():
    x = eg.tensor([1.0, 2.0], requires_grad=True)
    y = (x * 2.0) + 1.0
    edge = y._ctx.inputs[0]
    assert isinstance(edge, Edge) and edge.shape == (2,) and edge.dtype == np.float32
    assert edge.device == "cpu" and edge.ndim == 1 and edge.size == 2 and edge.requires_grad
    with pytest.raises(eg.GradError, match="saves"):
        edge._data
    with pytest.raises(eg.GradError, match="saves"):
        np.asarray(edge)
    with pytest.raises(eg.GradError, match="saves"):
        ops.REGISTRY["exp"](edge)


def test_a_vjp_reading_an_undeclared_input_fails_loudly(monkeypatch):
    add = ops.REGISTRY["add"]
    monkeypatch.setattr(add, "vjp", lambda g, out, inputs, needs:
                        (ops.REGISTRY["mul"](g, inputs[1]), ops.REGISTRY["mul"](g, inputs[0])))
    x = eg.tensor([1.0, 2.0], requires_grad=True)
    y = ((x * 2.0) + (x * 3.0)).sum()
    with pytest.raises(eg.GradError, match="saves"):
        y.backward()


@pytest.mark.parametrize("name", sorted(n for n, op in ops.REGISTRY.items()
                                        if op.vjp is not None and op.sample is not None))
def test_saves_declarations_cover_what_each_vjp_reads(name, rng):
    """Every float input is a non-leaf and the output is consumed by an op that does
    not save it, so only what `saves` declares reaches the VJP as a value; gradients
    must equal those of a graph that keeps every input."""
    op = ops.REGISTRY[name]
    for args, params in op.sample(rng):
        leaves = [eg.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)
                  if isinstance(a, np.ndarray) and a.dtype.kind == "f" else
                  eg.tensor(a, dtype=np.asarray(a).dtype) if isinstance(a, np.ndarray) else a
                  for a in args]
        if not any(isinstance(t, eg.Tensor) and t.requires_grad for t in leaves):
            continue

        def f(*xs):
            xs = [x * 1.0 if isinstance(x, eg.Tensor) and x.requires_grad else x for x in xs]
            out = op(*xs, **params)
            cot = eg.tensor(np.random.default_rng(0).standard_normal(out.shape))
            return ((out + 0.0) * cot).sum()

        grads = {}
        for keep in (False, True):
            xs = [eg.tensor(t.numpy(), dtype=t.dtype, requires_grad=True)
                  if isinstance(t, eg.Tensor) and t.requires_grad else t for t in leaves]
            with keep_graph_inputs(keep):
                s = f(*xs)
            if not s.requires_grad:
                break
            s.backward()
            grads[keep] = [x.grad for x in xs if isinstance(x, eg.Tensor) and x.requires_grad]
        else:
            for a, b in zip(grads[False], grads[True]):
                if b is None:
                    assert a is None
                else:
                    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, err_msg=name)


def test_retained_output_of_an_op_saving_it_gets_grad_at_second_order():
    """tanh saves its output; reached through an edge with create_graph, the VJP
    must use the real tensor (which retains grad), not a rebuilt copy."""
    x = eg.tensor([0.3, -0.4], dtype=eg.float64, requires_grad=True)
    y = x.tanh().retain_grad()
    s = (y + 1.0).sum()               # y as an edge
    (g,) = eg.autograd_grad(s, [x], create_graph=True)    # 1 - y^2, built on y
    y.grad = None
    g.sum().backward()
    np.testing.assert_allclose(y.grad.numpy(), -2 * np.tanh(x.numpy()))


@pytest.mark.parametrize("jit", [False, True])
def test_gradients_through_python_numbers_take_ieee_values(jit):
    """A VJP's sub-expressions in Python numbers only (d(x / c)/dx = 1 / c) are folded in
    Python; where Python raises or leaves the reals (1 / 0.0, log(0.0), (-8.0) ** (1/3)),
    the fold gives the IEEE value a tensor would (inf, -inf, nan), as PyTorch does."""
    x = eg.tensor([1.5, -2.0])
    cases = [(lambda x: x / 0.0, [np.inf, np.inf]),                 # 1 / 0.0
             (lambda x: x / -0.0, [-np.inf, -np.inf]),
             (lambda x: eg.pow(-8.0, x), [np.nan, np.nan])]         # (-8)**x * log(-8)
    for f, want in cases:
        g = eg.grad(lambda x: f(x).sum())
        with np.errstate(all="ignore"):
            got = (eg.jit(g) if jit else g)(x).numpy()
        np.testing.assert_array_equal(got, want)


def test_folded_python_numbers_keep_exact_arithmetic():
    from ops.sympy_ops import call
    assert call("mul", 2, 3) == 6 and type(call("mul", 2, 3)) is int
    assert call("div", 1.0, 0.0) == np.inf and call("log", 0.0) == -np.inf
    assert np.isnan(call("maximum", 1.0, float("nan")))      # NaN propagates, as in maximum
    assert call("exp", 1000.0) == np.inf


def test_piecewise_gradients_become_selects_and_fold_known_conditions():
    """A declared Piecewise (pow's gradients) runs as `where` ops over comparisons; a
    condition Python numbers decide picks its branch with no op, so x ** 2.0 keeps its
    plain 2 * x backward."""
    import sympy
    from ops.sympy_ops import build, call
    x, y = sympy.symbols("x y", real=True)
    f = build(sympy.Piecewise((0, sympy.Eq(x, 0) & (y >= 0)), (x + y, True)), (x, y))
    assert f(0.0, 1.0) == 0 and f(0.0, -1.0) == -1.0 and f(2.0, 1.0) == 3.0
    t = eg.tensor([0.0, 0.0, 2.0])
    np.testing.assert_array_equal(f(t, eg.tensor([1.0, -1.0, 1.0])).numpy(), [0.0, -1.0, 3.0])
    np.testing.assert_array_equal(f(t, -1.0).numpy(), [-1.0, -1.0, 1.0])
    assert call("eq", 0.0, float("nan")) is False and call("logical_and", True, t) is t
    j = eg.jit(eg.grad(lambda x: (x ** 2.0).sum()))
    np.testing.assert_array_equal(j(t).numpy(), [0.0, 0.0, 4.0])
    assert "where" not in str(j.ir) and "eq" not in str(j.ir)
