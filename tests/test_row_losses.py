"""The reducing row programs: logsumexp and the per-row losses (cross-entropy, nll).

Their printed C kernels equal the NumPy references (float32 and float64, odd row
lengths, one row, rows of -inf, an ignored row holding NaN / inf, label smoothing),
the `pick` step never reads outside its row, logsumexp follows PyTorch at +-inf,
the losses that nn calls run through the printed kernel, and a jit-compiled training
step with cross_entropy equals the eager one."""
from __future__ import annotations

import numpy as np
import pytest
import sympy

import engine as eg
import ops
from backends import cbuild, get_backend, host_kernels
from engine import nn
from ops.rows import RowProgram, Step, evaluate, symbols

F = nn.functional
R = ops.REGISTRY
needs_cc = pytest.mark.skipif(not cbuild.available(), reason="no C compiler: NumPy paths only")
LOSSES = ["cross_entropy_per_row", "nll_per_row"]


def _logits(rows: int, n: int, dtype, rng) -> tuple[np.ndarray, np.ndarray]:
    """Logits with every hazard a row can hold, and targets: row 0 ignored and poisoned,
    row 1 -inf at non-target classes, row 2 all -inf (its loss is +inf), the rest plain."""
    x = (rng.standard_normal((rows, n)) * 4).astype(dtype)
    t = rng.integers(0, n, rows)
    if rows >= 3:
        x[0] = np.nan
        x[0, 0] = np.inf
        t[0] = -100
        x[1, ::2] = -np.inf
        t[1] = 1 if n > 1 else 0
        x[1, t[1]] = 0.5
        x[2] = -np.inf
    return x, t


def _check(got: np.ndarray, ref: np.ndarray, dtype) -> None:
    tol = dict(rtol=3e-6, atol=3e-6) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(got[finite], ref[finite], **tol)


