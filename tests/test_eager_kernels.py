"""Eager elementwise ops as printed C kernels (backends/eager_kernels.py): with the
kernel path forced on, every op the kernels handle gives NumPy's result (to the bit
where the op is correctly rounded), for broadcasts, non-contiguous and negative-stride
inputs, scalars, integers and empty arrays, and the same bits on 1, 2 and 3 threads."""
import numpy as np
import pytest

import engine as eg
import ops
from backends import cbuild, cparallel, eager_kernels
from backends.numpy_backend import lambdify_numpy

pytestmark = pytest.mark.skipif(not cbuild.available(), reason="no C compiler: eager ops stay on NumPy")

# Correctly rounded in C as in NumPy: the kernel must match to the bit.
EXACT = {"add", "sub", "mul", "div", "neg", "abs", "sqrt", "relu", "maximum", "minimum", "sign",
         "heaviside", "where"}
OPS = [name for name, op in ops.REGISTRY.items() if op.kind == "elementwise" and op.result == "same"
       and (op.c_math == "plain" or (op.c_math == "vector" and cbuild.vector_math()))]


def test_every_vector_math_function_is_declared_simd():
    """Each function `_c_math` classes "vector" (an op's loop then runs as a kernel only with
    libmvec) is one the kernels' header declares `simd`, as printed in both float dtypes:
    else GCC would call it one element at a time."""
    from backends.cprint import c_expression
    from ops.elementwise import _VECTOR_MATH, X
    for f in _VECTOR_MATH:
        for dtype, ctype in ((np.float32, "float"), (np.float64, "double")):
            name = c_expression(f(X), {X: "x"}, dtype).split("(")[0]
            assert f" {name}({ctype});" in cbuild.VECTOR_MATH_HEADER, (f, name)


@pytest.fixture
def forced():
    """Every op through a kernel (threshold 0), split across threads at any size."""
    threads = eg.get_num_threads()
    previous = eager_kernels.set_min_elements(0)
    grain = cparallel.set_grain(1)
    yield
    cparallel.set_grain(grain)
    eager_kernels.set_min_elements(previous)
    eg.set_num_threads(threads)


def _numpy(op):
    return op.numpy if op.numpy is not None else lambdify_numpy(op)


def _inputs(op, rng, shapes, dtype):
    """One array per input, drawn from the op's domain (a condition is bool)."""
    out = []
    for k, shape in enumerate(shapes):
        domain = op.domain[k] if isinstance(op.domain, tuple) else op.domain
        if k == op.condition or domain == "bool":
            out.append(rng.random(shape) < 0.5)
        elif domain == "positive":
            out.append(rng.uniform(0.5, 2.0, shape).astype(dtype))
        else:
            out.append((rng.standard_normal(shape) * 2).astype(dtype))
    return out


def _layouts(op, rng, dtype):
    """(name, inputs): same shape, broadcasts of several patterns, a transposed input, a
    negative-stride slice, a strided inner axis, a Python scalar, an empty array."""
    n = op.nin
    big = _inputs(op, rng, [(6, 7, 9)] * n, dtype)
    cases = [("same", big),
             ("row", _inputs(op, rng, [(6, 7, 9)] + [(9,)] * (n - 1), dtype)),
             ("column", _inputs(op, rng, [(6, 7, 9)] + [(6, 7, 1)] * (n - 1), dtype)),
             ("outer", _inputs(op, rng, [(6, 1, 9)] + [(1, 7, 1)] * (n - 1), dtype)),
             ("middle", _inputs(op, rng, [(1, 7, 1)] + [(6, 7, 9)] * (n - 1), dtype)),
             ("transposed", [a.transpose(2, 0, 1) for a in big]),
             ("reversed", [a[::-1, :, ::-2] for a in big]),
             ("empty", _inputs(op, rng, [(0, 5)] * n, dtype))]
    if n >= 2 and op.condition is None:
        cases.append(("scalar", [big[0], 1.5] + big[2:]))
    return cases


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", OPS)
def test_forced_kernels_equal_numpy(forced, name, dtype, rng):
    op = ops.REGISTRY[name]
    for layout, args in _layouts(op, rng, dtype):
        want = np.asarray(_numpy(op)(*args))
        got = eager_kernels.run(op, tuple(args))
        assert got is not None, (name, layout)
        assert got.shape == want.shape and got.dtype == want.dtype, (name, layout)
        if name in EXACT:
            np.testing.assert_array_equal(got, want, err_msg=f"{name} {layout}")
        else:                         # libm's exp/log/log1p/tanh/erf, or another order of operations
            tol = dict(rtol=2e-6, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-13)
            np.testing.assert_allclose(got, want, **tol, err_msg=f"{name} {layout}")


