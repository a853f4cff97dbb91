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
