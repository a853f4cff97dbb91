"""engine.jit: traced and compiled programs equal eager execution."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import engine as eg
import ops
from engine.compiler import Program, Value, cse, constant_fold, dce, fuse_elementwise, simplify
from engine.compiler.ir import Node
from engine.compiler.passes import FusedElementwise
from tests.conftest import to_tensor

R = ops.REGISTRY
SAMPLED = sorted(n for n, op in R.items() if not op.random)


@pytest.mark.parametrize("name", SAMPLED)
def test_jit_equals_eager_for_every_registered_op(name, rng):
    op = R[name]
    for args, params in op.sample(rng):
        inputs = [to_tensor(a) for a in args]
        f = lambda *xs: op(*xs, **params)
        want = f(*inputs)
        got = eg.jit(f)(*inputs)
        assert got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=0, err_msg=name)


@pytest.mark.parametrize("name", sorted(n for n in SAMPLED if R[n].differentiable))
def test_jit_of_gradient_equals_eager_gradient(name, rng):
    op = R[name]
    for args, params in op.sample(rng):
        inputs = [to_tensor(a) for a in args]
        diff = [i for i, a in enumerate(inputs) if isinstance(a, eg.Tensor) and a.dtype.kind == "f"]
        if not diff:
            continue
        cot = None

        def loss(*xs):
            out = op(*xs, **params)
            return (out * eg.tensor(np.linspace(-1, 1, out.size).reshape(out.shape))).sum()
        g = eg.grad(loss, argnums=tuple(diff))
        want = g(*inputs)
        got = eg.jit(g)(*inputs)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-15, err_msg=name)


@pytest.mark.parametrize("name", sorted(ops.COMPOSITES))
def test_jit_equals_eager_for_composites(name, rng):
    comp = ops.COMPOSITES[name]
    for args, params in comp.sample(rng):
        inputs = [to_tensor(a) for a in args]
        f = lambda *xs: comp.fn(*xs, **params)
        np.testing.assert_allclose(eg.jit(f)(*inputs).numpy(), f(*inputs).numpy(), rtol=1e-12)


UNARY = ["exp", "tanh", "sigmoid", "neg", "relu", "abs", "gelu_tanh", "erf"]
BINARY = ["add", "sub", "mul", "maximum", "minimum"]


@st.composite
def programs(draw):
    """A random straight-line program over two inputs, with reductions and matmuls."""
    steps = []
    for _ in range(draw(st.integers(2, 10))):
        kind = draw(st.sampled_from(["unary", "binary", "binary", "scalar", "reduce", "matmul"]))
        if kind == "unary":
            steps.append(("unary", draw(st.sampled_from(UNARY))))
        elif kind == "binary":
            steps.append(("binary", draw(st.sampled_from(BINARY))))
        elif kind == "scalar":
            steps.append(("scalar", draw(st.sampled_from(["add", "mul", "sub"])),
                          draw(st.floats(-2, 2, allow_nan=False))))
        else:
            steps.append((kind,))
    return steps


def _run_program(steps, a, b):
    vals = [a, b]
    for s in steps:
        x, y = vals[-1], vals[-2]
        if s[0] == "unary":
            v = R[s[1]](x)
        elif s[0] == "binary":
            v = R[s[1]](x, y)
        elif s[0] == "scalar":
            v = R[s[1]](x, s[2])
        elif s[0] == "reduce":
            v = eg.softmax(x, -1) + x.sum(axis=0, keepdims=True) * 0.1
        else:
            v = eg.tanh(x @ y.T @ y * 0.1)
        vals.append(v)
    return (vals[-1] * vals[-2]).sum() + vals[-1].mean()


@given(steps=programs(), seed=st.integers(0, 1000))
def test_random_programs_values_and_gradients(steps, seed):
    rng = np.random.default_rng(seed)
    a = eg.tensor(rng.standard_normal((3, 4)) * 0.5)
    b = eg.tensor(rng.standard_normal((3, 4)) * 0.5)
    f = lambda x, y: _run_program(steps, x, y)
    g = eg.value_and_grad(f, argnums=(0, 1))
    (v1, (ga1, gb1)), (v2, (ga2, gb2)) = g(a, b), eg.jit(g)(a, b)
    np.testing.assert_allclose(v2.numpy(), v1.numpy(), rtol=1e-10)
    np.testing.assert_allclose(ga2.numpy(), ga1.numpy(), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(gb2.numpy(), gb1.numpy(), rtol=1e-8, atol=1e-12)


def _train_step_setup(rng):
    w = eg.tensor(rng.standard_normal((4, 3)), dtype=eg.float32, requires_grad=True)
    b = eg.zeros(3, requires_grad=True)
    m = eg.zeros(4, 3)

    def step(x, y):
        loss = ((eg.tanh(x @ w + b) - y) ** 2).mean()
        loss.backward()
        with eg.no_grad():
            m.__imul__(0.9)
            m.__iadd__(w.grad)
            w.__isub__(0.1 * m)
            b.__isub__(0.1 * b.grad)
        return loss
    return w, b, m, step


def test_jit_training_step_updates_state_like_eager(rng):
    x = eg.tensor(rng.standard_normal((5, 4)), dtype=eg.float32)
    y = eg.tensor(rng.standard_normal((5, 3)), dtype=eg.float32)
    w, b, m, step = _train_step_setup(np.random.default_rng(0))
    eager = []
    for _ in range(4):
        eager.append(step(x, y).item())
        w.grad = b.grad = None
    state = [t.numpy().copy() for t in (w, b, m)]
    w, b, m, step = _train_step_setup(np.random.default_rng(0))
    compiled = eg.jit(step)
    for i in range(4):
        assert compiled(x, y).item() == pytest.approx(eager[i], rel=1e-6)
        assert w.grad is not None and w.grad.shape == (4, 3)     # gradients are written back
        w.grad = b.grad = None
    for t, s in zip((w, b, m), state):
        np.testing.assert_allclose(t.numpy(), s, rtol=1e-6)
    assert compiled.traces == 1


def test_changed_shape_retraces_and_static_args_key_the_cache():
    f = eg.jit(lambda x, k: x * k, static_argnums=(1,))
    assert f(eg.ones(2), 2.0).tolist() == [2, 2]
    assert f(eg.ones(3), 2.0).tolist() == [2, 2, 2]
    assert f(eg.ones(3), 3.0).tolist() == [3, 3, 3]
    assert f.traces == 3 and f.cache_size == 3
    f(eg.ones(3), 3.0)
    assert f.traces == 3


def test_captured_tensor_changes_are_seen_and_reshaped_captures_retrace():
    w = eg.ones(3)
    f = eg.jit(lambda x: x * w)
    assert f(eg.ones(3)).tolist() == [1, 1, 1]
    with eg.no_grad():
        w.__imul__(5.0)
    assert f(eg.ones(3)).tolist() == [5, 5, 5]           # read afresh, never a stale constant
    w._data = np.ones(1, np.float32)
    assert f(eg.ones(3)).tolist() == [1, 1, 1]           # shape guard failed: retraced
    assert f.traces == 2


def test_data_dependent_control_flow_is_a_clear_error():
    def f(x):
        if x.sum() > 0:
            return x
        return -x
    with pytest.raises(eg.TraceError, match="traced by jit.*eg.where"):
        eg.jit(f)(eg.ones(2))
    with pytest.raises(eg.TraceError, match="needs a concrete value"):
        eg.jit(lambda x: x.item())(eg.ones(1))


def test_random_ops_are_fresh_each_call_and_never_merged():
    f = eg.jit(lambda x: (eg.dropout(x, 0.5), eg.dropout(x, 0.5)))
    eg.manual_seed(0)
    a1, a2 = f(eg.ones(64))
    b1, _ = f(eg.ones(64))
    assert not np.array_equal(a1.numpy(), a2.numpy())
    assert not np.array_equal(a1.numpy(), b1.numpy())
    assert sum(getattr(n.op, "random", False) for n in f.ir.nodes) == 2


def test_outputs_do_not_alias_reused_buffers():
    f = eg.jit(lambda x: eg.tanh(x * 2.0 + 1.0) * 3.0)
    a = f(eg.ones(4))
    b = f(eg.zeros(4))
    assert a.tolist() == pytest.approx([np.tanh(3.0) * 3] * 4)
    assert b.tolist() == pytest.approx([np.tanh(1.0) * 3] * 4)


def test_a_returned_value_read_again_later_keeps_its_own_buffer():
    """A value both returned and read by later ops never lives in a buffer that a later
    value (or the next call) reuses."""
    def fn(x):
        y = x @ x
        z = (y * 2.0) @ x
        return y, (z @ z) + 1.0
    f = eg.jit(fn)
    x = eg.tensor(np.arange(16.0).reshape(4, 4) / 10)
    y, z = f(x)
    want_y, want_z = fn(x)
    np.testing.assert_allclose(y.numpy(), want_y.numpy())
    np.testing.assert_allclose(z.numpy(), want_z.numpy())
    kept = y.numpy().copy()
    f(eg.ones((4, 4)))
    np.testing.assert_array_equal(y.numpy(), kept)


def test_an_update_is_written_in_place_only_after_the_old_value_is_read():
    """A captured tensor's new value goes into its buffer only once nothing reads the old
    one: a product of the old weights computed after the new ones sees the old."""
    w = eg.tensor(np.arange(6.0).reshape(2, 3))

    @eg.jit
    def step(x):
        new = (w - 0.5 * x).exp()
        y = (w @ x.T).sum()                 # the old w, read after `new` exists
        with eg.no_grad():
            w.copy_(new)
        return y
    x = eg.full((2, 3), 2.0)
    for _ in range(2):
        old = w.numpy().copy()
        assert step(x).item() == pytest.approx((old @ x.numpy().T).sum())
        np.testing.assert_allclose(w.numpy(), np.exp(old - 1.0))


def test_updates_of_captured_state_are_written_in_place_like_eager():
    w = eg.tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    buffer = w._data

    @eg.jit
    def step(x):
        loss = (w * x).sum()
        loss.backward()
        with eg.no_grad():
            w.copy_(w - 0.5 * w.grad)
        w.grad = None
        return loss

    for _ in range(3):
        step(eg.ones(2, 3))
    assert w._data is buffer                              # no new array per step
    np.testing.assert_allclose(w.numpy(), np.arange(6.0).reshape(2, 3) - 1.5)
    assert step.stats()[-1]["donated"] == 1

    @eg.jit
    def keep_old(x):
        old = w * 1.0
        with eg.no_grad():
            w.copy_(w + x)
        return old, w
    before = w.numpy().copy()
    old, new = keep_old(eg.ones(2, 3))
    np.testing.assert_allclose(old.numpy(), before)
    np.testing.assert_allclose(new.numpy(), before + 1.0)


def test_ir_prints_and_exports():
    f = eg.jit(lambda q, k, v: eg.scaled_dot_product_attention(q, k, v))
    x = eg.ones(2, 3, 4)
    f(x, x, x)
    text = str(f.ir)
    assert text.startswith("program(") and "matmul" in text and "softmax" in text
    assert f.to_mermaid().startswith("flowchart TD") and "-->" in f.to_mermaid()
    assert f.to_dot().startswith("digraph") and "->" in f.to_dot()
    assert "def program(" in f.source
    names = [s["name"] for s in f.stats()]
    assert names[-1] == "plan_memory" and "fuse_elementwise" in names


# -- the passes, one by one --------------------------------------------------------------------

def _prog(nodes, inputs, outputs, constants=None):
    return Program(inputs=inputs, captures=[], constants=constants or {}, nodes=nodes, outputs=outputs)


def _v(shape=(3,), dtype=np.float64):
    return Value(shape, dtype)


def _run(program, *arrays):
    from engine.compiler.codegen import generate
    from engine.state import get_backend
    return generate(program, get_backend("cpu"))(list(arrays), [])


def test_dce_removes_unused_nodes():
    x, a, b = _v(), _v(), _v()
    p = _prog([Node(R["exp"], (x,), {}, a), Node(R["tanh"], (x,), {}, b)], [x], [b])
    q = dce(p)
    assert [n.op.name for n in q.nodes] == ["tanh"]
    arr = np.array([0.1, 0.2, 0.3])
    np.testing.assert_allclose(_run(q, arr)[0], _run(p, arr)[0])


def test_cse_merges_duplicates_but_not_random_ops():
    x, a, b, c, r1, r2 = _v(), _v(), _v(), _v(), _v(), _v()
    rnd = dict(shape=(3,), dtype=np.dtype(np.float64), device="cpu")
    p = _prog([Node(R["exp"], (x,), {}, a), Node(R["exp"], (x,), {}, b), Node(R["add"], (a, b), {}, c),
               Node(R["random_normal"], (), rnd, r1), Node(R["random_normal"], (), rnd, r2)],
              [x], [c, r1, r2])
    q = cse(p)
    assert [n.op.name for n in q.nodes] == ["exp", "add", "random_normal", "random_normal"]
    assert q.nodes[1].inputs == (a, a)
    out = _run(q, np.ones(3))
    np.testing.assert_allclose(out[0], 2 * np.e)
    assert not np.array_equal(out[1], out[2])


def test_constant_fold_evaluates_constant_subgraphs():
    x, k, e, y = _v(), _v(), _v(), _v()
    full = dict(shape=(3,), value=2.0, dtype=np.dtype(np.float64), device="cpu")
    p = _prog([Node(R["full"], (), full, k), Node(R["exp"], (k,), {}, e), Node(R["mul"], (x, e), {}, y)],
              [x], [y])
    from engine.state import get_backend
    q = constant_fold(p, get_backend("cpu"))
    assert [n.op.name for n in q.nodes] == ["mul"]
    np.testing.assert_allclose(q.constants[e], np.exp(2.0))
    np.testing.assert_allclose(_run(q, np.ones(3))[0], np.exp(2.0))


def test_simplify_identities_and_chains():
    x = _v((2, 3))
    a, b, c, d, e, f = _v((2, 3)), _v((3, 2)), _v((2, 3)), _v((6,)), _v((3, 2)), _v((2, 3))
    p = _prog([Node(R["mul"], (x, 1), {}, a),
               Node(R["transpose"], (a,), {"axes": (1, 0)}, b),
               Node(R["transpose"], (b,), {"axes": (1, 0)}, c),
               Node(R["reshape"], (c,), {"shape": (6,)}, d),
               Node(R["reshape"], (d,), {"shape": (3, 2)}, e),
               Node(R["add"], (c, 0), {}, f)], [x], [e, f])
    q = dce(simplify(p))
    assert [n.op.name for n in q.nodes] == ["reshape"]        # transposes cancel, reshapes chain
    assert q.outputs[1] is x and q.nodes[0].inputs == (x,)   # x*1+0 is x
    arr = np.arange(6.0).reshape(2, 3)
    for u, w in zip(_run(q, arr), _run(p, arr)):
        np.testing.assert_array_equal(u, w)


def test_fusion_groups_single_use_elementwise_chains():
    x, y, a, b, c, s = _v(), _v(), _v(), _v(), _v(), _v(())
    p = _prog([Node(R["mul"], (x, y), {}, a), Node(R["exp"], (a,), {}, b), Node(R["add"], (b, x), {}, c),
               Node(R["sum"], (c,), {"axis": None, "keepdims": False}, s)], [x, y], [s])
    q = fuse_elementwise(p)
    assert len(q.nodes) == 2 and isinstance(q.nodes[0].op, FusedElementwise)
    assert q.nodes[0].op.name == "fused[mul,exp,add]"
    arr1, arr2 = np.array([0.1, 0.2, 0.3]), np.array([1.0, -1.0, 2.0])
    np.testing.assert_allclose(_run(q, arr1, arr2)[0], _run(p, arr1, arr2)[0])


def test_fusion_keeps_values_used_twice():
    x, a, b, c = _v(), _v(), _v(), _v()
    p = _prog([Node(R["exp"], (x,), {}, a), Node(R["tanh"], (a,), {}, b), Node(R["mul"], (a, b), {}, c)],
              [x], [c])
    q = fuse_elementwise(p)
    assert [n.op.name for n in q.nodes] == ["exp", "fused[tanh,mul]"]


def test_memory_plan_reuses_dead_buffers():
    from engine.compiler.codegen import plan_memory
    x = _v((4,))
    vals = [_v((4,)) for _ in range(5)]
    nodes = [Node(R["exp"], (x,), {}, vals[0])]
    for i in range(1, 5):
        nodes.append(Node(R["tanh"], (vals[i - 1],), {}, vals[i]))
    p = _prog(nodes, [x], [vals[-1]])
    slots, stats = plan_memory(p, set(vals))
    assert vals[-1] not in slots                       # outputs escape: never a reused buffer
    assert stats["buffers"] == 2 and stats["reused"] == 2
    np.testing.assert_allclose(_run(p, np.arange(4.0))[0], np.tanh(np.tanh(np.tanh(np.tanh(np.exp(np.arange(4.0)))))))


def test_memory_plan_shares_slots_across_shapes():
    from engine.compiler.codegen import plan_memory
    x = _v((4, 6))
    a, b, c, d = _v((4, 6)), _v((4,)), _v((4,)), _v((4,))
    p = _prog([Node(R["exp"], (x,), {}, a),
               Node(R["sum"], (a,), {"axis": (1,), "keepdims": False}, b),
               Node(R["tanh"], (b,), {}, c),
               Node(R["exp"], (c,), {}, d)], [x], [d])
    slots, stats = plan_memory(p, {a, b, c})
    assert stats["buffers"] == 2 and stats["reused"] == 1     # c (32 bytes) takes a's dead slot
    assert stats["buffer_bytes"] == 4 * 6 * 8 + 4 * 8
    np.testing.assert_allclose(_run(p, np.ones((4, 6)))[0], np.exp(np.tanh(np.full(4, 6 * np.e))))


def test_memory_plan_computes_elementwise_values_in_place():
    from engine.compiler.codegen import plan_memory
    x = _v((4, 4))
    a, b, t, c, d = (_v((4, 4)) for _ in range(5))
    p = _prog([Node(R["exp"], (x,), {}, a),
               Node(R["tanh"], (a,), {}, b),                          # a dies here: b takes its slot
               Node(R["transpose"], (b,), {"axes": (1, 0)}, t),
               Node(R["mul"], (t, b), {}, c),                          # reads b through a view too
               Node(R["exp"], (c,), {}, d)], [x], [d])
    slots, stats = plan_memory(p, {a, b, c}, elementwise={b, c})
    views = stats["views"]
    assert views[slots[b]][0] == views[slots[a]][0]                    # in place
    assert views[slots[c]][0] != views[slots[b]][0]                    # never over a transposed read
    xs = np.arange(16.0).reshape(4, 4) / 16
    bb = np.tanh(np.exp(xs))
    np.testing.assert_allclose(_run(p, xs)[0], np.exp(bb.T * bb))


# -- generated kernels -------------------------------------------------------------------------

def _adam_like(p, m, v):
    return p - 1e-5 * p - 1e-3 * (m / 0.1) / ((v / 0.001).sqrt() + 1e-8)


def test_arithmetic_groups_become_c_kernels_that_match_eager(rng, monkeypatch):
    from engine.compiler import ckernels
    monkeypatch.setattr(ckernels, "MIN_ELEMENTS", 1024)
    if not ckernels.available():
        pytest.skip("no C compiler: fused groups run as NumPy ufunc chains")
    p, m, v = (eg.tensor(np.abs(rng.standard_normal((64, 64))) + 0.1) for _ in range(3))
    j = eg.jit(_adam_like)
    np.testing.assert_allclose(j(p, m, v).numpy(), _adam_like(p, m, v).numpy(), rtol=1e-12)
    assert "# C: fused[" in j.source
    assert j.stats()[-1]["c_kernels"] == 1
    src = j._last.generated.kernel_sources[0]
    assert "sqrt(" in src and "double" in src


def test_c_kernels_handle_broadcast_operands(rng, monkeypatch):
    from engine.compiler import ckernels
    monkeypatch.setattr(ckernels, "MIN_ELEMENTS", 1024)
    x = eg.tensor(rng.standard_normal((64, 48)))
    row = eg.tensor(rng.standard_normal((48,)))
    col = eg.tensor(rng.standard_normal((64, 1)))
    f = lambda x, r, c: (x * r + c) * 0.5 - r
    j = eg.jit(f)
    np.testing.assert_allclose(j(x, row, col).numpy(), f(x, row, col).numpy(), rtol=1e-12)
    assert j.stats()[-1]["c_kernels"] == 1


def test_without_a_c_compiler_fused_groups_fall_back(rng, monkeypatch):
    monkeypatch.setenv("ENGINE_NO_C", "1")
    p, m, v = (eg.tensor(np.abs(rng.standard_normal((64, 64))) + 0.1) for _ in range(3))
    j = eg.jit(_adam_like)
    np.testing.assert_allclose(j(p, m, v).numpy(), _adam_like(p, m, v).numpy(), rtol=1e-12)
    assert "# C:" not in j.source and "_g0_" in j.source


def test_fused_group_cuda_sources_compile_with_nvcc(tmp_path, rng):
    """Every fused group of a training step, printed as CUDA, compiles for sm_90."""
    import shutil
    import subprocess
    from backends.cprint import cuda_translation_unit
    from engine.compiler.codegen import cuda_group_source
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    w = eg.tensor(rng.standard_normal((8, 8)), dtype=eg.float32, requires_grad=True)
    x = eg.tensor(rng.standard_normal((4, 8)), dtype=eg.float32)
    keep = eg.tensor(np.tril(np.ones((4, 8), bool)))

    def step(x):
        h = eg.gelu(x @ w, approximate="tanh")
        masked = eg.softmax(eg.where(keep, h * 0.5, float("-inf")), -1)     # a bool input
        loss = (eg.log_softmax(h, -1) * -1.0).mean() + (eg.sigmoid(h) * eg.relu(h - 0.5)).mean() \
            + (masked * h).mean()
        loss.backward()
        with eg.no_grad():
            w.__isub__(0.1 * w.grad / ((w.grad * w.grad).sqrt() + 1e-8))
        return loss
    j = eg.jit(step)
    j(x)
    groups = [n for n in j.ir.nodes if isinstance(n.op, FusedElementwise)]
    assert len(groups) >= 3
    kernels = []
    assert any(v.dtype == np.dtype(bool) for n in groups for v in n.inputs)
    for i, n in enumerate(groups):
        for dt in (np.float32, np.float64):
            in_dtypes = [v.dtype if v.dtype == np.dtype(bool) else np.dtype(dt) for v in n.inputs]
            kernels.append((f"group{i}_{np.dtype(dt).name}", *cuda_group_source(n.op, dt, in_dtypes)))
    src = tmp_path / "groups.cu"
    src.write_text(cuda_translation_unit(kernels))
    res = subprocess.run([nvcc, "-arch=sm_90", "-c", str(src), "-o", str(tmp_path / "g.o")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[:3000]


def test_jit_transformer_training_step_equals_eager_over_several_steps():
    """A whole Transformer step (forward, loss, backward, AdamW with a tensor step
    count) compiled once: parameters after 3 steps equal the eager run's."""
    from engine import nn
    rng = np.random.default_rng(0)
    src = eg.tensor(rng.integers(1, 12, (3, 5)))
    tgt = eg.tensor(rng.integers(1, 12, (3, 4)))

    def make():
        eg.manual_seed(0)
        m = nn.Seq2SeqTransformer(12, d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                  dim_feedforward=32, dropout=0.0)
        opt = nn.optim.AdamW(m.parameters(), lr=1e-2, capturable=True)

        def step(src, tgt):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(src, tgt[:, :-1]), tgt[:, 1:])
            loss.backward()
            opt.step()
            return loss
        return m, step

    m1, step1 = make()
    eager = [step1(src, tgt).item() for _ in range(3)]
    m2, step2 = make()
    compiled = eg.jit(step2)
    jitted = [compiled(src, tgt).item() for _ in range(3)]
    # The first call starts without .grad and backward accumulates into an existing one,
    # so the second call (with .grad from the first) traces once more; then no more.
    assert compiled.traces == 2
    np.testing.assert_allclose(jitted, eager, rtol=1e-5)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        if n.endswith("k.bias"):
            # softmax ignores a constant added to every score of a row, so the key bias has
            # zero gradient: what backward returns is rounding noise, which Adam scales to
            # full steps of +-lr. Compiled kernels sum in another order: other noise.
            np.testing.assert_array_less(np.abs(b.numpy() - a.numpy()), 2 * 3 * 1e-2, err_msg=n)
            continue
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-6, err_msg=n)


