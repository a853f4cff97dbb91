"""Optimizers, schedules and clipping: hand-computed cases, textbook formulas, torch.optim."""
from __future__ import annotations

import math

import numpy as np
import pytest

import engine as eg
from engine import nn
from engine.errors import GradError

optim = nn.optim


def params_with_grad(values, grads, dtype=np.float64):
    ps = [nn.Parameter(eg.tensor(np.asarray(v, dtype=dtype))) for v in values]
    set_grads(ps, grads)
    return ps


def set_grads(ps, grads):
    for p, g in zip(ps, grads):
        p.grad = eg.tensor(np.asarray(g, dtype=p.dtype))


def run(opt_cls, values, grad_seq, **kw):
    ps = params_with_grad(values, grad_seq[0])
    opt = opt_cls(ps, **kw)
    for g in grad_seq:
        set_grads(ps, g)
        opt.step()
    return [p.numpy() for p in ps]


C = [0.5, 1.0]                   # a constant gradient (loss = C . p)
P0 = [1.0, -2.0]


# -- hand-computed cases --------------------------------------------------------------------------

def test_sgd_hand_computed():
    np.testing.assert_allclose(run(optim.SGD, [P0], [[C]], lr=0.1)[0], [0.95, -2.1], rtol=1e-15)
    # momentum: buf1 = c, buf2 = 1.9c  ->  p2 = p0 - 0.1 * 2.9c
    np.testing.assert_allclose(run(optim.SGD, [P0], [[C]] * 2, lr=0.1, momentum=0.9)[0],
                               [0.855, -2.29], rtol=1e-15)
    # Nesterov: g1 = 1.9c, g2 = c + 0.9 * 1.9c = 2.71c  ->  p2 = p0 - 0.1 * 4.61c
    np.testing.assert_allclose(run(optim.SGD, [P0], [[C]] * 2, lr=0.1, momentum=0.9, nesterov=True)[0],
                               [0.7695, -2.461], rtol=1e-15)
    # weight decay: p1 = p0 - 0.1 (c + 0.1 p0)
    np.testing.assert_allclose(run(optim.SGD, [P0], [[C]], lr=0.1, weight_decay=0.1)[0],
                               [0.94, -2.08], rtol=1e-15)
    # dampening: buf2 = 0.9c + 0.5c = 1.4c  ->  p2 = p0 - 0.1 * 2.4c
    np.testing.assert_allclose(run(optim.SGD, [P0], [[C]] * 2, lr=0.1, momentum=0.9, dampening=0.5)[0],
                               [0.88, -2.24], rtol=1e-15)


def test_adam_and_adamw_hand_computed():
    # with a constant gradient the bias-corrected moments are exactly g and g^2,
    # so every step moves by lr * g / (|g| + eps)
    step = 0.1 * 0.5 / (0.5 + 1e-8)
    got = run(optim.Adam, [[1.0]], [[[0.5]]] * 3, lr=0.1)[0]
    assert got[0] == pytest.approx(1.0 - 3 * step, rel=1e-14)
    # AdamW: decay first, p1 = p0 (1 - lr wd) - step
    got = run(optim.AdamW, [[1.0]], [[[0.5]]], lr=0.1, weight_decay=0.1)[0]
    assert got[0] == pytest.approx(0.99 - step, rel=1e-14)
    # Adam's L2 decay goes into the gradient: g = 0.5 + 0.1 * 1.0
    got = run(optim.Adam, [[1.0]], [[[0.5]]], lr=0.1, weight_decay=0.1)[0]
    assert got[0] == pytest.approx(1.0 - 0.1 * 0.6 / (0.6 + 1e-8), rel=1e-14)


def _textbook_adam(p, grads, lr, b1, b2, eps, wd, decoupled):
    """Algorithm 1 of Kingma & Ba (AdamW: Algorithm 2 of Loshchilov & Hutter)."""
    p = np.array(p, dtype=np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, dtype=np.float64)
        if wd and not decoupled:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * mhat / (np.sqrt(vhat) + eps) - (lr * wd * p if decoupled else 0.0)
    return p


@pytest.mark.parametrize("cls,decoupled,capturable", [(optim.Adam, False, False), (optim.AdamW, True, False),
                                                      (optim.AdamW, True, True)])
def test_adam_matches_textbook_formula(cls, decoupled, capturable):
    r = np.random.default_rng(0)
    p0 = r.standard_normal(6)
    grads = [r.standard_normal(6) for _ in range(7)]
    got = run(cls, [p0], [[g] for g in grads], lr=0.05, betas=(0.8, 0.95), eps=1e-6,
              weight_decay=0.03, capturable=capturable)[0]
    ref = _textbook_adam(p0, grads, 0.05, 0.8, 0.95, 1e-6, 0.03, decoupled)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)


