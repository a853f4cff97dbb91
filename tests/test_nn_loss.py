"""Losses: cross_entropy (ignore_index, label smoothing, reductions) and mse_loss against
NumPy and torch, stability, the all-ignored batch, gradchecks and errors."""
from __future__ import annotations

import numpy as np
import pytest

import engine as eg
from engine import nn
from engine.errors import DTypeError, ShapeError

F = nn.functional


def np_cross_entropy(logits, target, ignore_index=-100, smoothing=0.0, reduction="mean"):
    """-sum_c q_c log softmax(x)_c with q = (1-e) onehot + e/C, per position."""
    c = logits.shape[-1]
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    valid = target != ignore_index
    safe = np.where(valid, target, 0)
    nll = -np.take_along_axis(logp, safe[..., None], -1)[..., 0]
    loss = (1 - smoothing) * nll - smoothing / c * logp.sum(-1)
    loss = np.where(valid, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / max(valid.sum(), 1)


def sample(shape=(2, 3), classes=5, seed=0):
    r = np.random.default_rng(seed)
    return r.standard_normal(shape + (classes,)) * 2, r.integers(0, classes, shape)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("ignore", [-100, 1])
def test_cross_entropy_matches_numpy(reduction, smoothing, ignore):
    x, t = sample()
    t[0, 1] = ignore if ignore >= 0 else -100
    got = F.cross_entropy(eg.tensor(x), eg.tensor(t), ignore_index=ignore, label_smoothing=smoothing,
                          reduction=reduction)
    ref = np_cross_entropy(x, t, ignore, smoothing, reduction)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch_value_and_gradient(reduction, smoothing):
    torch = pytest.importorskip("torch")
    x, t = sample((4, 3), classes=6, seed=1)
    t[1, 2] = t[3, 0] = -100
    tx = torch.tensor(x, requires_grad=True)
    t_loss = torch.nn.functional.cross_entropy(tx.reshape(-1, 6), torch.tensor(t).reshape(-1),
                                               label_smoothing=smoothing, reduction=reduction)
    ex = eg.tensor(x, requires_grad=True)
    loss = F.cross_entropy(ex, eg.tensor(t), label_smoothing=smoothing, reduction=reduction)
    np.testing.assert_allclose(loss.numpy().reshape(-1), t_loss.detach().numpy().reshape(-1),
                               rtol=1e-13, atol=1e-15)
    cot = np.random.default_rng(2).standard_normal(loss.shape)
    (t_loss * torch.tensor(cot.reshape(t_loss.shape))).sum().backward()
    (loss * eg.tensor(cot)).sum().backward()
    np.testing.assert_allclose(ex.grad.numpy(), tx.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_cross_entropy_gradient_is_softmax_minus_onehot():
    x, t = sample((3,), classes=4, seed=3)
    ex = eg.tensor(x, requires_grad=True)
    F.cross_entropy(ex, eg.tensor(t), reduction="sum").backward()
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(ex.grad.numpy(), p - np.eye(4)[t], rtol=1e-13, atol=1e-15)


def test_cross_entropy_gradcheck():
    x, t = sample((2, 3), classes=4, seed=4)
    t[1, 0] = -100
    for kw in (dict(), dict(label_smoothing=0.3), dict(reduction="none"), dict(reduction="sum")):
        assert eg.gradcheck(lambda a, kw=kw: F.cross_entropy(a, eg.tensor(t), **kw), eg.tensor(x))


def test_all_ignored_batch_gives_zero_loss_and_zero_gradient():
    x = eg.tensor(np.random.default_rng(5).standard_normal((2, 3, 4)), requires_grad=True)
    t = eg.tensor(np.full((2, 3), -100))
    for smoothing in (0.0, 0.25):
        x.grad = None
        loss = F.cross_entropy(x, t, label_smoothing=smoothing)
        loss.backward()
        assert loss.item() == 0.0
        np.testing.assert_array_equal(x.grad.numpy(), 0.0)
    pad = eg.tensor(np.zeros((2, 3), np.int64))
    assert F.cross_entropy(x, pad, ignore_index=0).item() == 0.0


def test_cross_entropy_is_stable_for_huge_logits():
    x = np.array([[1e4, -1e4, 0.0], [-3e38, 3e38, 1.0]])
    t = np.array([0, 2])
    ex = eg.tensor(x, requires_grad=True)
    loss = F.cross_entropy(ex, eg.tensor(t), reduction="none")
    np.testing.assert_allclose(loss.numpy(), [0.0, 3e38], rtol=1e-12)
    loss.sum().backward()
    assert np.all(np.isfinite(ex.grad.numpy()))
    x32 = eg.tensor(np.array([[80.0, 0.0, -80.0]], np.float32))       # exp(80) overflows float32
    assert F.cross_entropy(x32, eg.tensor(np.array([2]))).item() == pytest.approx(160.0, rel=1e-6)


def test_cross_entropy_errors():
    x = eg.zeros(2, 3, 5)
    with pytest.raises(ShapeError, match=r"target value 5 at position \(1, 2\) is outside \[0, 5\)"):
        F.cross_entropy(x, eg.tensor(np.array([[0, 1, 2], [3, 4, 5]])))
    with pytest.raises(ShapeError, match=r"target value -1 at position \(0, 0\)"):
        F.cross_entropy(x, eg.tensor(np.array([[-1, 1, 2], [3, 4, 0]])))
    with pytest.raises(ShapeError, match=r"need targets of shape \(2, 3\), got \(3, 2\)"):
        F.cross_entropy(x, eg.tensor(np.zeros((3, 2), np.int64)))
    with pytest.raises(DTypeError, match="targets must be integer class indices"):
        F.cross_entropy(x, eg.zeros(2, 3))
    with pytest.raises(DTypeError, match="logits must be a floating tensor"):
        F.cross_entropy(eg.tensor(np.zeros((2, 3), np.int64)), eg.tensor(np.zeros(2, np.int64)))
    with pytest.raises(ValueError, match="reduction must be one of"):
        F.cross_entropy(x, eg.tensor(np.zeros((2, 3), np.int64)), reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        F.cross_entropy(x, eg.tensor(np.zeros((2, 3), np.int64)), label_smoothing=1.5)


def test_nll_loss_on_log_probabilities():
    x, t = sample((4,), classes=3, seed=6)
    logp = eg.log_softmax(eg.tensor(x), -1)
    np.testing.assert_allclose(F.nll_loss(logp, eg.tensor(t)).numpy(),
                               F.cross_entropy(eg.tensor(x), eg.tensor(t)).numpy(), rtol=1e-15)


def test_mse_loss():
    r = np.random.default_rng(7)
    a, b = r.standard_normal((3, 4)), r.standard_normal((3, 4))
    assert F.mse_loss(eg.tensor(a), eg.tensor(b)).item() == pytest.approx(((a - b) ** 2).mean(), rel=1e-14)
    assert F.mse_loss(eg.tensor(a), eg.tensor(b), "sum").item() == pytest.approx(((a - b) ** 2).sum(), rel=1e-14)
    np.testing.assert_allclose(F.mse_loss(eg.tensor(a), eg.tensor(b), "none").numpy(), (a - b) ** 2)
    assert eg.gradcheck(lambda x, y: F.mse_loss(x, y), eg.tensor(a), eg.tensor(b))
    with pytest.raises(ShapeError, match=r"input of shape \(3, 4\) and target of shape \(4,\)"):
        F.mse_loss(eg.tensor(a), eg.tensor(b[0]))


def test_mse_loss_matches_torch():
    torch = pytest.importorskip("torch")
    r = np.random.default_rng(8)
    a, b = r.standard_normal((2, 5)), r.standard_normal((2, 5))
    assert F.mse_loss(eg.tensor(a), eg.tensor(b)).item() == pytest.approx(
        torch.nn.functional.mse_loss(torch.tensor(a), torch.tensor(b)).item(), rel=1e-14)
