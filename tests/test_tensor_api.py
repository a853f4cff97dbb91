"""One rule per name: transpose swaps two axes at every rank (PyTorch's meaning; NumPy's
readings are refused, never guessed), permute / .T / t(), masked_fill, dim= as an alias
of axis=, cat, and the loss and activation modules, against PyTorch when it is installed
and NumPy otherwise."""
from __future__ import annotations

import numpy as np
import pytest

import engine as eg
from engine import nn
from engine.errors import ArgumentError, DTypeError, ShapeError


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4), (2, 3, 4, 5)])
@pytest.mark.parametrize("dims", [(0, 1), (1, 0), (0, -1), (-2, -1)])
def test_transpose_swaps_the_two_axes_at_every_rank(shape, dims):
    a = _rand(*shape)
    got = eg.tensor(a).transpose(*dims).numpy()
    np.testing.assert_array_equal(got, np.swapaxes(a, *dims))
    np.testing.assert_array_equal(eg.transpose(eg.tensor(a), *dims).numpy(), got)


def test_transpose_of_a_matrix_is_never_the_identity():
    """NumPy's x.transpose(0, 1) returns a 2-D array unchanged; here it swaps, as torch."""
    a = _rand(3, 4)
    assert eg.tensor(a).transpose(0, 1).shape == (4, 3)
    np.testing.assert_array_equal(eg.tensor(a).transpose(0, 1).numpy(), a.T)


@pytest.mark.parametrize("args", [(), ((1, 0, 2),), (1, 0, 2), (0,), (0.0, 1), ([0, 1],)])
def test_numpy_readings_of_transpose_are_refused(args):
    x = eg.ones(2, 3, 4)
    with pytest.raises(ArgumentError, match="permute"):
        x.transpose(*args)


def test_transpose_gradient_flows_back_through_the_swap():
    a = _rand(2, 3, 4)
    x = eg.tensor(a, requires_grad=True)
    w = _rand(4, 3, 2, seed=1)
    (x.transpose(0, 2) * eg.tensor(w)).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.swapaxes(w, 0, 2))


def test_permute_T_and_t():
    a = _rand(2, 3, 4)
    x = eg.tensor(a)
    np.testing.assert_array_equal(x.permute(2, 0, 1).numpy(), a.transpose(2, 0, 1))
    np.testing.assert_array_equal(x.permute((1, 2, 0)).numpy(), a.transpose(1, 2, 0))
    np.testing.assert_array_equal(eg.permute(x, (0, 2, 1)).numpy(), a.transpose(0, 2, 1))
    np.testing.assert_array_equal(x.T.numpy(), a.T)
    m = _rand(3, 5)
    np.testing.assert_array_equal(eg.tensor(m).t().numpy(), m.T)
    np.testing.assert_array_equal(eg.t(eg.tensor(m)).numpy(), m.T)
    v = eg.tensor(m[0])
    assert v.t().shape == (5,)
    with pytest.raises(ShapeError, match="t\\(\\)"):
        x.t()
    with pytest.raises(ShapeError, match="permutation"):
        x.permute(0, 1)
    with pytest.raises(ShapeError, match="permutation"):
        x.permute(0, 0, 1)


def test_masked_fill_matches_torch_semantics():
    a = _rand(3, 4)
    mask = np.array([True, False, True, False])
    x = eg.tensor(a, requires_grad=True)
    y = x.masked_fill(eg.tensor(mask), -1.5)
    np.testing.assert_array_equal(y.numpy(), np.where(mask, np.float32(-1.5), a))
    assert y.dtype == np.float32
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.broadcast_to(~mask, a.shape).astype(float))
    np.testing.assert_array_equal(eg.masked_fill(eg.tensor(a), eg.tensor(mask), 0.0).numpy(),
                                  np.where(mask, 0, a))
    with pytest.raises(DTypeError, match="bool"):
        eg.tensor(a).masked_fill(eg.tensor(mask.astype(np.int64)), 0.0)
    with pytest.raises(ShapeError, match="broadcast"):
        eg.tensor(a).masked_fill(eg.tensor(np.ones((3, 4, 2), bool)), 0.0)
    with pytest.raises(TypeError, match="mask"):
        eg.tensor(a).masked_fill(mask, 0.0)


REDUCTIONS = ["sum", "mean", "max", "min", "var", "std", "logsumexp", "softmax", "log_softmax"]


@pytest.mark.parametrize("name", REDUCTIONS)
def test_dim_is_an_alias_of_axis(name):
    x = eg.tensor(_rand(2, 3, 4))
    by_axis = getattr(x, name)(axis=1)
    by_dim = getattr(x, name)(dim=1)
    np.testing.assert_array_equal(by_axis.numpy(), by_dim.numpy())
    with pytest.raises(ArgumentError, match="both"):
        getattr(x, name)(axis=1, dim=1)
    for module in (eg, nn.functional):
        fn = getattr(module, name, None)
        if fn is not None:
            np.testing.assert_array_equal(fn(x, dim=1).numpy(), by_axis.numpy())
            np.testing.assert_array_equal(fn(x, 1).numpy(), by_axis.numpy())
            np.testing.assert_array_equal(fn(x, 1, dim=None).numpy(), by_axis.numpy())