@pytest.mark.parametrize("shapes", [[(64, 96), (64, 1), (64, 1), (96,), (96,)],     # layer-norm-like
                                    [(4, 6, 8), (8,), (6, 8), (4, 6, 1)],          # row, suffix, col
                                    [(2, 64, 48), (2, 1, 48), (1,)]])              # materialised
def test_c_kernels_read_broadcast_inputs_by_row_column_or_suffix(shapes, rng, monkeypatch):
    from engine.compiler import ckernels
    monkeypatch.setattr(ckernels, "MIN_ELEMENTS", 16)
    xs = [eg.tensor(rng.standard_normal(s)) for s in shapes]

    def f(*xs):
        acc = xs[0]
        for k, x in enumerate(xs[1:]):
            acc = acc * x if k % 2 else acc - x
        return eg.tanh(acc) * 2.0 + xs[-1]
    j = eg.jit(f)
    np.testing.assert_allclose(j(*xs).numpy(), f(*xs).numpy(), rtol=1e-13, atol=1e-14)
    if ckernels.available():
        assert j.stats()[-1]["c_kernels"] == 1


def test_where_fuses_with_arithmetic_into_one_kernel(rng, monkeypatch):
    """A mask select between arithmetic (attention: scale, mask, ...) is one C loop; the
    boolean condition is read as bool, -inf and NaN pass through exactly."""
    from engine.compiler import ckernels
    monkeypatch.setattr(ckernels, "MIN_ELEMENTS", 16)
    x = rng.standard_normal((4, 8, 8))
    x[0, 0, 0] = np.nan
    keep = eg.tensor(np.tril(np.ones((8, 8), bool)))
    f = lambda x, keep: eg.where(keep, x * 0.125, float("-inf")) - x * 2.0
    j = eg.jit(f)
    got, want = j(eg.tensor(x), keep).numpy(), f(eg.tensor(x), keep).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-15)
    assert [n.op.name for n in j.ir.nodes] == ["fused[mul,where,mul,sub]"]
    if ckernels.available():
        assert j.stats()[-1]["c_kernels"] == 1 and "unsigned char" in j._last.generated.kernel_sources[0]