def test_eager_ops_run_as_kernels_and_keep_their_results(forced, rng):
    """Through the engine: the hook in the NumPy backend sends the op to a kernel, and
    float32 add/mul/sub/div are bit-identical to NumPy's, broadcasts included."""
    x = rng.standard_normal((40, 33)).astype(np.float32)
    y = rng.uniform(0.5, 2, (33,)).astype(np.float32)
    before = eager_kernels.kernel_calls()
    tx, ty = eg.tensor(x), eg.tensor(y)
    for got, want in ((tx + ty, x + y), (tx * ty, x * y), (tx - ty, x - y), (tx / ty, x / y),
                      (eg.tensor(y[:, None]) * tx.T, y[:, None] * x.T), (tx * 0.1, x * np.float32(0.1))):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_allclose(eg.gelu(tx).numpy(), lambdify_numpy(ops.REGISTRY["gelu"])(x), rtol=2e-6, atol=2e-6)
    assert eager_kernels.kernel_calls() >= before + 7


def test_gradients_through_kernels_equal_numpy(forced, rng):
    x = rng.standard_normal((20, 30))
    w = rng.standard_normal(30)

    def loss(x, w):
        return (eg.tanh(x * w + 1.0) * eg.relu(x - w)).sum()
    grads = eg.grad(loss, argnums=(0, 1))(eg.tensor(x), eg.tensor(w))
    previous = eager_kernels.set_min_elements(1 << 40)
    try:
        want = eg.grad(loss, argnums=(0, 1))(eg.tensor(x), eg.tensor(w))
    finally:
        eager_kernels.set_min_elements(previous)
    for g, h in zip(grads, want):
        np.testing.assert_allclose(g.numpy(), h.numpy(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint64])
def test_integer_sums_and_products_wrap_as_in_numpy(forced, dtype, rng):
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max, (50, 40), dtype=dtype, endpoint=True)
    y = rng.integers(info.min, info.max, (40,), dtype=dtype, endpoint=True)
    for name in ("add", "sub", "mul"):
        op = ops.REGISTRY[name]
        for args in ((x, y), (x.T, x.T[::-1]), (x, 3)):
            got = eager_kernels.run(op, args)
            assert got is not None
            np.testing.assert_array_equal(got, _numpy(op)(*args))
    # integer division, maximum or a float scalar with integers: NumPy's business
    assert eager_kernels.run(ops.REGISTRY["maximum"], (x, y)) is None
    assert eager_kernels.run(ops.REGISTRY["add"], (x, 1.5)) is None


