"""The NumPy backend's C kernels: every row program's printed kernel equals the program
run step by step on NumPy (and its NumPy reference); the row scatter-add equals add.at."""
import numpy as np
import pytest

import ops
from backends import cbuild, get_backend, host_kernels
from ops.rows import RowOp, evaluate

pytestmark = pytest.mark.skipif(not cbuild.available(), reason="no C compiler: NumPy paths only")

ROW_OPS = sorted(name for name, op in ops.REGISTRY.items() if isinstance(op, RowOp))


def _softmax_reference(x, log=False):
    """The decomposition in ops/fused.py, in NumPy."""
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(m == -np.inf, 0.0, m).astype(x.dtype)
    e = np.exp(x - m)
    s = e.sum(axis=-1, keepdims=True)
    s = np.where(s == 0, 1.0, s).astype(x.dtype)
    return (x - m) - np.log(s) if log else e / s


def _rows(dtype, rng):
    x = rng.standard_normal((6, 37)).astype(dtype) * 5
    x[1, 3] = -np.inf                     # a masked entry
    x[2, :] = -np.inf                     # a fully masked row: softmax 0, log_softmax -inf
    x[3, 7] = np.nan                      # NaN spreads over its row only
    x[4, 0] = 80.0                        # a large logit: no overflow after the shift
    x[5, 1] = -200.0                      # exp(x - max) below the fast path: patched exactly
    return x


# A value for each program parameter; ignore_index is -100 and names the first row.
PARAMS = {"eps": 1e-5, "label_smoothing": 0.1, "ignore_index": -100, "keepdims": False}


def _targets(shape, rng):
    """One class per row: the first row ignored, the second aiming at a finite logit
    next to a -inf one (row 1 of `_rows`)."""
    t = rng.integers(0, shape[-1], shape[:-1])
    t.reshape(-1)[0] = -100
    t.reshape(-1)[1] = 4
    return t


def _case(op, dtype, rng, masked=True, **overrides):
    """Inputs and params for `op` over rows of 37 (and 70: the 32-wide sum loop runs twice)."""
    prog = op.rows
    x = _rows(dtype, rng) if masked else (rng.standard_normal((3, 4, 70)) * 4 + 1).astype(dtype)
    cols = [rng.standard_normal(x.shape[-1]).astype(dtype) for _ in prog.cols]
    per_row = [rng.standard_normal(x.shape[:-1]).astype(dtype) for _ in prog.scalars]
    indices = [_targets(x.shape, rng) for _ in prog.indices]
    params = {str(p): overrides.get(str(p), PARAMS[str(p)]) for p in prog.params}
    if prog.axis:
        params[prog.axis] = x.ndim - 1
    return [x] + cols + per_row + indices, params


def _reference(op, arrays, params):
    """The op's NumPy reference in float64, with the program's parameters."""
    floats = [a.astype(np.float64) if a.dtype.kind == "f" else a for a in arrays]
    extra = {"keepdims": False} if op.name == "logsumexp" else {}
    return np.asarray(op.reference(*floats, **params, **extra))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("name", ROW_OPS)
def test_printed_row_kernels_equal_the_program_on_numpy(name, masked, dtype, rng):
    """The C kernel printed from each row program equals the same program run step by step
    on NumPy and the op's NumPy reference: -inf rows, NaN and tiny exponentials included."""
    op = ops.REGISTRY[name]
    arrays, params = _case(op, dtype, rng, masked)
    got = host_kernels.run_rows(op.rows, tuple(arrays), params)
    shape = arrays[0].shape[:-1] if op.rows.reduces else arrays[0].shape
    assert got is not None and got.dtype == dtype and got.shape == shape
    with np.errstate(all="ignore"):
        want = evaluate(op.rows, get_backend("cpu"), arrays, params)
        ref = _reference(op, arrays, params)
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, **tol)
    finite = np.isfinite(want) & np.isfinite(ref)
    np.testing.assert_allclose(got[finite], ref[finite], **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_kernels_keep_the_masking_conventions(dtype, log, rng):
    op = ops.REGISTRY["log_softmax" if log else "softmax"]
    x = _rows(dtype, rng)
    got = host_kernels.run_rows(op.rows, (x,), dict(axis=1))
    want = _softmax_reference(x, log)
    tol = dict(rtol=2e-6, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-14)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(got, want, **tol)
    assert np.isnan(got[3]).all() and not np.isnan(np.delete(got, 3, axis=0)).any()
    if not log:
        np.testing.assert_array_equal(got[2], 0.0)
        np.testing.assert_allclose(np.delete(got, 3, axis=0).sum(-1)[[0, 1, 3, 4]], 1.0, rtol=1e-5)
    else:
        assert np.all(got[2] == -np.inf)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_row_max_reads_every_position(dtype):
    """A row's one large entry, at any position (every vector lane and the tail), is its
    max: softmax is then exactly one-hot, where a shift that missed it overflows exp."""
    x = np.zeros((37, 37), dtype)
    np.fill_diagonal(x, 1000.0)
    got = host_kernels.run_rows(ops.REGISTRY["softmax"].rows, (x,), dict(axis=1))
    np.testing.assert_array_equal(got, np.eye(37, dtype=dtype))


def test_kernels_decline_what_they_do_not_handle(rng):
    x = rng.standard_normal((4, 5))
    soft, ln = ops.REGISTRY["softmax"].rows, ops.REGISTRY["layer_norm"].rows
    assert host_kernels.run_rows(soft, (x,), dict(axis=0)) is None                     # not the last axis
    assert host_kernels.run_rows(soft, (x.T,), dict(axis=1)) is None                   # not C-contiguous
    assert host_kernels.run_rows(soft, (x.astype(np.float16),), dict(axis=1)) is None  # no half kernels
    assert host_kernels.run_rows(soft, (np.zeros((3, 0)),), dict(axis=1)) is None      # empty rows
    w = np.ones(5, np.float32)
    assert host_kernels.run_rows(ln, (x, w, w), dict(eps=1e-5)) is None                # mixed dtypes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scatter_add_rows_matches_add_at(dtype, rng):
    idx = rng.integers(-7, 7, size=(5, 9))                   # repeats and negative indices
    values = rng.standard_normal((5, 9, 3, 2)).astype(dtype)
    got = host_kernels.scatter_add_rows((7, 3, 2), idx, values)
    want = np.zeros((7, 3, 2), dtype)
    np.add.at(want, (idx,), values)
    np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == np.float32 else 1e-14, atol=1e-6)
    assert host_kernels.scatter_add_rows((7, 3, 2), idx + 7, values) is None    # out of range
    assert host_kernels.scatter_add_rows((7, 6), idx, values) is None           # not whole rows