def test_parameters_without_grad_are_skipped_and_state_counts_steps():
    a, b = params_with_grad([[1.0], [2.0]], [[0.1], [0.2]])
    opt = optim.Adam([a, b], lr=0.1)
    opt.step()
    b.grad = None
    opt.step()
    assert opt.state_dict()["state"][0]["step"] == 2 and opt.state_dict()["state"][1]["step"] == 1
    assert b.numpy()[0] == pytest.approx(2.0 - 0.1 * 0.2 / (0.2 + 1e-8), rel=1e-14)


def test_update_happens_in_place_and_bumps_versions():
    (p,) = params_with_grad([[1.0, 2.0]], [[0.1, 0.1]])
    data, version = p._data, p._version[0]
    optim.SGD([p], lr=0.1).step()
    assert p._data is data and p._version[0] > version
    assert eg.is_grad_enabled()


# -- against torch.optim ------------------------------------------------------------------------

TORCH_CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True)),
    ("SGD", dict(lr=0.05, momentum=0.8, dampening=0.3)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, weight_decay=0.05, betas=(0.8, 0.9))),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.02, weight_decay=0.1, eps=1e-6)),
    ("AdamW", dict(lr=0.02, weight_decay=0.1, capturable=True)),
]


@pytest.mark.parametrize("name,kw", TORCH_CASES)
def test_optimizers_match_torch(name, kw):
    torch = pytest.importorskip("torch")
    r = np.random.default_rng(1)
    shapes = [(3, 4), (4,), ()]
    init = [r.standard_normal(s) for s in shapes]
    grads = [[r.standard_normal(s) for s in shapes] for _ in range(6)]
    tps = [torch.tensor(v, requires_grad=True) for v in init]
    tkw = dict(kw)
    if tkw.pop("capturable", False):
        tkw["capturable"] = False                       # same math; torch's needs CUDA/XLA
    topt = getattr(torch.optim, name)([{"params": tps[:2]}, {"params": tps[2:], "lr": 0.003}], **tkw)
    ps = [nn.Parameter(eg.tensor(v)) for v in init]
    opt = getattr(optim, name)([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.003}], **kw)
    for gs in grads:
        for tp, p, g in zip(tps, ps, gs):
            tp.grad = torch.tensor(g)
            p.grad = eg.tensor(g)
        topt.step()
        opt.step()
    for tp, p in zip(tps, ps):
        np.testing.assert_allclose(p.numpy(), tp.detach().numpy(), rtol=1e-13, atol=1e-15)


def test_adamw_float32_matches_torch():
    torch = pytest.importorskip("torch")
    r = np.random.default_rng(2)
    init = r.standard_normal((5, 3)).astype(np.float32)
    tp = torch.tensor(init, requires_grad=True)
    p = nn.Parameter(eg.tensor(init))
    topt, opt = torch.optim.AdamW([tp], lr=1e-3), optim.AdamW([p], lr=1e-3)
    for _ in range(5):
        g = r.standard_normal((5, 3)).astype(np.float32)
        tp.grad, p.grad = torch.tensor(g), eg.tensor(g)
        topt.step()
        opt.step()
    assert p.dtype == np.float32 and opt.state[id(p)]["exp_avg"].dtype == np.float32
    np.testing.assert_allclose(p.numpy(), tp.detach().numpy(), rtol=1e-6, atol=1e-7)


# -- schedules ------------------------------------------------------------------------------------

def test_noam_values():
    assert optim.noam_factor(0, 512, 4000) == optim.noam_factor(1, 512, 4000)
    assert optim.noam_factor(1, 512, 4000) == pytest.approx(512 ** -0.5 * 4000 ** -1.5, rel=1e-15)
    peak = 512 ** -0.5 * 4000 ** -0.5                       # at step == warmup: ~7.0e-4
    assert optim.noam_factor(4000, 512, 4000) == pytest.approx(peak, rel=1e-15)
    assert optim.noam_factor(16000, 512, 4000) == pytest.approx(peak / 2, rel=1e-15)
    assert optim.noam_factor(2000, 512, 4000) == pytest.approx(peak / 2, rel=1e-15)
    with pytest.raises(ValueError, match="warmup_steps must be > 0"):
        optim.noam_factor(1, 512, 0)


def test_warmup_cosine_values():
    f = optim.warmup_cosine_factor
    assert f(0, 10, 110) == 0.0 and f(5, 10, 110) == 0.5 and f(10, 10, 110) == 1.0
    assert f(60, 10, 110) == pytest.approx(0.5, abs=1e-15)
    assert f(110, 10, 110) == pytest.approx(0.0, abs=1e-15)
    assert f(500, 10, 110, min_ratio=0.1) == pytest.approx(0.1)
    assert f(60, 10, 110, min_ratio=0.2) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="warmup_steps <= total_steps"):
        f(0, 20, 10)


