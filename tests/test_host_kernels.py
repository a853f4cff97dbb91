"""The NumPy backend's C kernels for the fused ops equal their primitive decompositions."""
import numpy as np
import pytest

from backends import cbuild, host_kernels

pytestmark = pytest.mark.skipif(not cbuild.available(), reason="no C compiler: NumPy paths only")


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
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_kernels_match_the_decomposition(dtype, log, rng):
    x = _rows(dtype, rng)
    got = host_kernels.softmax(x, 1, log=log)
    want = _softmax_reference(x, log)
    assert got is not None and got.dtype == x.dtype
    tol = dict(rtol=2e-6, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-14)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(got, want, **tol)
    assert np.isnan(got[3]).all() and not np.isnan(np.delete(got, 3, axis=0)).any()
    if not log:
        np.testing.assert_array_equal(got[2], 0.0)
        np.testing.assert_allclose(np.delete(got, 3, axis=0).sum(-1)[[0, 1, 3, 4]], 1.0, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_norm_kernel_matches_the_decomposition(dtype, rng):
    x = (rng.standard_normal((3, 4, 33)) * 10 + 3).astype(dtype)
    w, b = rng.standard_normal(33).astype(dtype), rng.standard_normal(33).astype(dtype)
    got = host_kernels.layer_norm(x, w, b, 1e-5)
    xc = x - x.sum(-1, keepdims=True) / dtype(33)
    want = xc * (1 / np.sqrt((xc * xc).sum(-1, keepdims=True) / dtype(33) + dtype(1e-5))) * w + b
    assert got is not None and got.dtype == x.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-5 if dtype == np.float32 else 1e-12)


def test_kernels_decline_what_they_do_not_handle(rng):
    x = rng.standard_normal((4, 5))
    assert host_kernels.softmax(x, 0) is None                      # not the last axis
    assert host_kernels.softmax(x.T, 1) is None                    # not C-contiguous
    assert host_kernels.softmax(x.astype(np.float16), 1) is None   # no half kernels
    assert host_kernels.softmax(np.zeros((3, 0)), 1) is None       # empty rows
    w = np.ones(5, np.float32)
    assert host_kernels.layer_norm(x, w, w, 1e-5) is None          # mixed dtypes


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
