"""Transformer layers, stacks and models: NumPy reference, torch.nn equality, end-to-end
gradcheck through the loss, masks proven by perturbation, the benchmark spec's models."""
from __future__ import annotations

import math

import numpy as np
import pytest

import engine as eg
from engine import nn
from engine.errors import DTypeError, ShapeError

F = nn.functional
D, H, FF = 8, 2, 16


# -- the NumPy reference ------------------------------------------------------------------------

def np_softmax(s):
    m = s.max(-1, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)
    e = np.exp(s - m)
    z = e.sum(-1, keepdims=True)
    return e / np.where(z == 0, 1.0, z)


def np_mha(P, pre, xq, xkv, h, blocked=None):
    b, t, e = xq.shape
    s_len, dh = xkv.shape[1], e // h

    def proj(x, n, length):
        return (x @ P[f"{pre}{n}.weight"] + P[f"{pre}{n}.bias"]).reshape(
            b, length, h, dh).transpose(0, 2, 1, 3)

    q, k, v = proj(xq, "q", t), proj(xkv, "k", s_len), proj(xkv, "v", s_len)
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)
    if blocked is not None:
        s = np.where(blocked, -np.inf, s)
    o = (np_softmax(s) @ v).transpose(0, 2, 1, 3).reshape(b, t, e)
    return o @ P[f"{pre}o.weight"] + P[f"{pre}o.bias"]


def np_ln(P, pre, x, eps=1e-5):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * P[pre + "weight"] + P[pre + "bias"]


def np_ff(P, pre, x):
    hdn = np.maximum(x @ P[pre + "linear1.weight"] + P[pre + "linear1.bias"], 0)
    return hdn @ P[pre + "linear2.weight"] + P[pre + "linear2.bias"]


def np_encoder_layer(P, pre, x, h, norm_first=False, blocked=None):
    def sa(y):
        return np_mha(P, pre + "self_attn.", y, y, h, blocked)
    if norm_first:
        x = x + sa(np_ln(P, pre + "norm1.", x))
        return x + np_ff(P, pre, np_ln(P, pre + "norm2.", x))
    x = np_ln(P, pre + "norm1.", x + sa(x))
    return np_ln(P, pre + "norm2.", x + np_ff(P, pre, x))


def np_decoder_layer(P, pre, y, mem, h, norm_first=False, self_blocked=None, mem_blocked=None):
    def sa(z):
        return np_mha(P, pre + "self_attn.", z, z, h, self_blocked)

    def ca(z):
        return np_mha(P, pre + "multihead_attn.", z, mem, h, mem_blocked)
    if norm_first:
        y = y + sa(np_ln(P, pre + "norm1.", y))
        y = y + ca(np_ln(P, pre + "norm2.", y))
        return y + np_ff(P, pre, np_ln(P, pre + "norm3.", y))
    y = np_ln(P, pre + "norm1.", y + sa(y))
    y = np_ln(P, pre + "norm2.", y + ca(y))
    return np_ln(P, pre + "norm3.", y + np_ff(P, pre, y))


def params_np(module):
    return {k: v.numpy() for k, v in module.state_dict().items()}


def randomize_(module, seed=0, std=0.5):
    """Non-trivial values everywhere (biases and LayerNorm gains included)."""
    r = np.random.default_rng(seed)
    with eg.no_grad():
        for p in module.parameters():
            p[...] = eg.tensor(r.standard_normal(p.shape) * std + (1.0 if p.ndim == 1 else 0.0),
                               dtype=p.dtype)
    return module


def causal_np(t):
    return np.triu(np.ones((t, t), bool), 1)


# -- layers against NumPy -----------------------------------------------------------------------