def test_schedulers_set_lr_like_torch_lambda_lr():
    torch = pytest.importorskip("torch")
    tp = torch.zeros(1, requires_grad=True)
    topt = torch.optim.SGD([tp], lr=2.0)
    tsched = torch.optim.lr_scheduler.LambdaLR(topt, lambda s: optim.noam_factor(s, 64, 5))
    p = nn.Parameter(eg.zeros(1))
    opt = optim.SGD([p], lr=2.0)
    sched = optim.NoamLR(opt, d_model=64, warmup_steps=5)
    for _ in range(12):
        assert sched.get_last_lr() == pytest.approx(tsched.get_last_lr(), rel=1e-15)
        topt.step()
        opt.step()
        tsched.step()
        sched.step()


def test_scheduler_updates_a_tensor_lr_in_place_and_resumes():
    p = nn.Parameter(eg.zeros(1))
    lr = eg.tensor(0.5)
    opt = optim.AdamW([p], lr=lr)
    sched = optim.WarmupCosineLR(opt, warmup_steps=4, total_steps=10)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == 0.0
    for _ in range(3):
        sched.step()
    assert lr.item() == pytest.approx(0.5 * 3 / 4)
    state = sched.state_dict()
    opt2 = optim.AdamW([nn.Parameter(eg.zeros(1))], lr=0.5)
    sched2 = optim.WarmupCosineLR(opt2, warmup_steps=4, total_steps=10)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    assert opt.state_dict()["param_groups"][0]["lr"] == pytest.approx(0.375)


# -- clipping ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_clip_grad_norm_matches_torch(norm_type):
    torch = pytest.importorskip("torch")
    r = np.random.default_rng(3)
    grads = [r.standard_normal((3, 2)), r.standard_normal(4)]
    tps = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
    ps = params_with_grad([np.zeros(g.shape) for g in grads], grads)
    for tp, g in zip(tps, grads):
        tp.grad = torch.tensor(g)
    t_norm = torch.nn.utils.clip_grad_norm_(tps, 0.5, norm_type=norm_type)
    norm = optim.clip_grad_norm_(ps, 0.5, norm_type=norm_type)
    assert norm.item() == pytest.approx(t_norm.item(), rel=1e-14)
    for tp, p in zip(tps, ps):
        np.testing.assert_allclose(p.grad.numpy(), tp.grad.numpy(), rtol=1e-14)


def test_clip_grad_norm_hand_case_and_errors():
    (p,) = params_with_grad([[0.0, 0.0]], [[3.0, 4.0]])
    assert optim.clip_grad_norm_([p], 10.0).item() == 5.0
    np.testing.assert_allclose(p.grad.numpy(), [3.0, 4.0])          # below the limit: unchanged
    assert optim.clip_grad_norm_(p, 1.0).item() == 5.0
    np.testing.assert_allclose(p.grad.numpy(), [0.6, 0.8], rtol=1e-6)
    p.grad = eg.tensor([np.inf, 0.0])
    with pytest.raises(GradError, match="total norm of the gradients is inf"):
        optim.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    q = nn.Parameter(eg.zeros(2))
    assert optim.clip_grad_norm_([q], 1.0).item() == 0.0             # no gradients at all
    (v,) = params_with_grad([[0.0, 0.0, 0.0]], [[-3.0, 0.5, 2.0]])
    optim.clip_grad_value_([v], 1.0)
    np.testing.assert_array_equal(v.grad.numpy(), [-1.0, 0.5, 1.0])


def test_capturable_adam_shares_step_counts_but_counts_skipped_parameters_apart():
    r = np.random.default_rng(5)
    init = [r.standard_normal((2, 3)), r.standard_normal(3), r.standard_normal(4)]
    runs = {}
    for capturable in (False, True):
        ps = [nn.Parameter(eg.tensor(v)) for v in init]
        opt = optim.AdamW(ps, lr=0.05, capturable=capturable)
        rr = np.random.default_rng(6)
        for step in range(6):
            grads = [rr.standard_normal(v.shape) for v in init]
            set_grads(ps, grads)
            if step in (1, 2):
                ps[1].grad = None                       # skipped: its count must not advance
            opt.step()
        runs[capturable] = (ps, opt)
    for a, b in zip(runs[False][0], runs[True][0]):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-12, atol=1e-14)
    ps, opt = runs[True]
    steps = [opt.state[id(p)]["step"] for p in ps]
    assert [s.item() for s in steps] == [6.0, 4.0, 6.0]
    assert steps[0] is steps[2] and steps[1] is not steps[0]     # one tensor per shared count


# -- state_dict -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=0.01)),
                                     ("AdamW", dict(lr=0.01, capturable=True))])
