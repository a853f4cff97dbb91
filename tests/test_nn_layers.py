"""Basic layers: values against NumPy (and torch when present), float64 gradchecks, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

import engine as eg
from engine import nn
from engine.errors import DTypeError, ShapeError


def gradcheck_module(module, *inputs, pick=None, **kwargs):
    """gradcheck with respect to every parameter of `module` and every float input."""
    module.double()
    names = [n for n, _ in module.named_parameters()]

    def f(*args):
        out = nn.functional_call(module, dict(zip(names, args[:len(names)])),
                                 *args[len(names):], **kwargs)
        return out if pick is None else pick(out)

    return eg.gradcheck(f, *[p.detach() for p in module.parameters()], *inputs)


def rand(*shape, seed=0):
    return eg.tensor(np.random.default_rng(seed).standard_normal(shape))


# -- Linear -------------------------------------------------------------------------------------

def test_linear_matches_numpy_and_layout_is_in_out():
    lin = nn.Linear(3, 2).double()
    assert lin.weight.shape == (3, 2) and lin.bias.shape == (2,)
    x = rand(4, 3)
    ref = x.numpy() @ lin.weight.numpy() + lin.bias.numpy()
    np.testing.assert_allclose(lin(x).numpy(), ref, rtol=1e-14)
    assert np.abs(lin.weight.numpy()).max() <= 1 / math.sqrt(3)
    assert np.abs(lin.bias.numpy()).max() <= 1 / math.sqrt(3)
    np.testing.assert_allclose(nn.functional.linear(x, lin.weight, lin.bias).numpy(), ref, rtol=1e-14)


def test_linear_gradcheck_batched_and_no_bias():
    assert gradcheck_module(nn.Linear(3, 2), rand(2, 4, 3))
    assert gradcheck_module(nn.Linear(3, 2, bias=False), rand(3))


def test_linear_errors():
    with pytest.raises(ShapeError, match=r"Linear: expected input \(\.\.\., 3\), got shape \(2, 4\)"):
        nn.Linear(3, 2)(eg.ones(2, 4))
    with pytest.raises(ShapeError, match="weights are stored"):
        nn.functional.linear(eg.ones(2, 2), eg.ones(3, 2))
    with pytest.raises(ShapeError, match=r"expects \(2, 3\)"):
        nn.Linear(3, 2).load_torch(np.zeros((3, 2)))


def test_linear_load_torch_weights():
    torch = pytest.importorskip("torch")
    tl = torch.nn.Linear(3, 2, dtype=torch.float64)
    lin = nn.Linear(3, 2).double().load_torch(tl.weight, tl.bias)
    x = np.random.default_rng(0).standard_normal((5, 3))
    np.testing.assert_allclose(lin(eg.tensor(x)).numpy(), tl(torch.tensor(x)).detach().numpy(),
                               rtol=1e-14, atol=1e-15)


# -- Embedding ----------------------------------------------------------------------------------

def test_embedding_lookup_and_padding_row_gets_no_gradient():
    emb = nn.Embedding(5, 3, padding_idx=0).double()
    assert np.all(emb.weight.numpy()[0] == 0)
    idx = eg.tensor(np.array([[0, 2, 2], [4, 0, 1]]))
    out = emb(idx)
    np.testing.assert_array_equal(out.numpy(), emb.weight.numpy()[idx.numpy()])
    (out * rand(2, 3, 3)).sum().backward()
    g = emb.weight.grad.numpy()
    assert np.all(g[0] == 0) and np.all(g[3] == 0) and np.abs(g[2]).sum() > 0
    # a non-zero padding row keeps its value in the output (as torch) but still gets no gradient
    with eg.no_grad():
        emb.weight[0] = 1.0
    emb.zero_grad()
    out = emb(idx)
    np.testing.assert_array_equal(out.numpy()[0, 0], np.ones(3))
    out.sum().backward()
    assert np.all(emb.weight.grad.numpy()[0] == 0)
    assert nn.Embedding(4, 2, padding_idx=-1).padding_idx == 3


def test_embedding_gradcheck_repeated_indices():
    assert gradcheck_module(nn.Embedding(4, 3), eg.tensor(np.array([[1, 1, 3], [0, 1, 2]])))
    # (with padding_idx the padding row's gradient is 0 by design, not the derivative)


def test_embedding_errors():
    emb = nn.Embedding(4, 2)
    with pytest.raises(ShapeError, match=r"index 4 is outside \[0, 4\)"):
        emb(eg.tensor(np.array([1, 4])))
    with pytest.raises(ShapeError, match=r"index -1 is outside"):
        emb(eg.tensor(np.array([-1])))
    with pytest.raises(DTypeError, match="indices must be integer"):
        emb(eg.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="padding_idx 4 is outside"):
        nn.Embedding(4, 2, padding_idx=4)


# -- LayerNorm ---------------------------------------------------------------------------------

def test_layernorm_matches_numpy_and_gradcheck():
    ln = nn.LayerNorm(4).double()
    with eg.no_grad():
        ln.weight[...] = rand(4, seed=1)
        ln.bias[...] = rand(4, seed=2)
    x = rand(2, 3, 4)
    xn = x.numpy()
    ref = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
    ref = ref * ln.weight.numpy() + ln.bias.numpy()
    np.testing.assert_allclose(ln(x).numpy(), ref, rtol=1e-12, atol=1e-13)
    assert gradcheck_module(ln, x)
    assert gradcheck_module(nn.LayerNorm((4,), elementwise_affine=False), x)
    assert [n for n, _ in nn.LayerNorm(4, bias=False).named_parameters()] == ["weight"]


def test_layernorm_matches_torch():
    torch = pytest.importorskip("torch")
    tln = torch.nn.LayerNorm(5, dtype=torch.float64)
    with torch.no_grad():
        tln.weight.normal_()
        tln.bias.normal_()
    ln = nn.LayerNorm(5).double()
    nn.load_torch_state_dict(ln, tln.state_dict())
    x = np.random.default_rng(3).standard_normal((3, 5)) * 4 + 2
    np.testing.assert_allclose(ln(eg.tensor(x)).numpy(), tln(torch.tensor(x)).detach().numpy(),
                               rtol=1e-12, atol=1e-12)


def test_layernorm_errors():
    with pytest.raises(ShapeError, match=r"only the last axis"):
        nn.LayerNorm((2, 3))
    with pytest.raises(ShapeError, match=r"LayerNorm: expected input \(\.\.\., 4\)"):
        nn.LayerNorm(4)(eg.ones(2, 3))


# -- Dropout, activations, feed-forward --------------------------------------------------------

def test_dropout_train_and_eval():
    eg.manual_seed(0)
    d = nn.Dropout(0.25)
    x = eg.ones(200, 50, requires_grad=True)
    y = d(x)
    vals = np.unique(y.numpy())
    np.testing.assert_allclose(vals, [0.0, 1 / 0.75], rtol=1e-6)
    assert abs((y.numpy() == 0).mean() - 0.25) < 0.02
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), y.numpy())   # same mask, same scale
    d.eval()
    assert d(x) is x
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        nn.Dropout(1.0)


def test_activations_and_feedforward():
    x = rand(2, 3, 4)
    np.testing.assert_array_equal(nn.ReLU()(x).numpy(), np.maximum(x.numpy(), 0))
    assert nn.GELU("tanh")(x).shape == x.shape
    with pytest.raises(ValueError, match="activation must be one of"):
        nn.FeedForward(4, 8, activation="swishy")
    ff = nn.FeedForward(4, 6, activation="gelu").double()
    ref = ff.linear2(eg.gelu(ff.linear1(x)))
    np.testing.assert_allclose(ff(x).numpy(), ref.numpy())
    assert gradcheck_module(nn.FeedForward(4, 6), x)


# -- positions --------------------------------------------------------------------------------

def test_sinusoidal_table_is_the_paper_formula():
    pe = nn.sinusoidal_table(50, 6)
    for pos in (0, 1, 17, 49):
        for i in range(3):
            assert pe[pos, 2 * i] == pytest.approx(math.sin(pos / 10000 ** (2 * i / 6)), abs=1e-15)
            assert pe[pos, 2 * i + 1] == pytest.approx(math.cos(pos / 10000 ** (2 * i / 6)), abs=1e-15)
    odd = nn.sinusoidal_table(4, 5)
    assert odd.shape == (4, 5)
    np.testing.assert_array_equal(odd[:, :4], nn.sinusoidal_table(4, 5)[:, :4])


def test_positional_encoding_adds_offset_rows_and_is_not_saved():
    pe = nn.PositionalEncoding(6, max_len=10)
    assert pe.pe.dtype == np.float32 and "pe" not in pe.state_dict()
    np.testing.assert_array_equal(pe.pe.numpy(), nn.sinusoidal_table(10, 6).astype(np.float32))
    x = eg.zeros(2, 3, 6)
    np.testing.assert_array_equal(pe(x, offset=4).numpy()[1], pe.pe.numpy()[4:7])
    with pytest.raises(ShapeError, match=r"positions 8\.\.10 exceed max_len=10"):
        pe(x, offset=8)
    with pytest.raises(ShapeError, match=r"expected input \(batch, time, 6\)"):
        pe(eg.zeros(3, 5))
    pe.double()
    assert pe.pe.dtype == np.float64
    assert eg.gradcheck(lambda t: pe(t), rand(1, 3, 6))


def test_learned_positions_gradcheck():
    lp = nn.LearnedPositionalEmbedding(5, 4)
    assert [n for n, _ in lp.named_parameters()] == ["weight"]
    assert gradcheck_module(lp, rand(2, 3, 4), offset=1)


def test_gradcheck_sees_non_contiguous_inputs():
    """Regression (engine/gradcheck.py): a transposed float64 input, such as the K^T view
    attention feeds to matmul, used to get an all-zero numeric gradient."""
    a = rand(2, 3, 4)
    b = rand(2, 5, 4, seed=1).permute(0, 2, 1)
    assert not b.numpy().flags.c_contiguous
    assert eg.gradcheck(lambda x, y: x @ y, a, b)