@pytest.mark.parametrize("row_op", ["softmax", "log_softmax"])
def test_masked_scaled_softmax_is_one_row_kernel(row_op, rng):
    """Attention's scale, mask and softmax: one C kernel computing each row of the
    masked scores on the stack; fully masked rows, -inf and NaN as in eager mode."""
    from engine.compiler import ckernels
    x = rng.standard_normal((2, 3, 6, 6))
    x[0, 0, 1, 2] = np.nan
    keep = np.tril(np.ones((6, 6), bool))
    keep[3] = False                                            # a fully masked row
    f = lambda x, keep: getattr(eg, row_op)(eg.where(keep, x * 0.125, float("-inf")), -1)
    j = eg.jit(f)
    got, want = j(eg.tensor(x), eg.tensor(keep)).numpy(), f(eg.tensor(x), eg.tensor(keep)).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    ok = np.isfinite(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-13, atol=1e-15)
    assert [n.op.name for n in j.ir.nodes] == [f"{row_op}<fused[mul,where]>"]
    if ckernels.available() and ckernels.vector_math():
        assert j.stats()[-1]["c_kernels"] == 1


def test_layer_norm_backward_runs_as_one_row_kernel(rng):
    """Layer norm's backward (row sums, row scalars, full rows, per-column weights) is
    one row-by-row C kernel; gradients equal eager mode's."""
    from engine.compiler import ckernels
    x = eg.tensor(rng.standard_normal((6, 5, 32)) * 3 + 1, requires_grad=True)
    w = eg.tensor(rng.standard_normal(32), requires_grad=True)
    b = eg.tensor(rng.standard_normal(32), requires_grad=True)
    g = eg.tensor(rng.standard_normal((6, 5, 32)))

    def grads(x, w, b, g):
        return eg.grad(lambda x, w, b: (eg.layer_norm(x, w, b) * g).sum(), argnums=(0, 1, 2))(x, w, b)
    j = eg.jit(grads)
    for got, want in zip(j(x, w, b, g), grads(x, w, b, g)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-11, atol=1e-12)
    if ckernels.available():
        assert "# C: rows[" in j.source


