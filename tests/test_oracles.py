"""The forward's meaning, against oracles that share no code with the engine: mpmath on
the textbook formulas at a few points (50 digits), and PyTorch when installed. Also the
one attention / one cross-entropy contract: nn calls the ops versions, and the losses
stay finite (and ignored rows inert) whatever the other logits hold."""
from __future__ import annotations


import mpmath
import numpy as np
import pytest

import engine as eg
from engine import nn
import ops
from ops import composite as C

F = nn.functional
mpmath.mp.dps = 50

POINTS = [np.array([[0.5, -1.25, 2.0, 0.0]]), np.array([[3.0, 3.0, -7.5, 1e-3], [-2.0, 0.25, 1.5, -0.75]])]


def _rows(x):
    return [[mpmath.mpf(float(v)) for v in row] for row in x.reshape(-1, x.shape[-1])]


def mp_softmax(row):
    total = mpmath.fsum(mpmath.exp(v) for v in row)
    return [mpmath.exp(v) / total for v in row]


def mp_log_softmax(row):
    lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in row))
    return [v - lse for v in row]


def mp_layer_norm(row, eps=mpmath.mpf("1e-5")):
    n = len(row)
    mu = mpmath.fsum(row) / n
    var = mpmath.fsum((v - mu) ** 2 for v in row) / n
    return [(v - mu) / mpmath.sqrt(var + eps) for v in row]


def mp_gelu(v):
    return v * (1 + mpmath.erf(v / mpmath.sqrt(2))) / 2


def mp_gelu_tanh(v):
    return v * (1 + mpmath.tanh(mpmath.sqrt(2 / mpmath.pi) * (v + mpmath.mpf("0.044715") * v ** 3))) / 2


def _close(ours, ref, tol=1e-12):
    ref = np.array([[float(v) for v in row] for row in ref]).reshape(ours.shape)
    np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("x", POINTS)
@pytest.mark.parametrize("name", ["softmax", "log_softmax", "layer_norm", "logsumexp"])
def test_row_functions_equal_the_textbook_formula_in_mpmath(name, x):
    t = eg.tensor(x, dtype=eg.float64)
    ours = {"softmax": lambda: eg.softmax(t, -1), "log_softmax": lambda: eg.log_softmax(t, -1),
            "layer_norm": lambda: eg.layer_norm(t), "logsumexp": lambda: eg.logsumexp(t, -1)}[name]()
    rows = _rows(x)
    ref = {"softmax": lambda: [mp_softmax(r) for r in rows],
           "log_softmax": lambda: [mp_log_softmax(r) for r in rows],
           "layer_norm": lambda: [mp_layer_norm(r) for r in rows],
           "logsumexp": lambda: [[mpmath.log(mpmath.fsum(mpmath.exp(v) for v in r))] for r in rows]}[name]()
    _close(ours.numpy(), ref)
    # the composite decomposition (the fused op's reference) means the same
    comp = {"softmax": C.softmax, "log_softmax": C.log_softmax, "logsumexp": C.logsumexp,
            "layer_norm": C.layer_norm}[name]
    _close((comp(t) if name == "layer_norm" else comp(t, -1)).numpy(), ref)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_equals_the_textbook_formula_in_mpmath(approximate):
    x = np.array([-3.0, -0.5, 0.0, 0.125, 1.0, 2.5])
    ours = eg.gelu(eg.tensor(x, dtype=eg.float64), approximate=approximate).numpy()
    f = mp_gelu if approximate == "none" else mp_gelu_tanh
    _close(ours, [[f(mpmath.mpf(float(v))) for v in x]])


def test_attention_equals_the_textbook_formula_in_mpmath():
    r = np.random.default_rng(0)
    q, k, v = r.standard_normal((3, 2)), r.standard_normal((4, 2)), r.standard_normal((4, 3))
    allowed = np.tril(np.ones((3, 4), bool), 1)
    ours = C.scaled_dot_product_attention(*(eg.tensor(a, dtype=eg.float64) for a in (q, k, v)),
                                          mask=eg.tensor(allowed)).numpy()
    ref = []
    for i in range(3):
        scores = [mpmath.fsum(mpmath.mpf(float(q[i, d])) * mpmath.mpf(float(k[j, d]))
                              for d in range(2)) / mpmath.sqrt(2) for j in range(4) if allowed[i, j]]
        p = mp_softmax(scores)
        keys = [j for j in range(4) if allowed[i, j]]
        ref.append([mpmath.fsum(pj * mpmath.mpf(float(v[j, c])) for pj, j in zip(p, keys))
                    for c in range(3)])
    _close(ours, ref)