def test_optimizer_state_dict_resumes_bit_exactly(name, kw):
    r = np.random.default_rng(4)
    init = [r.standard_normal((2, 3)), r.standard_normal(3)]
    grads = [[r.standard_normal(v.shape) for v in init] for _ in range(5)]
    a = [nn.Parameter(eg.tensor(v)) for v in init]
    opt_a = getattr(optim, name)(a, **kw)
    for g in grads[:3]:
        set_grads(a, g)
        opt_a.step()
    b = [nn.Parameter(eg.tensor(p.numpy())) for p in a]
    opt_b = getattr(optim, name)(b, lr=123.0, **{k: v for k, v in kw.items() if k != "lr"})
    opt_b.load_state_dict(opt_a.state_dict())
    assert opt_b.param_groups[0]["lr"] == kw["lr"]
    for g in grads[3:]:
        for ps, opt in ((a, opt_a), (b, opt_b)):
            set_grads(ps, g)
            opt.step()
    for pa, pb in zip(a, b):
        np.testing.assert_array_equal(pa.numpy(), pb.numpy())


def test_optimizer_errors():
    p = nn.Parameter(eg.zeros(2))
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.SGD([], lr=0.1)
    with pytest.raises(TypeError, match="wrap it in a list"):
        optim.SGD(p, lr=0.1)
    with pytest.raises(ValueError, match="appears in more than one place"):
        optim.SGD([p, p], lr=0.1)
    with pytest.raises(GradError, match="non-leaf"):
        optim.SGD([p * 2], lr=0.1)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        optim.Adam([p], lr=-1.0)
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\)"):
        optim.AdamW([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="Nesterov momentum needs"):
        optim.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"unknown options \['momentum'\]"):
        optim.Adam([{"params": [p], "momentum": 0.9}])
    opt = optim.SGD([p], lr=0.1)
    with pytest.raises(ValueError, match="1 parameter groups in the state dict, 2 here"):
        optim.SGD([{"params": [p]}, {"params": [nn.Parameter(eg.zeros(1))]}], lr=0.1).load_state_dict(
            opt.state_dict())


def test_jit_traces_a_training_step_with_capturable_adamw_and_a_schedule():
    if not hasattr(eg, "jit"):
        pytest.skip("engine.jit not available")

    def make():
        eg.manual_seed(0)
        model = nn.CausalLM(11, 8, 2, 1, 16, dropout=0.0)
        opt = optim.AdamW(model.parameters(), lr=eg.tensor(1e-2), capturable=True)
        return model, opt, optim.WarmupCosineLR(opt, 2, 10)

    tokens = eg.tensor(np.random.default_rng(0).integers(0, 11, (2, 6)))

    def losses(compile_step):
        model, opt, sched = make()

        def step(x):
            loss = nn.functional.cross_entropy(model(x[:, :-1]), x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss
        f = eg.jit(step) if compile_step else step
        out = []
        for _ in range(6):
            out.append(f(tokens).item())
            sched.step()
        return out, getattr(f, "traces", 0)

    eager, _ = losses(False)
    compiled, traces = losses(True)
    np.testing.assert_allclose(compiled, eager, rtol=1e-5)
    assert traces == 1 and eager[-1] < eager[0]

    model = nn.Linear(3, 1)
    plain = optim.Adam(model.parameters(), lr=0.1)          # Python step count: refused, not frozen

    def plain_step(x):
        model(x).sum().backward()
        plain.step()
    with pytest.raises(eg.TraceError, match="capturable=True"):
        eg.jit(plain_step)(eg.ones(2, 3))


def test_jit_runs_each_adam_update_as_one_row_kernel():
    """lerp, ema_sq and adam_param of one parameter become one C kernel that reads p, g,
    m, v once and writes p, m, v in place; the trained values equal eager ones."""
    from backends import cbuild
    if not cbuild.available():
        pytest.skip("no C compiler: the jit runs NumPy")
    r = np.random.default_rng(0)
    x = eg.tensor(r.standard_normal((8, 16)).astype(np.float32))
    results = []
    for compiled in (False, True):
        eg.manual_seed(0)
        lin = nn.Linear(16, 12)
        opt = optim.AdamW(lin.parameters(), lr=1e-2, capturable=True)

        def step(x):
            opt.zero_grad()
            loss = (lin(x) ** 2).mean()
            loss.backward()
            opt.step()
            return loss

        f = eg.jit(step) if compiled else step
        for _ in range(3):
            f(x)
        results.append([p.numpy().copy() for p in lin.parameters()])
    kernel = "rows[fused[lerp],fused[ema_sq],fused[adam_param]]"
    assert f.source.count(kernel) == 2                   # weight and bias, one kernel each
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