def test_masked_softmax_backward_reads_the_mask_as_repeating_rows(rng):
    """softmax's backward under a causal mask shared by every batch and head: the mask
    is a tile of whole rows in the row kernel; gradients equal eager mode's."""
    x = eg.tensor(rng.standard_normal((2, 3, 8, 8)), requires_grad=True)
    keep = eg.tensor(np.tril(np.ones((8, 8), bool)))
    g = eg.tensor(rng.standard_normal((2, 3, 8, 8)))
    f = eg.grad(lambda x: (eg.softmax(eg.where(keep, x * 0.5, float("-inf")), -1) * g).sum())
    j = eg.jit(f)
    np.testing.assert_allclose(j(x).numpy(), f(x).numpy(), rtol=1e-12, atol=1e-14)
    from engine.compiler import ckernels
    if ckernels.available():
        assert "where" in next(l for l in j.source.splitlines() if "# C: rows[" in l)


def test_row_groups_are_found_and_keep_only_what_is_read_later():
    from engine.compiler.codegen import alias_roots
    from engine.compiler.rows import find_row_groups
    x, g = _v((4, 16)), _v((4, 16))
    s, m, c, sq, out, col, after = (_v((4, 1)), _v((4, 1)), _v((4, 16)), _v((4, 1)), _v((4, 16)), _v((16,)),
                                    _v((16,)))
    nodes = [Node(R["sum"], (x,), {"axis": (1,), "keepdims": True}, s),
             Node(R["div"], (s, 16.0), {}, m),
             Node(R["sub"], (x, m), {}, c),                          # a full row, read only inside
             Node(R["sum"], (c,), {"axis": (1,), "keepdims": True}, sq),
             Node(R["mul"], (c, sq), {}, out),
             Node(R["sum"], (out,), {"axis": (0,), "keepdims": False}, col),   # over all rows
             Node(R["exp"], (col,), {}, after)]                      # reads a column sum: outside
    p = _prog(nodes, [x, g], [out, after])
    (group,) = find_row_groups(p, alias_roots(p))
    assert group.members == [0, 1, 2, 3, 4, 5] and group.inputs == [x]
    assert group.stored == [out, col]                                 # c, s, m, sq stay in the kernel
    a = np.arange(64.0).reshape(4, 16) / 7
    want = (a - a.mean(1, keepdims=True)) * (a - a.mean(1, keepdims=True)).sum(1, keepdims=True)
    got_out, got_after = _run(p, a, np.zeros((4, 16)))
    np.testing.assert_allclose(got_out, want, atol=1e-12)
    np.testing.assert_allclose(got_after, np.exp(want.sum(0)), rtol=1e-12)