@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_matches_numpy(norm_first):
    eg.manual_seed(0)
    layer = randomize_(nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, norm_first=norm_first).double())
    x = np.random.default_rng(1).standard_normal((2, 5, D))
    kpm = np.zeros((2, 5), bool)
    kpm[1, 3:] = True
    out = layer(eg.tensor(x), src_key_padding_mask=eg.tensor(kpm), is_causal=True)
    blocked = causal_np(5) | kpm[:, None, None, :]
    ref = np_encoder_layer(params_np(layer), "", x, H, norm_first, blocked)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_numpy(norm_first):
    eg.manual_seed(0)
    layer = randomize_(nn.TransformerDecoderLayer(D, H, FF, dropout=0.0, norm_first=norm_first).double())
    r = np.random.default_rng(2)
    y, mem = r.standard_normal((2, 4, D)), r.standard_normal((2, 6, D))
    mkpm = np.zeros((2, 6), bool)
    mkpm[0, 4:] = True
    out = layer(eg.tensor(y), eg.tensor(mem), memory_key_padding_mask=eg.tensor(mkpm),
                tgt_is_causal=True)
    ref = np_decoder_layer(params_np(layer), "", y, mem, H, norm_first, causal_np(4),
                           mkpm[:, None, None, :])
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-11, atol=1e-12)


def test_parameter_order_follows_the_benchmark_spec():
    enc = nn.TransformerEncoderLayer(D, H, FF)
    dec = nn.TransformerDecoderLayer(D, H, FF)
    mha = [f"{a}.{n}.{w}" for a in ["self_attn"] for n in "qkvo" for w in ("weight", "bias")]
    lin = [f"linear{i}.{w}" for i in (1, 2) for w in ("weight", "bias")]

    def ln(i):
        return [f"norm{i}.weight", f"norm{i}.bias"]
    assert [n for n, _ in enc.named_parameters()] == mha + ln(1) + lin + ln(2)
    cross = [m.replace("self_attn", "multihead_attn") for m in mha]
    assert [n for n, _ in dec.named_parameters()] == mha + ln(1) + cross + ln(2) + lin + ln(3)


@pytest.mark.parametrize("norm_first", [False, True])
def test_layers_gradcheck(norm_first):
    """float64 gradcheck of both layer kinds w.r.t. every parameter and the inputs."""
    eg.manual_seed(9)
    r = np.random.default_rng(9)
    x, mem = eg.tensor(r.standard_normal((2, 3, 4))), eg.tensor(r.standard_normal((2, 2, 4)))
    kpm = eg.tensor(np.array([[False, False], [False, True]]))
    for layer in (nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, norm_first=norm_first),
                  nn.TransformerDecoderLayer(4, 2, 6, dropout=0.0, norm_first=norm_first)):
        layer.double()
        names = [n for n, _ in layer.named_parameters()]
        decoder = isinstance(layer, nn.TransformerDecoderLayer)

        def f(*args, layer=layer, names=names, decoder=decoder):
            vals = dict(zip(names, args[:len(names)]))
            if decoder:
                return nn.functional_call(layer, vals, args[-2], args[-1], tgt_is_causal=True,
                                          memory_key_padding_mask=kpm)
            return nn.functional_call(layer, vals, args[-1], is_causal=True)

        inputs = (x, mem) if decoder else (x,)
        assert eg.gradcheck(f, *[p.detach() for p in layer.parameters()], *inputs)


def test_transformer_embedding_options():
    eg.manual_seed(10)
    tokens = eg.tensor(np.array([[1, 2, 3]]))
    plain = nn.TransformerEmbedding(5, 4, positional="none", scale=False)
    np.testing.assert_array_equal(plain(tokens).numpy(), plain.weight.numpy()[[1, 2, 3]][None])
    scaled = nn.TransformerEmbedding(5, 4, max_len=8, scale=3.0)
    ref = scaled.weight.numpy()[[1, 2, 3]] * 3.0 + nn.sinusoidal_table(8, 4)[1:4].astype(np.float32)
    np.testing.assert_allclose(scaled(tokens, offset=1).numpy()[0], ref, rtol=1e-6)
    assert abs(nn.TransformerEmbedding(50, 64).weight.numpy().std() - 64 ** -0.5) < 0.01
    learned = nn.TransformerEmbedding(5, 4, positional="learned", norm=True)
    assert [n for n, _ in learned.named_parameters()] == ["token.weight", "pos.weight", "norm.weight",
                                                          "norm.bias"]
    with pytest.raises(ShapeError, match=r"tokens must be \(batch, time\)"):
        plain(eg.tensor(np.array([1, 2])))


# -- layers and the whole Transformer against torch.nn --------------------------------------------