def test_cross_entropy_equals_the_textbook_formula_in_mpmath():
    x, t, s = POINTS[1], np.array([2, 0]), 0.25
    ours = C.cross_entropy(eg.tensor(x, dtype=eg.float64), eg.tensor(t), label_smoothing=s).numpy()
    rows = _rows(x)
    per_row = [-(1 - mpmath.mpf(s)) * mp_log_softmax(r)[ti] - mpmath.mpf(s) / len(r) * mpmath.fsum(mp_log_softmax(r))
               for r, ti in zip(rows, t)]
    _close(np.asarray(ours).reshape(1, 1), [[mpmath.fsum(per_row) / 2]])


# -- against PyTorch ---------------------------------------------------------------------------

def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "layer_norm", "logsumexp", "gelu", "gelu_tanh"])
def test_forward_and_gradient_equal_torch(name):
    torch = _torch()
    x = np.random.default_rng(3).standard_normal((3, 5)) * 2
    g = np.random.default_rng(4).standard_normal((3, 1) if name == "logsumexp" else (3, 5))
    ours_fn = {"softmax": lambda t: eg.softmax(t, -1), "log_softmax": lambda t: eg.log_softmax(t, -1),
               "layer_norm": lambda t: eg.layer_norm(t), "logsumexp": lambda t: C.logsumexp(t, -1, keepdims=True),
               "gelu": eg.gelu, "gelu_tanh": lambda t: eg.gelu(t, approximate="tanh")}[name]
    torch_fn = {"softmax": lambda t: torch.softmax(t, -1), "log_softmax": lambda t: torch.log_softmax(t, -1),
                "layer_norm": lambda t: torch.nn.functional.layer_norm(t, (5,)),
                "logsumexp": lambda t: torch.logsumexp(t, -1, keepdim=True),
                "gelu": torch.nn.functional.gelu,
                "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}[name]
    t = eg.tensor(x, dtype=eg.float64, requires_grad=True)
    out = ours_fn(t)
    (out * eg.tensor(g)).sum().backward()
    tt = torch.tensor(x, requires_grad=True)
    tout = torch_fn(tt)
    (tout * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(t.grad.numpy(), tt.grad.numpy(), rtol=1e-9, atol=1e-12)


def _torch_ce(torch, x, t, **kw):
    tx = torch.tensor(x, requires_grad=True)
    logits = tx.movedim(-1, 1) if x.ndim > 2 else tx          # torch: classes on axis 1
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(t), **kw)
    loss.sum().backward()
    return loss.detach().numpy(), tx.grad.numpy()


@pytest.mark.parametrize("shape", [(6,), (2, 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_cross_entropy_equals_torch(shape, reduction, smoothing, ignore_index):
    torch = _torch()
    r = np.random.default_rng(5)
    x = r.standard_normal(shape + (4,)) * 3
    t = r.integers(0, 4, shape)
    t.reshape(-1)[1] = ignore_index if ignore_index < 0 else t.reshape(-1)[1]
    ref, ref_grad = _torch_ce(torch, x, t, ignore_index=ignore_index, reduction=reduction,
                              label_smoothing=smoothing)
    tx = eg.tensor(x, dtype=eg.float64, requires_grad=True)
    loss = F.cross_entropy(tx, eg.tensor(t), ignore_index=ignore_index, label_smoothing=smoothing,
                           reduction=reduction)
    loss.sum().backward()
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(tx.grad.numpy(), ref_grad, rtol=1e-9, atol=1e-12)


def test_minus_inf_classes_match_torch_without_smoothing():
    torch = _torch()
    x = np.array([[1.0, -np.inf, 0.5], [-np.inf, 2.0, -np.inf]])
    t = np.array([0, 1])
    ref, ref_grad = _torch_ce(torch, x, t)
    tx = eg.tensor(x, dtype=eg.float64, requires_grad=True)
    loss = F.cross_entropy(tx, eg.tensor(t))
    loss.backward()
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(tx.grad.numpy(), ref_grad, rtol=1e-12, atol=1e-15)


# -- finite losses, inert ignored rows ---------------------------------------------------------

LOSSES = {"cross_entropy": lambda x, t, **kw: F.cross_entropy(x, t, **kw),
          "nll_loss": lambda x, t, **kw: F.nll_loss(eg.log_softmax(x, -1), t, **kw)}
# nll_loss's input is log-probabilities: a leaf here, so its own gradient is what is seen
INPUTS = {"cross_entropy": lambda x: x,
          "nll_loss": lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
          - x.max(-1, keepdims=True)}
DIRECT = {"cross_entropy": F.cross_entropy, "nll_loss": F.nll_loss}


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_loss_is_finite_when_only_other_logits_are_minus_inf(loss, smoothing):
    x = np.array([[1.0, -np.inf, 0.5, -np.inf], [0.25, 2.0, -np.inf, 1.0]])
    t = np.array([0, 3])
    tx = eg.tensor(x, dtype=eg.float64, requires_grad=True)
    out = LOSSES[loss](tx, eg.tensor(t), label_smoothing=smoothing)
    out.backward()
    assert np.isfinite(out.item()) and np.isfinite(tx.grad.numpy()).all()
    # the value: a -inf class has probability 0, and smoothing leaves it out
    finite = np.where(np.isinf(x), -np.inf, x)
    logp = finite - np.log(np.exp(finite).sum(-1, keepdims=True))
    nll = -logp[np.arange(2), t]
    uniform = -np.where(np.isinf(logp), 0.0, logp).sum(-1) / 4
    np.testing.assert_allclose(out.item(), np.mean((1 - smoothing) * nll + smoothing * uniform),
                               rtol=1e-12)
    assert (tx.grad.numpy()[np.isinf(x)] == 0).all()


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_an_ignored_row_never_changes_the_loss_or_gradients(loss, smoothing, poison, reduction):
    r = np.random.default_rng(7)
    x = r.standard_normal((4, 5))
    t = np.array([1, -100, 4, 0])
    bad = x.copy()
    bad[1] = poison
    bad[1, 2] = 0.0                                  # not all of the row: also a mixed row
    with np.errstate(invalid="ignore"):
        x, bad = INPUTS[loss](x), INPUTS[loss](bad)
    clean = eg.tensor(np.delete(x, 1, 0), dtype=eg.float64, requires_grad=True)
    ref = DIRECT[loss](clean, eg.tensor(np.delete(t, 1)), label_smoothing=smoothing, reduction=reduction)
    ref.backward()
    tx = eg.tensor(bad, dtype=eg.float64, requires_grad=True)
    out = DIRECT[loss](tx, eg.tensor(t), label_smoothing=smoothing, reduction=reduction)
    out.backward()
    np.testing.assert_allclose(out.item(), ref.item(), rtol=1e-12)
    grad = tx.grad.numpy()
    assert (grad[1] == 0).all()                      # exactly 0: nothing NaN flows upstream
    np.testing.assert_allclose(np.delete(grad, 1, 0), clean.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_ignored_rows_are_inert_under_the_jit_too():
    x = np.random.default_rng(8).standard_normal((3, 4)).astype(np.float32)
    w = eg.tensor(np.eye(4, dtype=np.float32), requires_grad=True)
    poison = np.zeros((3, 4), np.float32)
    poison[0] = np.nan                               # the ignored row's logits turn NaN
    data, target = eg.tensor(x), eg.tensor(np.array([-100, 1, 2]))

    def step(xs, ts):
        w.grad = None
        loss = F.cross_entropy(xs @ w + eg.tensor(poison), ts, label_smoothing=0.1)
        loss.backward()
        return loss, w.grad

    for f in (step, eg.jit(step)):
        loss, grad = f(data, target)
        assert np.isfinite(loss.item()) and np.isfinite(grad.numpy()).all()


# -- nn calls the ops versions ---------------------------------------------------------------

def test_nn_attention_and_losses_run_through_the_ops_functions(monkeypatch):
    calls = []
    for name in ("attention", "cross_entropy", "nll_loss"):
        real = getattr(C, name)
        monkeypatch.setattr(C, name, lambda *a, _real=real, _name=name, **kw:
                            calls.append(_name) or _real(*a, **kw))
    assert not hasattr(F, "attend")
    mha = nn.MultiheadAttention(4, 2)
    x = eg.randn(1, 3, 4)
    mha(x, is_causal=True)
    layer = nn.TransformerDecoderLayer(4, 2, 8, dropout=0.0)
    layer(x, x, tgt_is_causal=True)
    F.scaled_dot_product_attention(x, x, x, is_causal=True)
    F.cross_entropy(x, eg.tensor(np.array([[0, 1, 2]])))
    F.nll_loss(x, eg.tensor(np.array([[0, 1, 2]])))
    assert calls.count("attention") == 4 and "cross_entropy" in calls and "nll_loss" in calls


@pytest.mark.parametrize("case", ["causal", "padding", "both"])
def test_mask_conventions_are_converted_at_the_api(case):
    """MultiheadAttention (True = blocked) and scaled_dot_product_attention (True = may
    attend) give the same as the ops attention with the may-attend mask."""
    r = np.random.default_rng(2)
    q, k, v = (eg.tensor(r.standard_normal((1, 2, 3, 2))) for _ in range(3))
    blocked = np.triu(np.ones((3, 3), bool), 1) if case != "padding" else np.zeros((3, 3), bool)
    if case != "causal":
        blocked = blocked | np.array([False, False, True])
    ref = C.attention(q, k.swapaxes(-1, -2), v, eg.tensor(~blocked))[0].numpy()
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=eg.tensor(~blocked)).numpy()
    np.testing.assert_allclose(sdpa, ref, rtol=1e-6)
    mha = nn.MultiheadAttention(4, 2)
    x = eg.tensor(r.standard_normal((1, 3, 4)).astype(np.float32))
    out_blocked = mha(x, attn_mask=eg.tensor(blocked))[0].numpy()
    out_float = mha(x, attn_mask=eg.tensor(np.where(blocked, -np.inf, 0.0).astype(np.float32)))[0].numpy()
    np.testing.assert_allclose(out_blocked, out_float, rtol=1e-5, atol=1e-6)
    if case == "causal":
        np.testing.assert_allclose(mha(x, is_causal=True)[0].numpy(), out_blocked, rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_softplus_gradient_keeps_its_relative_precision_in_float32(jit):
    """d softplus/dx = sigmoid(x), against mpmath: written as 1 - exp(-softplus(x)) it
    cancels in float32 (2e-4 off at x = -8, 17 % at -15, 0 at -20); arrays long enough
    that the jit prints its C kernel."""
    from engine.compiler import ckernels
    points = np.array([-20.0, -15.0, -8.1, -1.0, 0.0, 2.0, 15.0], np.float32)
    x = eg.tensor(np.tile(points, -(-ckernels.MIN_ELEMENTS // points.size)))
    g = eg.grad(lambda x: eg.softplus(x).sum())
    got = (eg.jit(g) if jit else g)(x).numpy()[:points.size]
    want = np.array([float(1 / (1 + mpmath.exp(-mpmath.mpf(float(p))))) for p in points])
    np.testing.assert_allclose(got, want, rtol=1e-6)


SOFTPLUS_POINTS = [-100.0, -40.0, -20.0, -17.0, -8.0, -1.0, 0.0, 1.0, 8.0, 20.0, 40.0, 100.0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("jit", [False, True])
def test_softplus_keeps_its_relative_precision_far_below_zero(jit, dtype):
    """softplus(x) against mpmath's log(1 + exp(x)) at 80 digits (50 leave exp(-100) only 6
    in 1 + exp(-100)), and the op's own mpmath reference. As max(x, 0) + log(1 + exp(-|x|))
    it was 0 once 1 + exp(-|x|) rounds to 1 (x < -17 in float32, where softplus(-20) is
    2.06e-9; x < -37 in float64); log1p keeps the digits. A short array (NumPy), and one
    long enough that eager and the jit run their printed C kernels. exp(-100) is subnormal
    in float32: there the value is right to its last bit."""
    from backends import cbuild, eager_kernels
    from engine.compiler import ckernels
    points = np.array(SOFTPLUS_POINTS, dtype)
    with mpmath.workdps(80):
        want = np.array([float(mpmath.log(1 + mpmath.exp(mpmath.mpf(p)))) for p in SOFTPLUS_POINTS])
    tol = dict(rtol=1e-6, atol=np.finfo(np.float32).smallest_subnormal) if dtype == np.float32 \
        else dict(rtol=1e-12, atol=0)
    np.testing.assert_allclose(ops.REGISTRY["softplus"].reference(points.astype(np.float64)), want,
                               rtol=1e-15)
    n = max(ckernels.MIN_ELEMENTS, eager_kernels.MIN_ELEMENTS)
    long = eg.tensor(np.tile(points, -(-n // points.size)))
    if jit:
        j = eg.jit(lambda x: eg.softplus(x))
        got = j(long).numpy()
        assert j.stats()[-1]["c_kernels"] == (ckernels.available() and ckernels.vector_math())
        runs = [got]
    else:
        calls = eager_kernels.kernel_calls()
        runs = [eg.softplus(eg.tensor(points)).numpy(), eg.softplus(long).numpy()]
        assert eager_kernels.kernel_calls() == calls + (cbuild.available() and cbuild.vector_math())
    for got in runs:
        assert got.dtype == dtype
        np.testing.assert_allclose(got[:points.size], want, **tol)


# -- pow's gradients at a zero (or negative) base ----------------------------------------------

# (x, y, d(x**y)/dx, d(x**y)/dy) as PyTorch defines them: the textbook y * x**(y - 1) and
# x**y * log(x), except 0 where y == 0 (d/dx: x**0 is constant) and where x == 0 <= y
# (d/dy: 0**y is constant there). Unmasked, those were 0 * inf and 0 * -inf: NaN.
# A negative base keeps log(x) = NaN in d/dy, as PyTorch's does.
POW_POINTS = [
    (0.0, 0.0, 0.0, 0.0), (0.0, 0.5, np.inf, 0.0), (0.0, 1.0, 1.0, 0.0), (0.0, 2.0, 0.0, 0.0),
    (0.0, 3.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0), (2.0, 0.0, 0.0, float(np.log(2.0))),
    (-2.0, 0.0, 0.0, np.nan), (-2.0, 2.0, -4.0, np.nan), (-2.0, 3.0, 12.0, np.nan),
    (0.0, -1.0, -np.inf, -np.inf), (0.0, -2.0, -np.inf, -np.inf), (0.0, -0.5, -np.inf, -np.inf),
    (-0.0, 2.0, -0.0, 0.0), (-0.0, -1.0, -np.inf, np.inf),
]


def _pow_grads(dtype, jit: bool) -> tuple[np.ndarray, np.ndarray]:
    """(d/dx, d/dy) of sum(x ** y) at POW_POINTS; under the jit on arrays long enough
    that it prints its fused groups as C kernels."""
    from engine.compiler import ckernels
    x, y = (np.array([p[k] for p in POW_POINTS], dtype) for k in (0, 1))
    reps = -(-ckernels.MIN_ELEMENTS // x.size) if jit else 1
    g = eg.grad(lambda a, b: (a ** b).sum(), argnums=(0, 1))
    with np.errstate(all="ignore"):
        gx, gy = (eg.jit(g) if jit else g)(eg.tensor(np.tile(x, reps)), eg.tensor(np.tile(y, reps)))
    return gx.numpy()[:x.size], gy.numpy()[:x.size]


def _same_values(got: np.ndarray, want: np.ndarray, dtype) -> None:
    """Equal NaNs and infinities, finite values to rounding."""
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.where(np.isinf(got), got, 0), np.where(np.isinf(want), want, 0))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6 if dtype == np.float32 else 1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("jit", [False, True])
def test_pow_gradients_at_a_zero_base_are_pytorchs(jit, dtype):
    """No silent NaN: d(0**y)/dy = 0 for y >= 0 and d(x**0)/dx = 0 at x = 0 (values
    written from the math above, no PyTorch needed)."""
    gx, gy = _pow_grads(dtype, jit)
    assert gx.dtype == gy.dtype == dtype
    _same_values(gx, np.array([p[2] for p in POW_POINTS]), dtype)
    _same_values(gy, np.array([p[3] for p in POW_POINTS]), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("jit", [False, True])
def test_pow_gradients_at_a_zero_base_equal_torch(jit, dtype):
    torch = _torch()
    x, y = (torch.tensor([p[k] for p in POW_POINTS], dtype=getattr(torch, np.dtype(dtype).name),
                         requires_grad=True) for k in (0, 1))
    tx, ty = (t.numpy() for t in torch.autograd.grad((x ** y).sum(), (x, y)))
    gx, gy = _pow_grads(dtype, jit)
    _same_values(gx, tx, dtype)
    _same_values(gy, ty, dtype)