def test_results_are_bit_identical_across_thread_counts(forced, rng):
    x = rng.standard_normal((300, 257)).astype(np.float32)
    y = rng.standard_normal((300, 1)).astype(np.float32)
    flat = rng.standard_normal(100_003)
    cases = [("gelu", (x.T,)), ("add", (x, y)), ("exp", (flat,)), ("sigmoid", (x[:, ::3],)),
             ("adam_param", (x, x, np.abs(x), 0.1, 0.9, 0.99, 1e-8))]
    results, parallel = [], []
    for n in (1, 2, 3):
        eg.set_num_threads(n)
        before = cparallel.parallel_loops()
        results.append([eager_kernels.run(ops.REGISTRY[name], args) for name, args in cases])
        parallel.append(cparallel.parallel_loops() - before)
    assert parallel[0] == 0 and all(p == len(cases) for p in parallel[1:])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_out_is_written_in_place_unless_it_overlaps_an_input(forced, rng):
    op = ops.REGISTRY["lerp"]
    a, b = rng.standard_normal((2, 64, 64))
    fn = op.impl(eg.state.get_backend("cpu"))
    want = _numpy(op)(a, b, 0.25)
    out = np.empty_like(a)
    before = eager_kernels.kernel_calls()
    assert fn(a, b, 0.25, out=out) is out
    assert eager_kernels.kernel_calls() == before + 1
    np.testing.assert_allclose(out, want, rtol=1e-15, atol=1e-15)
    fn(a, b, 0.25, out=a)                     # in place: NumPy handles the overlap
    assert eager_kernels.kernel_calls() == before + 1
    np.testing.assert_allclose(a, want, rtol=1e-15, atol=1e-15)


def test_small_arrays_and_unhandled_inputs_stay_on_numpy(rng):
    """Below the threshold, mixed dtypes, float16 and bool results run NumPy."""
    x = rng.standard_normal(1000).astype(np.float32)
    before = eager_kernels.kernel_calls()
    eg.exp(eg.tensor(x))
    assert eager_kernels.kernel_calls() == before
    previous = eager_kernels.set_min_elements(0)
    try:
        big = rng.standard_normal(eager_kernels.MIN_ELEMENTS).astype(np.float32)
        for args in ((big, big.astype(np.float64)), (big.astype(np.float16), big.astype(np.float16))):
            assert eager_kernels.run(ops.REGISTRY["add"], args) is None
        assert eager_kernels.run(ops.REGISTRY["lt"], (big, big)) is None
        np.testing.assert_array_equal((eg.tensor(big) < 0).numpy(), big < 0)
    finally:
        eager_kernels.set_min_elements(previous)


@pytest.mark.skipif(not cbuild.available(), reason="needs a C compiler")
def test_jit_decides_the_path_of_its_fixed_sizes_once(rng):
    """A compiled program's elementwise calls below the kernel size bind NumPy's function
    (no per-call size test); where the kernel applies they keep the deciding function, so
    the jit runs what eager runs at that size, and both give the same values."""
    x = eg.tensor(rng.standard_normal((1000,)).astype(np.float32))
    f = eg.jit(lambda a: eg.exp(a) + 1.0, fuse=False)
    small = f(x).numpy()
    assert not any(getattr(v, "__name__", "") == "exp_eager"
                   for v in f._last.generated.namespace.values())
    previous = eager_kernels.set_min_elements(0)
    try:
        g = eg.jit(lambda a: eg.exp(a) + 1.0, fuse=False)
        before = eager_kernels.kernel_calls()
        got = g(x).numpy()
        assert eager_kernels.kernel_calls() > before
        assert any(getattr(v, "__name__", "") == "exp_eager"
                   for v in g._last.generated.namespace.values())
    finally:
        eager_kernels.set_min_elements(previous)
    np.testing.assert_allclose(got, np.exp(x.numpy()) + 1.0, rtol=1e-6)
    np.testing.assert_allclose(small, got, rtol=1e-6)


def test_kernels_are_cached_per_spec_not_per_name(forced, rng):
    """Two unregistered ops sharing a name each run their own expression."""
    from ops.elementwise import X, ElementwiseOp
    twice = ElementwiseOp("scaled", 2 * X, (X,))
    thrice = ElementwiseOp("scaled", 3 * X, (X,))
    x = rng.standard_normal(100)
    np.testing.assert_array_equal(eager_kernels.run(twice, (x,)), 2 * x)
    np.testing.assert_array_equal(eager_kernels.run(thrice, (x,)), 3 * x)