def _compare_grads(torch_module, ours, rtol=1e-10, atol=1e-11):
    tgrads = nn.convert_torch_state_dict(ours, {n: p.grad for n, p in torch_module.named_parameters()})
    for n, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), tgrads[n], rtol=rtol, atol=atol, err_msg=n)


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_encoder_layer_matches_torch(norm_first, activation):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    tl = torch.nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, activation=activation,
                                          batch_first=True, norm_first=norm_first, dtype=torch.float64)
    layer = nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, activation=activation,
                                       norm_first=norm_first).double()
    nn.load_torch_state_dict(layer, tl.state_dict())
    r = np.random.default_rng(3)
    x = r.standard_normal((2, 5, D))
    kpm = np.zeros((2, 5), bool)
    kpm[0, 4] = True
    tx, ex = torch.tensor(x, requires_grad=True), eg.tensor(x, requires_grad=True)
    t_out = tl(tx, src_mask=torch.tensor(causal_np(5)), src_key_padding_mask=torch.tensor(kpm))
    out = layer(ex, src_mask=eg.tensor(causal_np(5)), src_key_padding_mask=eg.tensor(kpm))
    np.testing.assert_allclose(out.numpy(), t_out.detach().numpy(), rtol=1e-11, atol=1e-12)
    cot = r.standard_normal(out.shape)
    (t_out * torch.tensor(cot)).sum().backward()
    (out * eg.tensor(cot)).sum().backward()
    np.testing.assert_allclose(ex.grad.numpy(), tx.grad.numpy(), rtol=1e-10, atol=1e-11)
    _compare_grads(tl, layer)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(norm_first):
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    tl = torch.nn.TransformerDecoderLayer(D, H, FF, dropout=0.0, batch_first=True,
                                          norm_first=norm_first, dtype=torch.float64)
    layer = nn.TransformerDecoderLayer(D, H, FF, dropout=0.0, norm_first=norm_first).double()
    nn.load_torch_state_dict(layer, tl.state_dict())
    r = np.random.default_rng(4)
    y, mem = r.standard_normal((2, 4, D)), r.standard_normal((2, 3, D))
    mkpm = np.array([[False, False, True], [False, False, False]])
    ty, tm = (torch.tensor(a, requires_grad=True) for a in (y, mem))
    ey, em = (eg.tensor(a, requires_grad=True) for a in (y, mem))
    t_out = tl(ty, tm, tgt_mask=torch.tensor(causal_np(4)), memory_key_padding_mask=torch.tensor(mkpm))
    out = layer(ey, em, tgt_mask=eg.tensor(causal_np(4)), memory_key_padding_mask=eg.tensor(mkpm))
    np.testing.assert_allclose(out.numpy(), t_out.detach().numpy(), rtol=1e-11, atol=1e-12)
    cot = r.standard_normal(out.shape)
    (t_out * torch.tensor(cot)).sum().backward()
    (out * eg.tensor(cot)).sum().backward()
    np.testing.assert_allclose(ey.grad.numpy(), ty.grad.numpy(), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(em.grad.numpy(), tm.grad.numpy(), rtol=1e-10, atol=1e-11)
    _compare_grads(tl, layer)


def test_whole_transformer_matches_torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(2)
    tt = torch.nn.Transformer(D, H, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=FF,
                              dropout=0.0, batch_first=True, dtype=torch.float64)
    ours = nn.Transformer(D, H, 2, 2, FF, dropout=0.0, final_norm=True).double()
    nn.load_torch_state_dict(ours, tt.state_dict())
    r = np.random.default_rng(5)
    src, tgt = r.standard_normal((2, 5, D)), r.standard_normal((2, 4, D))
    skpm = np.zeros((2, 5), bool)
    skpm[1, 3:] = True
    ts, tg = (torch.tensor(a, requires_grad=True) for a in (src, tgt))
    es, et = (eg.tensor(a, requires_grad=True) for a in (src, tgt))
    t_out = tt(ts, tg, tgt_mask=tt.generate_square_subsequent_mask(4, dtype=torch.float64),
               src_key_padding_mask=torch.tensor(skpm), memory_key_padding_mask=torch.tensor(skpm))
    out = ours(es, et, tgt_is_causal=True, src_key_padding_mask=eg.tensor(skpm),
               memory_key_padding_mask=eg.tensor(skpm))
    np.testing.assert_allclose(out.numpy(), t_out.detach().numpy(), rtol=1e-10, atol=1e-11)
    cot = r.standard_normal(out.shape)
    (t_out * torch.tensor(cot)).sum().backward()
    (out * eg.tensor(cot)).sum().backward()
    np.testing.assert_allclose(es.grad.numpy(), ts.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(et.grad.numpy(), tg.grad.numpy(), rtol=1e-9, atol=1e-10)
    _compare_grads(tt, ours, rtol=1e-9, atol=1e-10)


def test_stacks_copy_a_layer_like_torch_or_take_a_list():
    layer = nn.TransformerEncoderLayer(D, H, FF)
    enc = nn.TransformerEncoder(layer, num_layers=3)
    assert len(enc.layers) == 3 and enc.layers[0] is not layer
    np.testing.assert_array_equal(enc.layers[2].linear1.weight.numpy(), layer.linear1.weight.numpy())
    assert enc.layers[0].linear1.weight is not enc.layers[1].linear1.weight
    own = [nn.TransformerEncoderLayer(D, H, FF) for _ in range(2)]
    assert nn.TransformerEncoder(own).layers[1] is own[1]
    with pytest.raises(ValueError, match="num_layers=3 but 2 layers"):
        nn.TransformerEncoder(own, 3)
    with pytest.raises(ValueError, match="give num_layers"):
        nn.TransformerDecoder(nn.TransformerDecoderLayer(D, H, FF))
    t = nn.Transformer(D, H, 1, 1, FF)
    assert t.encoder.norm is None and t.decoder.norm is None          # post-LN: no final norm
    assert nn.Transformer(D, H, 1, 1, FF, norm_first=True).encoder.norm is not None


def test_transformer_errors():
    t = nn.Transformer(D, H, 1, 1, FF)
    with pytest.raises(ShapeError, match=r"src and tgt must be \(B, S, 8\)"):
        t(eg.ones(2, 3, D), eg.ones(3, 3, D))
    with pytest.raises(ShapeError, match="memory of shape"):
        t.decoder.layers[0](eg.ones(2, 3, D), eg.ones(2, 3, 4))
    m = nn.Seq2SeqTransformer(6, d_model=D, nhead=H, num_encoder_layers=1, num_decoder_layers=1,
                              dim_feedforward=FF)
    with pytest.raises(DTypeError, match="src must be integer token ids"):
        m(eg.ones(2, 3), eg.tensor(np.zeros((2, 3), np.int64)))
    with pytest.raises(ShapeError, match=r"tokens must be \(batch, time\)"):
        nn.CausalLM(6, D, H, 1, FF)(eg.tensor(np.zeros(3, np.int64)))
    with pytest.raises(ValueError, match="share_embeddings needs src_vocab == tgt_vocab"):
        nn.Seq2SeqTransformer(6, 7)
    with pytest.raises(ValueError, match="positional must be one of"):
        nn.CausalLM(6, D, H, 1, FF, positional="rotary")


# -- gradients of whole models ------------------------------------------------------------------

def _tiny_seq2seq(**kw):
    eg.manual_seed(3)
    return nn.Seq2SeqTransformer(6, d_model=D, nhead=H, num_encoder_layers=1, num_decoder_layers=1,
                                 dim_feedforward=FF, dropout=0.0, max_len=16, **kw).double()


def test_gradcheck_tiny_transformer_end_to_end_through_the_loss():
    m = _tiny_seq2seq(pad_idx=5)            # 0 = BOS, 5 = padding (its row gets no gradient,
    names = [n for n, _ in m.named_parameters()]     # and the loss must not depend on it)
    src = eg.tensor(np.array([[1, 2, 3, 4], [4, 3, 5, 5]]))          # second row padded
    tgt_in = eg.tensor(np.array([[0, 4, 3], [0, 1, 5]]))
    tgt_out = eg.tensor(np.array([[4, 3, 2], [1, 5, 5]]))

    def loss(*ps):
        logits = nn.functional_call(m, dict(zip(names, ps)), src, tgt_in)
        return F.cross_entropy(logits, tgt_out, ignore_index=5, label_smoothing=0.1)

    assert eg.gradcheck(loss, *[p.detach() for p in m.parameters()])


def test_gradcheck_causal_lm_and_masked_lm():
    eg.manual_seed(4)
    for model in (nn.CausalLM(5, 4, 2, 1, 6, dropout=0.0, positional="learned", max_len=4,
                              norm_first=True, tie_weights=False),
                  nn.MaskedLM(5, 4, 2, 1, 6, dropout=0.0, max_len=4)):
        model.double()
        names = [n for n, _ in model.named_parameters()]
        tokens = eg.tensor(np.array([[1, 2, 3], [4, 1, 1]]))

        def loss(*ps, model=model, names=names):
            return F.cross_entropy(nn.functional_call(model, dict(zip(names, ps)), tokens), tokens)

        assert eg.gradcheck(loss, *[p.detach() for p in model.parameters()])


# -- masks proven by perturbation ---------------------------------------------------------------

def test_future_target_token_never_changes_earlier_decoder_outputs():
    m = _tiny_seq2seq()
    src = eg.tensor(np.array([[1, 2, 3, 4, 5]]))
    tgt = np.array([[0, 1, 2, 3, 4, 5]])
    base = m(src, eg.tensor(tgt)).numpy()
    for j in range(1, tgt.shape[1]):
        changed = tgt.copy()
        changed[0, j] = (changed[0, j] % 5) + 1
        out = m(src, eg.tensor(changed)).numpy()
        np.testing.assert_allclose(out[:, :j], base[:, :j], rtol=0, atol=1e-13)
        assert np.abs(out[:, j:] - base[:, j:]).max() > 1e-3      # the change is visible later


def test_future_token_never_changes_earlier_lm_outputs():
    eg.manual_seed(5)
    lm = nn.CausalLM(6, D, H, 2, FF, dropout=0.0).double()
    seq = np.array([[1, 2, 3, 4, 5, 1]])
    base = lm(eg.tensor(seq)).numpy()
    for j in range(1, seq.shape[1]):
        changed = seq.copy()
        changed[0, j] = (changed[0, j] % 5) + 1
        out = lm(eg.tensor(changed)).numpy()
        np.testing.assert_allclose(out[:, :j], base[:, :j], rtol=0, atol=1e-13)
        assert np.abs(out[:, j] - base[:, j]).max() > 1e-3


def test_padded_source_token_never_changes_any_output():
    m = _tiny_seq2seq()
    src = np.array([[1, 2, 3, 4, 5], [2, 3, 4, 1, 1]])
    kpm = np.array([[False] * 5, [False, False, False, True, True]])
    tgt = eg.tensor(np.array([[0, 1, 2], [0, 3, 4]]))
    base = m(eg.tensor(src), tgt, src_key_padding_mask=eg.tensor(kpm)).numpy()
    for j in (3, 4):
        for token in range(6):
            changed = src.copy()
            changed[1, j] = token
            out = m(eg.tensor(changed), tgt, src_key_padding_mask=eg.tensor(kpm)).numpy()
            np.testing.assert_allclose(out, base, rtol=0, atol=1e-13)
    changed = src.copy()
    changed[1, 2] = 5                                   # a real token does matter
    out = m(eg.tensor(changed), tgt, src_key_padding_mask=eg.tensor(kpm)).numpy()
    assert np.abs(out[1] - base[1]).max() > 1e-3
    np.testing.assert_allclose(out[0], base[0], rtol=0, atol=1e-13)  # and only in its own row


def test_pad_idx_builds_the_masks_from_tokens():
    m = _tiny_seq2seq(pad_idx=0)
    src = eg.tensor(np.array([[1, 2, 0, 0]]))
    tgt = eg.tensor(np.array([[3, 4]]))
    auto = m(src, tgt).numpy()
    explicit = m(src, tgt, src_key_padding_mask=eg.tensor(np.array([[False, False, True, True]]))).numpy()
    np.testing.assert_array_equal(auto, explicit)
    shorter = m(eg.tensor(np.array([[1, 2]])), tgt).numpy()          # pads behave as absent
    np.testing.assert_allclose(auto, shorter, rtol=1e-12, atol=1e-12)


def test_masked_lm_padding_never_changes_real_positions():
    eg.manual_seed(6)
    mlm = nn.MaskedLM(7, D, H, 2, FF, dropout=0.0, pad_idx=0, max_len=8).double()
    x = np.array([[3, 4, 5, 0, 0]])
    base = mlm(eg.tensor(x)).numpy()
    kpm = eg.tensor(x == 0)
    for token in range(1, 7):
        changed = x.copy()
        changed[0, 4] = token
        out = mlm(eg.tensor(changed), key_padding_mask=kpm).numpy()
        np.testing.assert_allclose(out[:, :3], base[:, :3], rtol=0, atol=1e-12)
    # bidirectional: a later real token changes earlier outputs
    changed = x.copy()
    changed[0, 2] = 6
    assert np.abs(mlm(eg.tensor(changed)).numpy()[0, 0] - base[0, 0]).max() > 1e-4


def test_fully_padded_source_gives_finite_outputs_and_gradients():
    m = _tiny_seq2seq(pad_idx=0)
    src = eg.tensor(np.array([[0, 0, 0], [1, 2, 3]]))
    tgt_in, tgt_out = eg.tensor(np.array([[1, 2], [3, 4]])), eg.tensor(np.array([[2, 3], [4, 5]]))
    loss = F.cross_entropy(m(src, tgt_in), tgt_out)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(np.all(np.isfinite(p.grad.numpy())) for p in m.parameters())


# -- models: structure and the benchmark spec -----------------------------------------------------

def _spec_names(kind, n_enc, n_dec):
    """The canonical parameter order of benchmarks/model_spec.md."""
    def mha(p):
        return [f"{p}.{n}.{w}" for n in "qkvo" for w in "wb"]

    def ln(p):
        return [f"{p}.g", f"{p}.b"]

    def lin(p):
        return [f"{p}.w", f"{p}.b"]
    names = ["emb"]
    if kind == "lm":
        for i in range(n_enc):
            p = f"blk{i}"
            names += mha(f"{p}.self") + ln(f"{p}.ln1") + lin(f"{p}.ff1") + lin(f"{p}.ff2") + ln(f"{p}.ln2")
        return names
    for i in range(n_enc):
        p = f"enc{i}"
        names += mha(f"{p}.self") + ln(f"{p}.ln1") + lin(f"{p}.ff1") + lin(f"{p}.ff2") + ln(f"{p}.ln2")
    for i in range(n_dec):
        p = f"dec{i}"
        names += mha(f"{p}.self") + ln(f"{p}.ln1") + mha(f"{p}.cross") + ln(f"{p}.ln2") \
            + lin(f"{p}.ff1") + lin(f"{p}.ff2") + ln(f"{p}.ln3")
    return names


def _to_spec(name):
    """Our parameter name -> the spec's name (a pure renaming: same order, same layout)."""
    from benchmarks.engine_model import spec_name
    return spec_name(name)


@pytest.mark.parametrize("config,count", [("small", 120_832), ("base", 933_888), ("medium", 3_183_616)])
def test_benchmark_models_are_expressible(config, count):
    if config == "medium":
        m = nn.CausalLM(96, d_model=256, nhead=4, num_layers=4, dim_feedforward=1024, dropout=0.0)
        spec = _spec_names("lm", 4, 0)
    else:
        d, f, n = (64, 256, 1) if config == "small" else (128, 512, 2)
        m = nn.Seq2SeqTransformer(64, d_model=d, nhead=4, num_encoder_layers=n, num_decoder_layers=n,
                                  dim_feedforward=f, dropout=0.0)
        spec = _spec_names("encdec", n, n)
    assert m.num_parameters() == count
    assert [_to_spec(n) for n, _ in m.named_parameters()] == spec
    assert m.state_dict().keys() == dict(m.named_parameters()).keys()       # nothing else saved


def _spec_reference_loss(P, src, tgt_in, tgt_out, h):
    """The encoder-decoder of model_spec.md in NumPy (float64); P holds the parameters."""
    emb = P["src_embed.token.weight"]
    d = emb.shape[1]
    pe = nn.sinusoidal_table(64, d).astype(np.float32).astype(np.float64)   # "stored float32"

    def embed(tok):
        return emb[tok] * math.sqrt(d) + pe[: tok.shape[1]]

    x = embed(src)
    x = np_encoder_layer(P, "transformer.encoder.layers.0.", x, h)
    y = embed(tgt_in)
    y = np_decoder_layer(P, "transformer.decoder.layers.0.", y, x, h,
                         self_blocked=causal_np(y.shape[1]))
    logits = y @ emb.T
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, tgt_out[..., None], -1).mean()


def test_canonical_spec_model_loss_matches_numpy():
    """A reduced 'small' config built per the spec: canonical init drawn in spec order
    (which is our named_parameters order), and the step-1 loss compared with NumPy."""
    V, d, h, f, Bt, Tt = 16, 16, 4, 32, 4, 6
    m = nn.Seq2SeqTransformer(V, d_model=d, nhead=h, num_encoder_layers=1, num_decoder_layers=1,
                              dim_feedforward=f, dropout=0.0).double()
    rng = np.random.default_rng(0)
    canonical = {}
    for name, p in m.named_parameters():
        s = _to_spec(name)
        if s == "emb":
            canonical[name] = rng.standard_normal(p.shape) * d ** -0.5
        elif s.endswith(".w"):                     # Linear (in, out), drawn as the spec says
            canonical[name] = rng.uniform(-1 / math.sqrt(p.shape[0]), 1 / math.sqrt(p.shape[0]), p.shape)
        else:
            canonical[name] = np.ones(p.shape) if s.endswith(".g") else np.zeros(p.shape)
    m.load_state_dict(canonical)
    data = np.random.default_rng(1)
    src = data.integers(1, V, size=(Bt, Tt))
    tgt_out = src[:, ::-1]
    tgt_in = np.concatenate([np.zeros((Bt, 1), np.int64), tgt_out[:, :-1]], axis=1)
    loss = F.cross_entropy(m(eg.tensor(src), eg.tensor(tgt_in)), eg.tensor(tgt_out))
    ref = _spec_reference_loss(canonical, src, tgt_in, tgt_out, h)
    assert loss.item() == pytest.approx(ref, rel=1e-12)


def test_spec_model_trains_like_the_torch_reference():
    """The benchmark's 'small' model (model_spec.md) built from nn modules, loaded with the
    canonical parameters: step-1 loss and the loss after 5 AdamW steps equal the PyTorch
    implementation of the spec (benchmarks/torch_model.py)."""
    torch = pytest.importorskip("torch")
    spec = pytest.importorskip("benchmarks.spec")
    torch_model = pytest.importorskip("benchmarks.torch_model")
    cfg = spec.CONFIGS["small"]
    params, batch = spec.canonical_params(cfg), spec.canonical_batch(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # 2 OpenMP threads next to NumPy's BLAS pool crawl on 2 cores
    try:
        t_step, _ = torch_model.build(cfg, params, batch)
        t_losses = [t_step() for _ in range(5)]
    finally:
        torch.set_num_threads(threads)
    model = nn.Seq2SeqTransformer(cfg.vocab, d_model=cfg.d, nhead=cfg.heads,
                                  num_encoder_layers=cfg.layers, num_decoder_layers=cfg.layers,
                                  dim_feedforward=cfg.d_ff, dropout=0.0)
    model.load_state_dict({n: params[_to_spec(n)] for n, _ in model.named_parameters()})
    opt = nn.optim.AdamW(model.parameters(), lr=spec.LR, betas=spec.BETAS, eps=spec.EPS,
                      weight_decay=spec.WEIGHT_DECAY)
    src, tgt_in, tgt_out = (eg.tensor(batch[k]) for k in ("src", "tgt_in", "tgt_out"))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(src, tgt_in), tgt_out)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(t_losses[0], rel=1e-5)
    assert losses[4] == pytest.approx(t_losses[4], rel=1e-4)
    assert losses[4] < losses[0] - 0.05


def test_models_shapes_tying_and_options():
    eg.manual_seed(7)
    lm = nn.CausalLM(11, D, H, 2, FF, dropout=0.0)
    tokens = eg.tensor(np.random.default_rng(0).integers(0, 11, (3, 5)))
    assert lm(tokens).shape == (3, 5, 11)
    assert lm.lm_head is None and "lm_head.weight" not in lm.state_dict()
    h = lm.hidden(tokens)
    np.testing.assert_allclose(lm(tokens).numpy(), (h.numpy() @ lm.embed.weight.numpy().T), rtol=1e-5)
    gpt = nn.CausalLM(11, D, H, 2, FF, positional="learned", scale_embedding=False,
                      norm_first=True, activation="gelu", tie_weights=False)
    assert gpt.norm is not None and gpt.lm_head is not None and gpt.embed.scale == 1.0
    assert gpt(tokens, offset=2).shape == (3, 5, 11)
    s2s = nn.Seq2SeqTransformer(9, 7, d_model=D, nhead=H, num_encoder_layers=1, num_decoder_layers=1,
                                dim_feedforward=FF, share_embeddings=False, tie_output=False)
    assert s2s.src_embed is not s2s.tgt_embed
    out = s2s(eg.tensor(np.ones((2, 4), np.int64)), eg.tensor(np.ones((2, 3), np.int64)))
    assert out.shape == (2, 3, 7)
    shared = nn.Seq2SeqTransformer(9, d_model=D, nhead=H, num_encoder_layers=1, num_decoder_layers=1,
                                   dim_feedforward=FF, dropout=0.0)
    assert shared.tgt_embed is shared.src_embed
    assert [n for n in shared.state_dict() if "embed" in n] == ["src_embed.token.weight"]
    mlm = nn.MaskedLM(13, D, H, 1, FF)
    assert mlm(tokens).shape == (3, 5, 13)
    assert "output_bias" in mlm.state_dict() and mlm.embed.norm is not None
    # encode/decode compose to forward (the generation interface)
    src, tgt = eg.tensor(np.array([[1, 2, 3]])), eg.tensor(np.array([[0, 4]]))
    np.testing.assert_allclose(shared.decode(tgt, shared.encode(src)).numpy(),
                               shared(src, tgt).numpy(), rtol=1e-6)


def test_train_eval_controls_dropout_in_models():
    eg.manual_seed(8)
    lm = nn.CausalLM(11, D, H, 1, FF, dropout=0.3)
    tokens = eg.tensor(np.array([[1, 2, 3, 4]]))
    assert np.abs(lm(tokens).numpy() - lm(tokens).numpy()).max() > 0      # random in training
    lm.eval()
    np.testing.assert_array_equal(lm(tokens).numpy(), lm(tokens).numpy())


# -- learning -----------------------------------------------------------------------------------

def _copy_batch(rng, batch, length, vocab):
    src = rng.integers(1, vocab, size=(batch, length))
    tgt_in = np.concatenate([np.zeros((batch, 1), np.int64), src[:, :-1]], axis=1)
    return eg.tensor(src), eg.tensor(tgt_in), eg.tensor(src)


def _greedy(model, src, length):
    memory = model.encode(src)
    out = np.zeros((src.shape[0], 1), np.int64)
    for _ in range(length):
        logits = model.decode(eg.tensor(out), memory)
        nxt = logits.numpy()[:, -1].argmax(-1)
        out = np.concatenate([out, nxt[:, None]], axis=1)
    return out[:, 1:]


@pytest.mark.slow
def test_tiny_transformer_learns_to_copy():
    eg.manual_seed(0)
    vocab, length = 10, 8
    model = nn.Seq2SeqTransformer(vocab, d_model=32, nhead=4, num_encoder_layers=1,
                                  num_decoder_layers=1, dim_feedforward=64, dropout=0.0, max_len=16)
    steps = 700
    opt = nn.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    sched = nn.optim.WarmupCosineLR(opt, warmup_steps=30, total_steps=steps)
    rng = np.random.default_rng(0)
    first = None
    for step in range(steps):
        src, tgt_in, tgt_out = _copy_batch(rng, 32, length, vocab)
        loss = F.cross_entropy(model(src, tgt_in), tgt_out)
        loss.backward()
        nn.optim.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        first = loss.item() if first is None else first
    assert first > 2.0                                   # >= ln(9): chance level at the start
    model.eval()
    src, tgt_in, tgt_out = _copy_batch(np.random.default_rng(123), 64, length, vocab)
    with eg.no_grad():
        held_out = F.cross_entropy(model(src, tgt_in), tgt_out).item()
        decoded = _greedy(model, src, length)
    assert held_out < 0.05
    assert (decoded == src.numpy()).mean() >= 0.99