@pytest.mark.parametrize("axis", [-1, (0, 1), None])
def test_sums_of_elementwise_groups_fuse_into_one_reduction(axis, rng, monkeypatch):
    from engine.compiler import ckernels
    from engine.compiler.passes import FusedReduction
    monkeypatch.setattr(ckernels, "MIN_ELEMENTS", 1024)
    x = eg.tensor(rng.standard_normal((16, 8, 24)))
    y = eg.tensor(rng.standard_normal((24,)))
    f = lambda x, y: ((x * y + 1.0) * x).sum(axis=axis)
    j = eg.jit(f)
    np.testing.assert_allclose(j(x, y).numpy(), f(x, y).numpy(), rtol=1e-12, atol=1e-12)
    assert [type(n.op) for n in j.ir.nodes] == [FusedReduction]
    if ckernels.available():
        assert j.stats()[-1]["c_kernels"] == 1


def test_reduction_fusion_pass_leaves_shared_values_alone():
    from engine.compiler.passes import FusedReduction, fuse_reductions
    x, a, s, t = _v((4, 3)), _v((4, 3)), _v((4,)), _v((4, 3))
    p = _prog([Node(R["exp"], (x,), {}, a), Node(R["sum"], (a,), {"axis": (1,), "keepdims": False}, s),
               Node(R["mul"], (a, 2.0), {}, t)], [x], [s, t])
    assert fuse_reductions(p).nodes == p.nodes                      # exp's value is used twice
    q = _prog(p.nodes[:2], [x], [s])
    fused = fuse_reductions(q)
    assert len(fused.nodes) == 1 and isinstance(fused.nodes[0].op, FusedReduction)
    arr = np.arange(12.0).reshape(4, 3) / 10
    np.testing.assert_allclose(_run(fused, arr)[0], np.exp(arr).sum(1))


