"""The band pass: causal masks make attention's matmuls skip their known-zero triangles."""
import numpy as np
import pytest

import engine as eg
import ops
from engine import nn
from engine.compiler.bands import MIN_DIM, BandedMatmul, _plan, causal_band

from .steps import train_steps


def test_causal_band_reads_the_triangle_of_a_constant_mask():
    mask = nn.causal_mask(6).numpy()
    assert causal_band(mask) == ("U", 0)
    assert causal_band(nn.causal_mask(3, 7).numpy()) == ("U", 4)       # queries at the end
    assert causal_band(mask.reshape(1, 1, 6, 6)) == ("U", 0)           # broadcast dims
    assert causal_band(mask.T) == ("L", 0)
    assert causal_band(np.tril(np.ones((5, 5), bool), -2)) == ("L", 1)


@pytest.mark.parametrize("mask", [np.zeros((4, 4), bool), np.eye(4, dtype=bool),
                                  np.ones((2, 4, 4), bool), np.triu(np.ones((4, 4)), 1)])
def test_causal_band_refuses_other_masks(mask):
    assert causal_band(mask) is None                                    # incl. a float mask


@pytest.mark.parametrize("where", ["A", "B"])
@pytest.mark.parametrize("side", ["U", "L"])
@pytest.mark.parametrize("off", [-70, -5, 0, 3, 40, 200])
def test_banded_matmul_equals_the_full_product(where, side, off, rng):
    m, k, n = 96, 80, 72
    a, b = rng.standard_normal((2, m, k)), rng.standard_normal((2, k, n))
    rows, cols = (m, k) if where == "A" else (k, n)
    i, j = np.arange(rows)[:, None], np.arange(cols)[None, :]
    zero = (j - i > off) if side == "U" else (i - j > off)
    if where == "A":
        a = np.where(zero, 0.0, a)
    else:
        b = np.where(zero, 0.0, b)
    plan = _plan(where, side, off, m, k, n)
    if (m if where == "A" else n) < MIN_DIM:
        assert plan is None
        return
    how, blocks, fills, work = plan
    op = BandedMatmul(how, blocks, fills, (2, m, n), np.float64, work)
    backend = eg.zeros(1)._backend
    np.testing.assert_allclose(op.forward(backend, a, b), a @ b, rtol=1e-12, atol=1e-12)
    out = np.full((2, m, n), np.nan)                # stale values are overwritten everywhere
    assert op.run(backend, a, b, out) is out
    np.testing.assert_allclose(out, a @ b, rtol=1e-12, atol=1e-12)
    full_zero = zero.all()
    assert work <= 1.0 and (work == 0.0) == bool(full_zero)


def _causal_attention(seq: int, masked: np.ndarray | None = None):
    def f(q, k, v):
        mask = nn.causal_mask(seq) if masked is None else eg.tensor(masked)
        out, _ = ops.composite.attention(q, k.swapaxes(-1, -2), v, ~mask)    # mask: True = blocked
        loss = (out * out).sum()
        loss.backward()
        return loss, q.grad, k.grad, v.grad
    return f


def _qkv(rng, seq):
    shape = (2, 3, seq, 16)
    return [eg.tensor(rng.standard_normal(shape), requires_grad=True) for _ in range(3)]


def test_causal_attention_forward_and_backward_use_banded_matmuls(rng):
    seq = 2 * MIN_DIM
    f = _causal_attention(seq)
    compiled = eg.jit(f)
    got = compiled(*_qkv(np.random.default_rng(0), seq))
    want = f(*_qkv(np.random.default_rng(0), seq))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-10, atol=1e-12)
    kinds = sorted(n.op.name for n in compiled.ir.nodes if isinstance(n.op, BandedMatmul))
    # probabilities @ values; value, query and key gradients
    assert kinds == ["matmul<cols:U0>", "matmul<rows:L0>", "matmul<rows:U0>", "matmul<rows:U0>"]
    stats = {s["name"]: s for s in compiled.stats()}
    assert stats["band_matmuls"]["rewritten"] == 4
    # a second call with other data reuses the planned buffers (stale contents)
    got = compiled(*_qkv(np.random.default_rng(1), seq))
    want = f(*_qkv(np.random.default_rng(1), seq))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-10, atol=1e-12)


def test_no_bands_without_a_causal_constant_mask_or_for_small_matrices(rng):
    seq = 2 * MIN_DIM
    scattered = np.random.default_rng(3).random((seq, seq)) < 0.3
    np.fill_diagonal(scattered, False)
    for f, s in ((_causal_attention(seq, scattered), seq), (_causal_attention(MIN_DIM // 2), MIN_DIM // 2)):
        compiled = eg.jit(f)
        got = compiled(*_qkv(np.random.default_rng(0), s))
        want = f(*_qkv(np.random.default_rng(0), s))
        np.testing.assert_allclose(got[0].item(), want[0].item(), rtol=1e-10)
        assert not any(isinstance(n.op, BandedMatmul) for n in compiled.ir.nodes)


def test_two_triangles_are_known_zero_only_where_both_are(rng):
    """A sum of operands zeroed above two diagonals one apart is zero on the smaller
    triangle only: the banded matmul still reads the diagonal between them."""
    n = MIN_DIM + 32

    def above(off):                       # True where column - row > off (a constant mask)
        return eg.arange(n).reshape(1, n) > eg.arange(n).reshape(n, 1) + off

    def f(a, c, b):
        return (eg.where(above(-40), 0.0, a) + eg.where(above(-39), 0.0, c)) @ b
    a, c, b = (eg.tensor(rng.standard_normal((n, n))) for _ in range(3))
    compiled = eg.jit(f)
    np.testing.assert_allclose(compiled(a, c, b).numpy(), f(a, c, b).numpy(), rtol=1e-12, atol=1e-12)
    assert [n.op.name for n in compiled.ir.nodes if isinstance(n.op, BandedMatmul)] == ["matmul<rows:U-39>"]


def test_causal_lm_training_step_with_bands_matches_eager():
    tokens = np.random.default_rng(2).integers(0, 11, (2, 2 * MIN_DIM + 1))
    states = []
    for use_jit in (False, True):
        eg.manual_seed(0)
        model = nn.CausalLM(11, 16, 2, 1, 32, dropout=0.0)
        opt = nn.optim.SGD(model.parameters(), lr=0.1)
        losses, run = train_steps(model, opt, eg.tensor(tokens[:, :-1]), eg.tensor(tokens[:, 1:]), use_jit)
        if use_jit:
            assert any(isinstance(n.op, BandedMatmul) for n in run.ir.nodes)
        states.append((losses, {k: v.numpy() for k, v in model.state_dict().items()}))
    np.testing.assert_allclose(states[1][0], states[0][0], rtol=1e-5)
    for name, value in states[0][1].items():
        np.testing.assert_allclose(states[1][1][name], value, rtol=1e-4, atol=1e-5, err_msg=name)
