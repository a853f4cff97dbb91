"""Layer norm's forward inside a row group: the elementwise group producing its input
(a residual add, a bias, a mask) and the norm run row by row in one C kernel, which
writes the sum (read later) and the normalised rows in one pass. Values, gradients
and training steps equal eager mode's, for odd row lengths, a single row, masked
inputs, both float types and post-norm / pre-norm Transformers."""
import numpy as np
import pytest

import engine as eg
from engine import nn
from engine.compiler import ckernels

from .steps import train_steps

needs_c = pytest.mark.skipif(not ckernels.available(), reason="no C compiler: no row kernels")


def _row_lines(j):
    return [line for line in j.source.splitlines() if "# C: rows[" in line]


def _residual_norm(x, r, b, w, c, keep):
    h = eg.where(keep, x + b, 0.0) + r
    return h, eg.layer_norm(h, w, c)


@needs_c
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 5, 37), (1, 9), (2, 300), (4, 1, 8)])
def test_residual_add_and_layer_norm_run_as_one_row_kernel(shape, dtype, rng):
    x, r = (eg.tensor(rng.standard_normal(shape).astype(dtype) * 3 + 1) for _ in range(2))
    b, w, c = (eg.tensor(rng.standard_normal(shape[-1]).astype(dtype)) for _ in range(3))
    keep = eg.tensor(rng.random(shape[-1]) < 0.7)
    j = eg.jit(_residual_norm)
    got, want = j(x, r, b, w, c, keep), _residual_norm(x, r, b, w, c, keep)
    (line,) = _row_lines(j)
    assert line.rstrip().endswith(",layer_norm]") and "fused[" in line
    assert j.source.count("_rows") == 1 and j.source.count("# C:") == 1     # one pass
    for a, e in zip(got, want):                            # the same C on the same rows
        np.testing.assert_array_equal(a.numpy(), e.numpy())


@needs_c
def test_layer_norm_of_a_row_group_input_and_a_chain_of_row_ops(rng):
    """The norm's row read straight from an input, and a norm of a norm."""
    x = eg.tensor(rng.standard_normal((6, 40)))
    w, c = (eg.tensor(rng.standard_normal(40)) for _ in range(2))
    f = lambda x, w, c: eg.layer_norm(eg.layer_norm(x, w, c) * 2.0 + 1.0, w, c, eps=1e-3)
    j = eg.jit(f)
    np.testing.assert_allclose(j(x, w, c).numpy(), f(x, w, c).numpy(), rtol=1e-13, atol=1e-13)
    (line,) = _row_lines(j)
    assert line.count("layer_norm") == 2


@needs_c
def test_gradients_through_the_fused_norm_equal_eager(rng):
    x, r = (eg.tensor(rng.standard_normal((5, 7, 33)), requires_grad=True) for _ in range(2))
    b, w, c = (eg.tensor(rng.standard_normal(33), requires_grad=True) for _ in range(3))
    keep = eg.tensor(rng.random(33) < 0.7)
    g = eg.tensor(rng.standard_normal((5, 7, 33)))

    def grads(x, r, b, w, c):
        def loss(x, r, b, w, c):
            h, y = _residual_norm(x, r, b, w, c, keep)
            return (y * g).sum() + (h * h).sum()
        values = _residual_norm(x, r, b, w, c, keep)
        return values + tuple(eg.grad(loss, argnums=(0, 1, 2, 3, 4))(x, r, b, w, c))
    j = eg.jit(grads)
    for got, want in zip(j(x, r, b, w, c), grads(x, r, b, w, c)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-11, atol=1e-11)
    assert any(",layer_norm" in line for line in _row_lines(j))


@needs_c
@pytest.mark.parametrize("norm_first", [False, True])
def test_training_steps_with_fused_norms_equal_eager(norm_first, rng):
    tokens = rng.integers(0, 11, (3, 9))
    losses, params = [], []
    for use_jit in (False, True):
        eg.manual_seed(0)
        model = nn.CausalLM(11, d_model=24, nhead=2, num_layers=2, dim_feedforward=40, dropout=0.0,
                            max_len=16, norm_first=norm_first)
        opt = nn.optim.AdamW(model.parameters(), lr=1e-2, capturable=use_jit)
        step_losses, run = train_steps(model, opt, eg.tensor(tokens[:, :-1]), eg.tensor(tokens[:, 1:]), use_jit)
        losses.append(step_losses)
        # (a key bias's true gradient is 0, softmax being shift-invariant along the keys:
        # Adam scales its rounding noise up to the step size, in eager mode and jit alike)
        params.append([p.numpy().copy() for name, p in model.named_parameters() if not name.endswith("k.bias")])
        if use_jit:
            assert any("layer_norm]" in line for line in _row_lines(run))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    for a, e in zip(params[1], params[0]):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)