def test_fused_reduction_cuda_sources_compile_with_nvcc(tmp_path):
    import shutil
    import subprocess
    from engine.compiler.codegen import cuda_reduction_standalone
    from engine.compiler.passes import FusedElementwise, FusedReduction
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    group = FusedElementwise([(R["mul"], (("in", 0), ("in", 1))), (R["tanh"], (("step", 0),)),
                              (R["sub"], (("step", 1), ("in", 0)))], 2)
    red = FusedReduction(group, (1,), False, (4, 8))
    src = "".join(cuda_reduction_standalone(f"red_{np.dtype(dt).name}", red, dt)
                  for dt in (np.float32, np.float64))
    (tmp_path / "red.cu").write_text(src)
    res = subprocess.run([nvcc, "-arch=sm_90", "-c", str(tmp_path / "red.cu"), "-o", str(tmp_path / "r.o")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[:3000]


# -- the contract: never stale (see also test_jit_staleness.py) ----------------------------------

def test_values_read_on_the_host_while_tracing_are_guarded_by_version():
    s = eg.tensor(2.0)
    f = eg.jit(lambda x: x * float(s))          # float(s) freezes 2.0 into the program
    x = eg.ones(3)
    np.testing.assert_allclose(f(x).numpy(), 2.0)
    with eg.no_grad():
        s += 1.0
    np.testing.assert_allclose(f(x).numpy(), 3.0)
    assert f.traces == 2


def test_value_checks_run_at_every_compiled_call():
    from engine import nn
    emb = nn.Embedding(5, 3)
    f = eg.jit(lambda i: emb(i))
    shifted = eg.jit(lambda i: emb(i + 1))      # a computed index: checked before the program
    f(eg.tensor([0, 4]))
    shifted(eg.tensor([0, 3]))
    for bad in ([-1, 0], [5, 0]):
        with pytest.raises(eg.ShapeError, match="outside"):
            f(eg.tensor(bad))
    with pytest.raises(eg.ShapeError, match="index 5 is outside"):
        shifted(eg.tensor([4]))
    loss = eg.jit(lambda x, t: nn.functional.cross_entropy(x, t))
    x = eg.randn(2, 4)
    loss(x, eg.tensor([0, 3]))
    for bad in ([0, 4], [-1, 0]):
        with pytest.raises(eg.ShapeError, match="outside"):
            loss(x, eg.tensor(bad))


def test_jitted_backward_accumulates_into_existing_grad_like_eager():
    w = eg.tensor(np.ones(3), requires_grad=True)

    def f(x):
        (w * x).sum().backward()

    x = eg.tensor(np.arange(3.0))
    compiled = eg.jit(f)
    for _ in range(3):
        compiled(x)
    np.testing.assert_allclose(w.grad.numpy(), 3 * np.arange(3.0))
    assert compiled.traces == 2        # without .grad, then with one: no retrace after


def test_gradients_of_arguments_go_to_each_calls_own_arguments():
    """The .grad a compiled backward makes for a tensor argument lands on that call's
    argument (not the one traced); an argument that already has a .grad is refused, as
    the compiled backward would replace it instead of accumulating into it."""
    from ops.errors import TraceError

    def f(x):
        (x * x).sum().backward()

    compiled = eg.jit(f)
    xs = [eg.tensor(np.full(2, float(i + 1)), requires_grad=True) for i in range(3)]
    for x in xs:
        compiled(x)
    assert [x.grad.numpy().tolist() for x in xs] == [[2.0, 2.0], [4.0, 4.0], [6.0, 6.0]]
    with pytest.raises(TraceError, match="argument 0 already has a .grad"):
        compiled(xs[0])
    assert xs[0].grad.numpy().tolist() == [2.0, 2.0]


def test_train_eval_switches_reuse_both_programs():
    from engine import nn
    d = nn.Dropout(0.5)
    f = eg.jit(lambda x: d(x))
    x = eg.ones(1000)
    for _ in range(2):
        d.train()
        assert (f(x).numpy() == 0).any()
        d.eval()
        np.testing.assert_array_equal(f(x).numpy(), x.numpy())
    assert f.traces == 2


def test_only_the_program_in_use_keeps_its_buffers():
    """Switching programs (train -> eval) gives the idle program's buffer sets back, so
    a program left behind never holds a second set of activations."""
    from engine import nn
    d = nn.Dropout(0.5)
    f = eg.jit(lambda x: d((x * 2.0 + 1.0).exp() * x).sum())
    x = eg.ones(1000)
    d.train()
    f(x)
    d.eval()
    f(x)
    programs = {id(e): e.generated for entries in f._cache.values() for e in entries}
    assert len(programs) == 2
    assert [g for g in programs.values() if g._pool] == [f._last.generated]


def test_guard_failures_are_explained(capsys, monkeypatch):
    from engine import nn
    lin = nn.Linear(2, 2)
    f = eg.jit(lambda x: lin(x))
    f(eg.ones(1, 2))
    assert f.guard.count > 0 and "def failed" in f.guard.source
    monkeypatch.setenv("ENGINE_DEBUG", "1")
    lin.weight = nn.Parameter(eg.ones(2, 2))
    f(eg.ones(1, 2))
    assert "retrace" in capsys.readouterr().out