def test_keepdim_is_an_alias_of_keepdims():
    x = eg.tensor(_rand(2, 3))
    assert x.sum(dim=1, keepdim=True).shape == (2, 1)
    assert eg.mean(x, dim=0, keepdim=True).shape == (1, 3)
    with pytest.raises(ArgumentError, match="keepdims"):
        x.sum(keepdims=True, keepdim=True)


def test_cat_is_concatenate_and_joining_functions_take_dim():
    a, b = _rand(2, 3), _rand(1, 3, seed=1)
    np.testing.assert_array_equal(eg.cat([eg.tensor(a), eg.tensor(b)]).numpy(),
                                  np.concatenate([a, b]))
    np.testing.assert_array_equal(eg.cat([eg.tensor(a), eg.tensor(a)], dim=1).numpy(),
                                  np.concatenate([a, a], axis=1))
    assert eg.stack([eg.tensor(a), eg.tensor(a)], dim=2).shape == (2, 3, 2)
    assert eg.tensor(a).unsqueeze(dim=0).shape == (1, 2, 3)
    assert eg.tensor(b).squeeze(dim=0).shape == (3,)
    with pytest.raises(ShapeError, match="at least one"):
        eg.cat([])


# -- loss and activation modules -------------------------------------------------------------

def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


ACTIVATIONS = [
    ("ReLU", lambda: nn.ReLU(), lambda a: np.maximum(a, 0), lambda t: t.nn.ReLU()),
    ("Tanh", lambda: nn.Tanh(), np.tanh, lambda t: t.nn.Tanh()),
    ("Sigmoid", lambda: nn.Sigmoid(), lambda a: 1 / (1 + np.exp(-a)), lambda t: t.nn.Sigmoid()),
    ("GELU", lambda: nn.GELU(), None, lambda t: t.nn.GELU()),
    ("Softmax(1)", lambda: nn.Softmax(dim=1),
     lambda a: np.exp(a) / np.exp(a).sum(1, keepdims=True), lambda t: t.nn.Softmax(dim=1)),
    ("LogSoftmax(0)", lambda: nn.LogSoftmax(0),
     lambda a: a - np.log(np.exp(a).sum(0, keepdims=True)), lambda t: t.nn.LogSoftmax(dim=0)),
]


@pytest.mark.parametrize("name,make,reference,make_torch", ACTIVATIONS,
                         ids=[a[0] for a in ACTIVATIONS])
def test_activation_modules(name, make, reference, make_torch):
    a = _rand(3, 4).astype(np.float64)
    x = eg.tensor(a, requires_grad=True)
    y = make()(x)
    w = _rand(3, 4, seed=2).astype(np.float64)
    (y * eg.tensor(w)).sum().backward()
    torch = _torch()
    if torch is not None:
        tx = torch.tensor(a, requires_grad=True)
        ty = make_torch(torch)(tx)
        (ty * torch.tensor(w)).sum().backward()
        np.testing.assert_allclose(y.numpy(), ty.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(x.grad.numpy(), tx.grad.numpy(), rtol=1e-8, atol=1e-10)
    elif reference is not None:
        np.testing.assert_allclose(y.numpy(), reference(a), rtol=1e-10)
    else:
        pytest.skip("PyTorch is not installed and there is no NumPy reference")


LOSSES = [("CrossEntropyLoss", {}), ("CrossEntropyLoss", {"label_smoothing": 0.1}),
          ("CrossEntropyLoss", {"reduction": "sum", "ignore_index": 2}),
          ("NLLLoss", {}), ("NLLLoss", {"reduction": "none"}), ("MSELoss", {}),
          ("MSELoss", {"reduction": "sum"})]


@pytest.mark.parametrize("name,kwargs", LOSSES, ids=[f"{n}{k}" for n, k in LOSSES])
def test_loss_modules(name, kwargs):
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((6, 4))
    if name == "MSELoss":
        target = rng.standard_normal((6, 4))
    else:
        target = rng.integers(0, 4, 6)
    inp = logits if name != "NLLLoss" else logits - np.log(np.exp(logits).sum(1, keepdims=True))
    x = eg.tensor(inp, requires_grad=True)
    loss = getattr(nn, name)(**kwargs)(x, eg.tensor(target))
    loss.sum().backward()
    torch = _torch()
    if torch is not None:
        tx = torch.tensor(inp, requires_grad=True)
        tloss = getattr(torch.nn, name)(**kwargs)(tx, torch.tensor(target))
        tloss.sum().backward()
        np.testing.assert_allclose(loss.numpy(), tloss.detach().numpy(), rtol=1e-10)
        np.testing.assert_allclose(x.grad.numpy(), tx.grad.numpy(), rtol=1e-8, atol=1e-12)
    else:
        red = kwargs.get("reduction", "mean")
        if name == "MSELoss":
            d = (inp - target) ** 2
            expected = d.mean() if red == "mean" else d.sum()
        else:
            logp = inp if name == "NLLLoss" else inp - np.log(np.exp(inp).sum(1, keepdims=True))
            if kwargs.get("label_smoothing") or "ignore_index" in kwargs:
                pytest.skip("PyTorch is not installed: no NumPy reference for this option")
            picked = -logp[np.arange(6), target]
            expected = picked if red == "none" else picked.mean()
        np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-10)