@needs_cc
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 7), (5, 1), (6, 37), (4, 70)], ids=["one-row", "one-class", "odd", "twice-32"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("name", LOSSES)
def test_printed_loss_kernels_equal_the_numpy_reference(name, smoothing, shape, dtype, rng):
    op = R[name]
    x, t = _logits(*shape, dtype, rng)
    params = dict(ignore_index=-100, label_smoothing=smoothing)
    got = host_kernels.run_rows(op.rows, (x, t), params)
    assert got is not None and got.dtype == dtype and got.shape == t.shape
    with np.errstate(all="ignore"):
        ref = op.reference(x.astype(np.float64), t, **params)
        stepwise = evaluate(op.rows, get_backend("cpu"), [x, t], params)
    _check(got, ref, dtype)
    _check(stepwise, ref, dtype)
    if shape[0] >= 3:
        assert got[0] == 0                              # ignored: exactly 0 whatever it holds
        assert np.isfinite(got[1])                      # -inf at other classes only
        assert got[2] == np.inf                         # the target itself at -inf


@needs_cc
@pytest.mark.parametrize("index_dtype", [np.int32, np.uint8, "strided"])
@pytest.mark.parametrize("name", LOSSES)
def test_loss_kernels_read_any_integer_targets_as_int64(name, index_dtype, rng):
    """The kernel reads class indices as int64: narrower integers and strided views are
    converted first (read in place they would be other classes, or past the row)."""
    op = R[name]
    x, t = _logits(6, 37, np.float32, rng)
    t = np.where(t < 0, 5, t)                           # no ignored row: every row picks
    params = dict(ignore_index=-100, label_smoothing=0.0)
    want = host_kernels.run_rows(op.rows, (x, t.astype(np.int64)), params)
    other = np.repeat(t, 2)[::2] if index_dtype == "strided" else t.astype(index_dtype)
    got = host_kernels.run_rows(op.rows, (x, other), params)
    assert got is not None
    np.testing.assert_array_equal(got, want)


@needs_cc
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_printed_logsumexp_equals_numpy(dtype, rng):
    x = (rng.standard_normal((6, 37)) * 5).astype(dtype)
    x[0] = -np.inf                                      # all -inf: -inf
    x[1, 3] = np.inf                                    # +inf: +inf
    x[2, 4] = np.nan                                    # NaN: NaN
    x[3, :5] = -np.inf
    got = host_kernels.run_rows(R["logsumexp"].rows, (x,), dict(axis=1))
    with np.errstate(all="ignore"):
        ref = np.logaddexp.reduce(x.astype(np.float64), axis=1)
    _check(got, ref, dtype)
    assert got[0] == -np.inf and got[1] == np.inf and np.isnan(got[2])


def test_pick_outside_the_row_is_nan_never_a_stray_read(rng):
    """A target outside [0, C) that is not ignore_index: NaN from the kernel and from the
    program on NumPy (nn refuses such targets by value before)."""
    x = rng.standard_normal((3, 5))
    t = np.array([5, -1, 2])
    params = dict(ignore_index=-100, label_smoothing=0.0)
    for run in ([host_kernels.run_rows] if cbuild.available() else []) + \
            [lambda p, a, k: evaluate(p, get_backend("cpu"), a, k)]:
        got = run(R["cross_entropy_per_row"].rows, (x, t), params)
        assert np.isnan(got[:2]).all() and np.isfinite(got[2])


def test_a_pick_step_is_declared_with_its_index():
    x, t, v = symbols("x t v")
    with pytest.raises(ValueError, match="needs `at`"):
        RowProgram("bad", rows=(x,), indices=(t,), steps=(Step(v, "pick", x),))
    with pytest.raises(ValueError, match="needs `at`"):
        RowProgram("bad", rows=(x,), indices=(t,), steps=(Step(v, "map", x, at=t),))
    with pytest.raises(ValueError, match="row expression"):
        RowProgram("bad", rows=(x,), indices=(t,), steps=(Step(v, "pick", sympy.Integer(1), at=t),))
    x2, t2 = np.zeros((2, 3)), np.array([0, 1])
    params = dict(ignore_index=0, label_smoothing=0.0)
    assert host_kernels.run_rows(R["nll_per_row"].rows, (x2, t2.astype(np.float64)), params) is None  # float index
    assert host_kernels.run_rows(R["nll_per_row"].rows, (x2, t2[:1]), params) is None    # not one per row
    assert host_kernels.run_rows(R["nll_per_row_grad"].rows, (x2, np.zeros(3), t2), params) is None  # cotangent
    with pytest.raises(TypeError, match="expected 2 arrays"):
        host_kernels.run_rows(R["nll_per_row"].rows, (np.zeros((2, 3)),), dict(ignore_index=0, label_smoothing=0.0))


# -- logsumexp as PyTorch ----------------------------------------------------------------------

@pytest.mark.parametrize("axis,keepdims", [(-1, False), (0, True), ((0, 2), False), (None, True)])
def test_logsumexp_matches_torch(axis, keepdims, rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((3, 4, 5)) * 3
    x[0, 1] = -np.inf
    x[1, 2, 3] = np.inf
    x[2, 0, :] = -np.inf
    dims = tuple(range(3)) if axis is None else axis
    want = torch.logsumexp(torch.tensor(x), dim=dims, keepdim=keepdims).numpy()
    got = eg.logsumexp(eg.tensor(x), axis, keepdims).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-13)
    empty = eg.logsumexp(eg.tensor(np.zeros((2, 0))), -1).numpy()
    np.testing.assert_array_equal(empty, torch.logsumexp(torch.zeros(2, 0), 1).numpy())


def test_logsumexp_gradient_is_softmax_and_zero_on_all_minus_inf_rows(rng):
    x = rng.standard_normal((3, 4))
    x[1] = -np.inf
    tx = eg.tensor(x, requires_grad=True)
    eg.logsumexp(tx, -1).sum().backward()
    e = np.exp(x[[0, 2]] - x[[0, 2]].max(-1, keepdims=True))
    np.testing.assert_allclose(tx.grad.numpy()[[0, 2]], e / e.sum(-1, keepdims=True), rtol=1e-13)
    assert (tx.grad.numpy()[1] == 0).all()


# -- what trains ----------------------------------------------------------------------------------

@needs_cc
@pytest.mark.parametrize("name,fn", [("cross_entropy_per_row", lambda x, t: F.cross_entropy(x, t)),
                                     ("nll_per_row", lambda x, t: F.nll_loss(eg.log_softmax(x, -1), t))])
def test_nn_losses_run_the_printed_kernel(name, fn, monkeypatch, rng):
    ran = []
    real = host_kernels.run_rows
    monkeypatch.setattr(host_kernels, "run_rows", lambda p, a, k: ran.append((p.name, real(p, a, k) is not None))
                        or real(p, a, k))
    fn(eg.tensor(rng.standard_normal((4, 9)).astype(np.float32)), eg.tensor(np.array([1, -100, 3, 8])))
    assert (name, True) in ran


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_jit_training_step_with_cross_entropy_equals_eager(smoothing, rng):
    w = eg.tensor(rng.standard_normal((6, 11)).astype(np.float32), requires_grad=True)
    b = eg.tensor(np.zeros(11, np.float32), requires_grad=True)
    x = eg.tensor(rng.standard_normal((2, 5, 6)).astype(np.float32))
    t = rng.integers(0, 11, (2, 5))
    t[0, 1] = t[1, 4] = -100
    mask = np.zeros((2, 5, 11), np.float32)
    mask[:, :, 3] = -np.inf                             # a class nobody may predict
    mask[0, 1] = np.nan                                 # an ignored position's logits poisoned

    def step(x, t):
        w.grad = b.grad = None
        loss = F.cross_entropy(x @ w + b + eg.tensor(mask), t, label_smoothing=smoothing)
        loss.backward()
        return loss, w.grad, b.grad

    compiled = eg.jit(step)
    eager = [v.numpy() for v in step(x, eg.tensor(t))]
    for _ in range(2):                                  # the trace call, then the compiled program
        got = [v.numpy() for v in compiled(x, eg.tensor(t))]
        for a, e in zip(got, eager):
            assert np.isfinite(a).all()
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
