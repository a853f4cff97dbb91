"""Mixed precision: autocast runs matmuls in float16, GradScaler keeps gradients alive."""
import numpy as np
import pytest

import engine as eg
from engine import nn
import nn.amp  # noqa: F401  (also exported as nn.amp)


def test_autocast_runs_matmul_in_float16_and_grads_reach_float32_params():
    w = eg.tensor(np.random.default_rng(0).standard_normal((4, 3)), dtype=eg.float32, requires_grad=True)
    x = eg.ones(2, 4)
    with eg.autocast():
        y = x @ w
        z = (y + eg.ones(3)).sum()
    assert y.dtype == np.float16 and z.dtype == np.float32
    z.backward()
    assert w.grad.dtype == np.float32
    np.testing.assert_allclose(w.grad.numpy(), np.full((4, 3), 2.0), rtol=1e-3)
    assert (x @ w).dtype == np.float32                 # only inside the block


def test_float16_reductions_and_matmul_accumulate_in_float32():
    x = eg.full((4096,), 0.1, dtype=eg.float16)
    assert abs(x.sum().item() - 409.6) < 0.5           # float16 accumulation would stall near 256
    a = eg.full((1, 4096), 0.1, dtype=eg.float16)
    assert abs((a @ a.T).item() - 40.96) < 0.1


def test_float16_sums_across_rows_accumulate_in_float32():
    """Over a strided axis NumPy adds in float16 element by element (no pairwise sum):
    4096 * 0.1 would stall at 256."""
    x = eg.full((4096, 2), 0.1, dtype=eg.float16)
    np.testing.assert_allclose(x.sum(axis=0).numpy().astype(np.float64), 409.5, atol=0.5)


def test_grad_scaler_skips_overflowing_steps_and_backs_off():
    p = nn.Parameter(eg.ones(3))
    opt = nn.optim.SGD([p], lr=0.1)
    scaler = nn.amp.GradScaler(init_scale=2.0 ** 140, growth_interval=2)   # scaled grads overflow float32
    for _ in range(3):
        opt.zero_grad()
        scaler.scale((p * 1e3).sum()).backward()
        stepped = scaler.step(opt)
        scaler.update()
        assert not stepped
    assert scaler.skipped_steps == 3 and scaler.scale_value == 2.0 ** 137
    np.testing.assert_array_equal(p.numpy(), 1.0)
    scaler = nn.amp.GradScaler(init_scale=4.0, growth_interval=2)
    for _ in range(2):
        opt.zero_grad()
        scaler.scale(p.sum()).backward()
        assert scaler.step(opt)
        scaler.update()
    np.testing.assert_allclose(p.numpy(), 0.8, rtol=1e-6)   # unscaled gradient 1, two steps of 0.1
    assert scaler.scale_value == 8.0


def test_toy_model_trains_in_mixed_precision():
    eg.manual_seed(0)
    rng = np.random.default_rng(0)
    x = eg.tensor(rng.standard_normal((64, 8)), dtype=eg.float32)
    y = eg.tensor((rng.standard_normal((8, 1)) * 0.5), dtype=eg.float32)
    target = x @ y
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = nn.optim.Adam(model.parameters(), lr=1e-2)
    scaler = nn.amp.GradScaler(init_scale=2.0 ** 12)
    first = None
    for _ in range(150):
        opt.zero_grad()
        with eg.autocast():
            loss = nn.functional.mse_loss(model(x), target)
        first = first if first is not None else loss.item()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert loss.item() < 0.05 * first
    assert all(p.dtype == np.float32 for p in model.parameters())


def _tied_logits_case(scale):
    """Hidden states and a tied output table whose float16 logits reach ~5.6e4: they fit
    float16 (max 65504), but the max-shifted logits of a softmax (x - max) do not."""
    rng = np.random.default_rng(0)
    h = eg.tensor(rng.standard_normal((4, 8)).astype(np.float32) * scale, requires_grad=True)
    table = nn.Parameter(eg.tensor(rng.standard_normal((6, 8)).astype(np.float32) * scale))
    return h, table, eg.tensor([0, 1, 2, 3])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_large_float16_logits_give_a_finite_float32_loss():
    h, table, target = _tied_logits_case(100.0)
    with eg.autocast():
        logits = h @ table.T
        loss = nn.functional.cross_entropy(logits, target)
    assert logits.dtype == np.float16 and np.isfinite(logits.numpy()).all()
    assert loss.dtype == np.float32 and np.isfinite(loss.item())
    z = logits.numpy().astype(np.float64)
    shifted = z - z.max(1, keepdims=True)
    ref = -(shifted - np.log(np.exp(shifted).sum(1, keepdims=True)))[np.arange(4), [0, 1, 2, 3]]
    assert loss.item() == pytest.approx(ref.mean(), rel=1e-6)
    mse = nn.functional.mse_loss(logits, eg.zeros(4, 6, dtype=eg.float16))
    assert mse.dtype == np.float32 and np.isfinite(mse.item())     # squares of 5e4 overflow float16
    loss.backward()
    assert np.isfinite(table.grad.numpy()).all() and table.grad.dtype == np.float32


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_overflowing_logits_skip_the_step_and_never_make_parameters_nan(optimizer):
    """Weights so large that the float16 matmul overflows: the loss is not finite, the
    scaler finds inf/NaN gradients, skips the update and backs off; parameters and
    optimizer state stay exactly as they were, and training continues once the
    activations fit again."""
    eg.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    with eg.no_grad():
        model[0].weight[...] = 7e4 * eg.ones(8, 16)          # beyond float16's 65504
    opt = (nn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "SGD"
           else nn.optim.AdamW(model.parameters(), lr=1e-3))
    scaler = nn.amp.GradScaler(init_scale=2.0 ** 10)
    x, target = eg.ones(4, 8), eg.tensor([0, 1, 2, 3])
    before = [p.numpy().copy() for p in model.parameters()]

    def step():
        opt.zero_grad()
        with eg.autocast():
            loss = nn.functional.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        stepped = scaler.step(opt)
        scaler.update()
        return loss, stepped

    loss, stepped = step()
    assert not np.isfinite(loss.item()) and not stepped
    assert scaler.skipped_steps == 1 and scaler.scale_value == 2.0 ** 9
    for p, b in zip(model.parameters(), before):
        np.testing.assert_array_equal(p.numpy(), b)
    assert all(np.isfinite(t.numpy()).all() for s in opt.state.values() for t in s.values()
               if isinstance(t, eg.Tensor))
    with eg.no_grad():
        model[0].weight[...] = 0.1 * eg.ones(8, 16)
    loss, stepped = step()
    assert np.isfinite(loss.item()) and stepped
    assert all(np.isfinite(p.numpy()).all() for p in model.parameters())
