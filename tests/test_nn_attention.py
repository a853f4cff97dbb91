"""MultiheadAttention against a plain-NumPy reference and torch.nn.MultiheadAttention,
masks (bool / additive / padding / causal, fully masked rows), gradchecks and errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

import engine as eg
from engine import nn
from engine.errors import DTypeError, ShapeError

B, T, S, E, H = 2, 3, 4, 8, 2


# -- the NumPy reference ------------------------------------------------------------------------

def np_softmax(s):
    m = s.max(-1, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)
    e = np.exp(s - m)
    z = e.sum(-1, keepdims=True)
    return e / np.where(z == 0, 1.0, z)


def np_mha(P, xq, xk, xv, h, blocked=None, additive=None, prefix=""):
    """Attention Is All You Need, section 3.2.2, with weights (in, out)."""
    b, t, e = xq.shape
    s_len, dh = xk.shape[1], e // h

    def proj(x, n, length):
        y = x @ P[f"{prefix}{n}.weight"] + P[f"{prefix}{n}.bias"]
        return y.reshape(b, length, h, dh).transpose(0, 2, 1, 3)

    q, k, v = proj(xq, "q", t), proj(xk, "k", s_len), proj(xv, "v", s_len)
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)
    if additive is not None:
        s = s + additive
    if blocked is not None:
        s = np.where(blocked, -np.inf, s)
    p = np_softmax(s)
    o = (p @ v).transpose(0, 2, 1, 3).reshape(b, t, e)
    return o @ P[f"{prefix}o.weight"] + P[f"{prefix}o.bias"], p


def params_np(module):
    return {k: v.numpy() for k, v in module.state_dict().items()}


@pytest.fixture
def mha():
    eg.manual_seed(0)
    return nn.MultiheadAttention(E, H).double()


def data(seed=0):
    r = np.random.default_rng(seed)
    return r.standard_normal((B, T, E)), r.standard_normal((B, S, E)), r.standard_normal((B, S, E))


def kpm_np():
    m = np.zeros((B, S), bool)
    m[0, -1] = m[1, 1:] = True
    return m


# -- against NumPy ------------------------------------------------------------------------------

def test_parameter_names_and_order_follow_the_spec(mha):
    assert [n for n, _ in mha.named_parameters()] == [
        f"{n}.{w}" for n in "qkvo" for w in ("weight", "bias")]


def test_self_attention_matches_numpy(mha):
    xq, _, _ = data()
    out, w = mha(eg.tensor(xq), need_weights=True, average_attn_weights=False)
    ref, p = np_mha(params_np(mha), xq, xq, xq, H)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(w.numpy(), p, rtol=1e-12, atol=1e-14)
    assert mha(eg.tensor(xq))[1] is None


@pytest.mark.parametrize("case", ["bool2d", "float3d", "bool4d", "padding", "pad+float", "causal+pad"])
def test_masks_match_numpy(mha, case):
    xq, xk, xv = data(1)
    r = np.random.default_rng(2)
    blocked = additive = None
    kw = {}
    if case == "bool2d":
        m = r.random((T, S)) < 0.4
        m[:, 0] = False
        kw["attn_mask"], blocked = eg.tensor(m), m
    elif case == "float3d":
        m = r.standard_normal((B * H, T, S))
        kw["attn_mask"], additive = eg.tensor(m), m.reshape(B, H, T, S)
    elif case == "bool4d":
        m = r.random((B, 1, T, S)) < 0.4
        m[..., 0] = False
        kw["attn_mask"], blocked = eg.tensor(m), m
    elif case == "padding":
        kw["key_padding_mask"], blocked = eg.tensor(kpm_np()), kpm_np()[:, None, None, :]
    elif case == "pad+float":
        m = r.standard_normal((T, S))
        kw["attn_mask"], additive = eg.tensor(m), m
        kw["key_padding_mask"], blocked = eg.tensor(kpm_np()), kpm_np()[:, None, None, :]
    else:
        causal = np.triu(np.ones((T, S), bool), 1 + S - T)
        kw["is_causal"] = True
        kw["key_padding_mask"] = eg.tensor(kpm_np())
        blocked = causal | kpm_np()[:, None, None, :]
    out, w = mha(eg.tensor(xq), eg.tensor(xk), eg.tensor(xv), need_weights=True, **kw)
    ref, p = np_mha(params_np(mha), xq, xk, xv, H, blocked, additive)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(w.numpy(), p.mean(1), rtol=1e-12, atol=1e-14)


def test_causal_mask_helper():
    np.testing.assert_array_equal(nn.causal_mask(3).numpy(), np.triu(np.ones((3, 3), bool), 1))
    # fewer queries than keys: the queries are the last positions (key/value cache decoding)
    np.testing.assert_array_equal(nn.causal_mask(1, 4).numpy(), np.zeros((1, 4), bool))
    np.testing.assert_array_equal(nn.causal_mask(2, 4).numpy(), [[0, 0, 0, 1], [0, 0, 0, 0]])
    with pytest.raises(ShapeError, match="3 queries"):
        nn.causal_mask(3, 2)
    np.testing.assert_array_equal(nn.padding_mask(eg.tensor(np.array([[3, 0, 0]])), 0).numpy(),
                                  [[False, True, True]])


def test_fully_masked_rows_give_zero_weights_and_no_nan(mha):
    xq, xk, _ = data(3)
    kpm = np.zeros((B, S), bool)
    kpm[1] = True                                   # every key of batch element 1 is padding
    q, k = eg.tensor(xq, requires_grad=True), eg.tensor(xk, requires_grad=True)
    out, w = mha(q, k, k, key_padding_mask=eg.tensor(kpm), need_weights=True)
    assert np.all(np.isfinite(out.numpy()))
    np.testing.assert_array_equal(w.numpy()[1], 0.0)
    # attention output is 0 there, so the layer returns just the output bias
    np.testing.assert_allclose(out.numpy()[1], np.broadcast_to(mha.o.bias.numpy(), (T, E)))
    (out * eg.tensor(np.random.default_rng(4).standard_normal(out.shape))).sum().backward()
    for t in [q.grad, k.grad] + [p.grad for p in mha.parameters()]:
        assert np.all(np.isfinite(t.numpy()))
    np.testing.assert_array_equal(q.grad.numpy()[1], 0.0)
    np.testing.assert_array_equal(k.grad.numpy()[1], 0.0)


def test_attention_dropout_only_in_training():
    eg.manual_seed(0)
    m = nn.MultiheadAttention(E, H, dropout=0.5).double()
    x = eg.tensor(data()[0])
    a, wa = m(x, need_weights=True, average_attn_weights=False)
    m.eval()
    b, wb = m(x, need_weights=True, average_attn_weights=False)
    assert np.abs(a.numpy() - b.numpy()).max() > 1e-3
    kept = wa.numpy() != 0
    np.testing.assert_allclose(wa.numpy()[kept], 2 * wb.numpy()[kept], rtol=1e-12)
    ref, _ = np_mha(params_np(m), x.numpy(), x.numpy(), x.numpy(), H)
    np.testing.assert_allclose(b.numpy(), ref, rtol=1e-12, atol=1e-13)


def test_functional_sdpa_bool_mask_means_may_attend():
    r = np.random.default_rng(5)
    q, k, v = (r.standard_normal((2, 3, 4)) for _ in range(3))
    allow = r.random((3, 3)) < 0.6
    allow[:, 0] = True
    out = nn.functional.scaled_dot_product_attention(eg.tensor(q), eg.tensor(k), eg.tensor(v),
                                                     attn_mask=eg.tensor(allow))
    s = np.where(allow, q @ k.transpose(0, 2, 1) / 2.0, -np.inf)
    np.testing.assert_allclose(out.numpy(), np_softmax(s) @ v, rtol=1e-12)
    causal = nn.functional.scaled_dot_product_attention(eg.tensor(q), eg.tensor(k), eg.tensor(v),
                                                        is_causal=True)
    s = np.where(np.tril(np.ones((3, 3), bool)), q @ k.transpose(0, 2, 1) / 2.0, -np.inf)
    np.testing.assert_allclose(causal.numpy(), np_softmax(s) @ v, rtol=1e-12)


# -- gradients ----------------------------------------------------------------------------------

def test_mha_gradcheck_with_masks():
    eg.manual_seed(1)
    m = nn.MultiheadAttention(4, 2).double()
    names = [n for n, _ in m.named_parameters()]
    r = np.random.default_rng(6)
    xq, xk = r.standard_normal((2, 2, 4)), r.standard_normal((2, 3, 4))
    am = eg.tensor(np.array([[False, False, True], [False, False, False]]))
    kpm = eg.tensor(np.array([[False, False, False], [False, True, False]]))

    def f(*args):
        vals = dict(zip(names, args[:len(names)]))
        return nn.functional_call(m, vals, args[-2], args[-1], args[-1], attn_mask=am,
                                  key_padding_mask=kpm)[0]

    assert eg.gradcheck(f, *[p.detach() for p in m.parameters()], eg.tensor(xq), eg.tensor(xk))


# -- against torch ------------------------------------------------------------------------------

def _torch_pair(torch, seed=0, **kw):
    torch.manual_seed(seed)
    tm = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64, **kw)
    with torch.no_grad():
        for p in tm.parameters():
            p.normal_(0, 0.5)                   # also non-zero biases
    ours = nn.MultiheadAttention(E, H, kdim=kw.get("kdim"), vdim=kw.get("vdim")).double()
    nn.load_torch_state_dict(ours, tm.state_dict())
    return tm, ours


@pytest.mark.parametrize("case", ["none", "bool_attn", "float_attn", "padding", "both", "perhead"])
def test_mha_matches_torch_outputs_and_gradients(case):
    torch = pytest.importorskip("torch")
    tm, ours = _torch_pair(torch)
    xq, xk, xv = data(7)
    r = np.random.default_rng(8)
    am = kpm = None
    if case in ("bool_attn", "both"):
        am = r.random((T, S)) < 0.4
        am[:, 0] = False
    if case == "float_attn":
        am = r.standard_normal((B * H, T, S))
    if case in ("padding", "both", "perhead"):
        kpm = kpm_np()
    average = case != "perhead"
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (xq, xk, xv))
    t_out, t_w = tm(tq, tk, tv, key_padding_mask=None if kpm is None else torch.tensor(kpm),
                    attn_mask=None if am is None else torch.tensor(am), need_weights=True,
                    average_attn_weights=average)
    q, k, v = (eg.tensor(a, requires_grad=True) for a in (xq, xk, xv))
    out, w = ours(q, k, v, key_padding_mask=None if kpm is None else eg.tensor(kpm),
                  attn_mask=None if am is None else eg.tensor(am), need_weights=True,
                  average_attn_weights=average)
    np.testing.assert_allclose(out.numpy(), t_out.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w.numpy(), t_w.detach().numpy(), rtol=1e-12, atol=1e-13)
    cot = r.standard_normal(out.shape)
    (t_out * torch.tensor(cot)).sum().backward()
    (out * eg.tensor(cot)).sum().backward()
    for ours_t, theirs in ((q, tq), (k, tk), (v, tv)):
        np.testing.assert_allclose(ours_t.grad.numpy(), theirs.grad.numpy(), rtol=1e-11, atol=1e-12)
    tgrads = nn.convert_torch_state_dict(ours, {n: p.grad for n, p in tm.named_parameters()})
    for n, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), tgrads[n], rtol=1e-11, atol=1e-12, err_msg=n)


def test_mha_with_kdim_vdim_matches_torch():
    torch = pytest.importorskip("torch")
    tm, ours = _torch_pair(torch, kdim=5, vdim=3)
    r = np.random.default_rng(9)
    xq, xk, xv = r.standard_normal((B, T, E)), r.standard_normal((B, S, 5)), r.standard_normal((B, S, 3))
    t_out, _ = tm(*(torch.tensor(a) for a in (xq, xk, xv)))
    out, _ = ours(*(eg.tensor(a) for a in (xq, xk, xv)))
    np.testing.assert_allclose(out.numpy(), t_out.detach().numpy(), rtol=1e-12, atol=1e-12)


# -- errors -------------------------------------------------------------------------------------

def test_mha_errors(mha):
    x = eg.ones(B, T, E, dtype=eg.float64)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        nn.MultiheadAttention(6, 4)
    with pytest.raises(ValueError, match="batch_first=True"):
        nn.MultiheadAttention(8, 2, batch_first=False)
    with pytest.raises(ShapeError, match=r"query must be \(batch, time, 8\), got shape \(3, 8\)"):
        mha(eg.ones(3, E))
    with pytest.raises(ShapeError, match="share the batch size"):
        mha(x, eg.ones(B + 1, S, E, dtype=eg.float64))
    with pytest.raises(ShapeError, match=r"attn_mask of shape \(3, 3\) does not fit"):
        mha(x, eg.ones(B, S, E, dtype=eg.float64), attn_mask=eg.tensor(np.zeros((3, 3), bool)))
    with pytest.raises(ShapeError, match=r"key_padding_mask must be \(batch, key length\) = \(2, 3\)"):
        mha(x, key_padding_mask=eg.tensor(np.zeros((B, 4), bool)))
    with pytest.raises(DTypeError, match="attn_mask must be bool"):
        mha(x, attn_mask=eg.tensor(np.zeros((T, T), np.int64)))
