"""The fused attention kernel of the CUDA backend (ops/attention.py, backends/attnprint.py).

On the emulated device of tests/test_cuda.py (and on a GPU when there is one) the
composite `attention` runs as one printed kernel where the backend offers it; here it
is checked against the same composite run from primitives on the same device (the
offer withdrawn) and against NumPy: masks of every kind, rows with no allowed key,
dropout drawing the composite's bits, gradients, the limits and what falls back
beyond them, nn.MultiheadAttention. The emulation fills dynamic shared memory with
NaN before every block, so a kernel reading a row it did not write fails here. Every
printed kernel is compiled with nvcc where it is installed.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import sympy

import backends
import engine as eg
from backends import attnprint, cupy_backend as cb
from engine import nn
from ops import GradError
from ops.attention import attention_backward, fused_attention
from ops.composite import attention
from ops.fused import SOFTMAX, SOFTMAX_GRAD
from ops.rows import evaluate
from tests import test_cuda_codegen as codegen
from tests.test_cuda import cuda, emulated_backend, fake_cupy  # noqa: F401  (fixtures)


@pytest.fixture
def be(cuda):  # noqa: F811
    """The "cuda" backend: the emulation (installed as "cuda") or the real one."""
    return eg.zeros(1, device=cuda)._backend


@contextlib.contextmanager
def declined(backend):
    """The composite from primitives on the same device: the offer withdrawn."""
    saved = backend._offered
    backend._offered = {}
    try:
        yield
    finally:
        backend._offered = saved


def _inputs(rng, dtype, b=2, h=2, t=5, s=7, d=4, dv=3):
    return (rng.standard_normal((b, h, t, d)).astype(dtype), rng.standard_normal((b, h, d, s)).astype(dtype),
            rng.standard_normal((b, h, s, dv)).astype(dtype))


def _masks(rng, dtype, b=2, h=2, t=5, s=7):
    causal = np.tril(np.ones((t, s), bool), k=s - t)
    causal[1] = False                                      # a query with no allowed key
    padding = np.ones((b, 1, 1, s), bool)
    padding[0, ..., 4:] = False
    additive = np.where(rng.random((t, s)) < 0.3, -np.inf, rng.standard_normal((t, s))).astype(dtype)
    additive[2] = -np.inf                                  # fully masked by -inf
    return {"none": None, "causal": causal, "padding": padding, "additive": additive,
            "all_masked": np.zeros((b, h, t, s), bool)}


def _numpy_attention(q, k_t, v, mask, scale):
    s = q.astype(np.float64) @ k_t * scale
    if mask is not None and mask.dtype == bool:
        s = np.where(mask, s, -np.inf)
    elif mask is not None:
        s = s + mask
    m = s.max(-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(m), m, 0))
    tot = e.sum(-1, keepdims=True)
    w = e / np.where(tot == 0, 1, tot)
    return w @ v, w


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)


def _run(be, arrays, mask, scale=None, dropout_p=0.0, training=False, grad=True, mask_grad=False, seed=0):
    """(out, weights, grads of q, k_t, v[, mask]) of `attention` on "cuda", as NumPy."""
    ts = [eg.tensor(a, device="cuda", requires_grad=grad) for a in arrays]
    m = None if mask is None else eg.tensor(mask, device="cuda", requires_grad=mask_grad)
    eg.manual_seed(seed)
    out, w = attention(*ts, m, scale, dropout_p, training)
    res = [out.numpy(), w.numpy()]
    if grad:
        rng = np.random.default_rng(1)
        c1 = eg.tensor(rng.standard_normal(out.shape).astype(out.dtype), device="cuda")
        c2 = eg.tensor(rng.standard_normal(w.shape).astype(w.dtype), device="cuda")
        ((out * c1).sum() + (w * c2).sum()).backward()
        res += [t.grad.numpy() for t in ts] + ([m.grad.numpy()] if mask_grad else [])
    return res


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["none", "causal", "padding", "additive", "all_masked"])
def test_fused_equals_composite_forward_and_gradients(be, kind, dtype, rng):
    arrays = _inputs(rng, dtype)
    mask = _masks(rng, dtype)[kind]
    before = be.fused_runs
    fused = _run(be, arrays, mask)
    assert be.fused_runs == before + 2                     # forward and backward kernels
    with declined(be):
        composite = _run(be, arrays, mask)
    assert be.fused_runs == before + 2
    want_out, want_w = _numpy_attention(*arrays, mask, 1 / math.sqrt(arrays[0].shape[-1]))
    for got, want in zip(fused, composite):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert not np.isnan(got).any()
        np.testing.assert_allclose(got, want, **_tol(dtype))
    np.testing.assert_allclose(fused[0], want_out, **_tol(dtype))
    np.testing.assert_allclose(fused[1], want_w, **_tol(dtype))
    if kind == "all_masked":
        assert (fused[0] == 0).all() and (fused[1] == 0).all() and all((g == 0).all() for g in fused[2:])
    if kind == "causal":                                   # the query with no allowed key
        assert (fused[0][..., 1, :] == 0).all() and (fused[1][..., 1, :] == 0).all()
        assert (fused[2][..., 1, :] == 0).all()


def test_additive_mask_gradient_and_explicit_scale(be, rng):
    arrays = _inputs(rng, np.float64)
    mask = rng.standard_normal((5, 7))
    mask[0, 3] = -np.inf
    fused = _run(be, arrays, mask, scale=0.37, mask_grad=True)
    with declined(be):
        composite = _run(be, arrays, mask, scale=0.37, mask_grad=True)
    for got, want in zip(fused, composite):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert fused[-1].shape == (5, 7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["none", "causal"])
def test_dropout_draws_the_composites_bits(be, kind, dtype, rng):
    """In training the kernel keeps the weights the composite's dropout keeps (the same
    Philox counters), advances the stream as far, and the gradients agree."""
    arrays = _inputs(rng, dtype)
    mask = _masks(rng, dtype)[kind]
    before = be.fused_runs
    fused = _run(be, arrays, mask, dropout_p=0.4, training=True, seed=5)
    counter = be.rng_counter
    assert be.fused_runs == before + 2
    with declined(be):
        composite = _run(be, arrays, mask, dropout_p=0.4, training=True, seed=5)
    assert be.rng_counter == counter
    np.testing.assert_array_equal(fused[1] == 0, composite[1] == 0)
    assert 0.2 < (composite[1] == 0).mean() < 0.8
    for got, want in zip(fused, composite):
        np.testing.assert_allclose(got, want, **_tol(dtype))
    # the next draw continues after the attention's counters in both
    with declined(be):
        eg.manual_seed(5)
        attention(*[eg.tensor(a, device="cuda") for a in arrays], None, None, 0.4, True)
        after = be.rng_counter
    eg.manual_seed(5)
    attention(*[eg.tensor(a, device="cuda") for a in arrays], None, None, 0.4, True)
    assert be.rng_counter == after == 2 * 2 * 5 * 7


def test_eval_mode_and_p_zero_draw_nothing(be, rng):
    arrays = _inputs(rng, np.float32)
    eg.manual_seed(0)
    attention(*[eg.tensor(a, device="cuda") for a in arrays], None, None, 0.4, False)
    attention(*[eg.tensor(a, device="cuda") for a in arrays], None, None, 0.0, True)
    assert be.rng_counter == 0


@pytest.mark.parametrize("change", ["long_query", "long_keys", "wide_head", "float16", "float_mask_dtype",
                                    "broadcast_batch", "tensor_scale", "autocast"])
def test_beyond_the_limits_the_composite_runs(be, change, rng):
    t, s, d = {"long_query": (257, 4, 4), "long_keys": (4, 257, 4), "wide_head": (4, 4, 129)}.get(change, (4, 5, 4))
    dtype = np.float16 if change == "float16" else np.float32
    q, k_t, v = _inputs(rng, dtype, b=1, h=1, t=t, s=s, d=d, dv=3)
    if change == "broadcast_batch":
        k_t = k_t[0, 0]
    mask = rng.standard_normal((t, s)) if change == "float_mask_dtype" else None     # float64 with float32
    ts = [eg.tensor(a, device="cuda") for a in (q, k_t, v)]
    m = None if mask is None else eg.tensor(mask, device="cuda")
    scale = eg.tensor(np.float32(0.5), device="cuda") if change == "tensor_scale" else None
    before = be.fused_runs
    with eg.autocast(dtype=np.float16) if change == "autocast" else contextlib.nullcontext():
        out, w = attention(*ts, m, scale)
    assert be.fused_runs == before
    assert out.shape == (1, 1, t, 3) and w.shape == (1, 1, t, s)


@pytest.mark.parametrize("t,s,d", [(256, 256, 8), (3, 256, 128), (256, 2, 1)])
def test_at_the_limits(be, t, s, d, rng):
    """T = S = 256 and head dims of 128 run fused (the emulation runs one pthread per
    CUDA thread, so the batch is 1)."""
    arrays = _inputs(rng, np.float32, b=1, h=1, t=t, s=s, d=d, dv=min(d, 4))
    mask = np.tril(np.ones((t, s), bool))
    before = be.fused_runs
    fused = _run(be, arrays, mask)
    assert be.fused_runs == before + 2
    with declined(be):
        composite = _run(be, arrays, mask)
    for got, want in zip(fused, composite):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_second_order_gradients_raise(be, rng):
    q, k_t, v = [eg.tensor(a, device="cuda", requires_grad=True) for a in _inputs(rng, np.float64)]
    out, _ = attention(q, k_t, v)
    g, = eg.autograd_grad(out.sum(), [q], create_graph=True)
    with pytest.raises(GradError, match="gradients of the fused attention's gradients"):
        g.sum().backward()


def test_multihead_attention_runs_fused(be, rng):
    """nn.MultiheadAttention on "cuda" runs the kernel and equals itself on the CPU."""
    eg.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    pad = np.zeros((2, 5), bool)
    pad[1, 3:] = True                                       # PyTorch's convention: True = blocked
    want, want_w = mha(eg.tensor(x), eg.tensor(x), eg.tensor(x), key_padding_mask=eg.tensor(pad), need_weights=True)
    mha.to("cuda")
    before = be.fused_runs
    got, got_w = mha(*(eg.tensor(x, device="cuda"),) * 3, key_padding_mask=eg.tensor(pad, device="cuda"),
                        need_weights=True)
    assert be.fused_runs == before + 1
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_w.numpy(), want_w.numpy(), rtol=1e-4, atol=1e-5)


def test_numpy_never_offers_and_the_ops_generic_path_is_the_composite(rng):
    """On the CPU the composite runs from primitives (bit for bit as before); the ops
    themselves, run from primitives, equal it and gradcheck (the VJP's algebra)."""
    q, k_t, v = [eg.tensor(a, requires_grad=True) for a in _inputs(rng, np.float64)]
    assert not eg.tensor(1.0)._backend.offers(fused_attention, (q, k_t, v), dict(scale=1.0, dropout_p=0.0))
    for args, params in fused_attention.sample(rng):
        xs = [eg.tensor(a, requires_grad=a.dtype.kind == "f") for a in args]
        packed = fused_attention(*xs, **params)
        out, w = attention(*xs[:3], xs[3] if len(xs) > 3 else None, params["scale"])
        np.testing.assert_array_equal(packed.numpy(), np.concatenate([w.numpy(), out.numpy()], -1))
        assert eg.gradcheck(lambda *a: fused_attention(*a, **params), *xs)


def test_softmax_grad_program_is_the_softmax_vjp():
    """SOFTMAX_GRAD is the gradient of SOFTMAX, proved with sympy on a row of 3."""
    xs, dps = sympy.symbols("x0:3", real=True), sympy.symbols("d0:3", real=True)
    e = [sympy.exp(x) for x in xs]
    p = [ei / sum(e) for ei in e]
    for i in range(3):
        vjp = sum(dps[k] * sympy.diff(p[k], xs[i]) for k in range(3))
        s0 = sum(pk * dk for pk, dk in zip(p, dps))
        printed = SOFTMAX_GRAD.out.expr.xreplace({SOFTMAX_GRAD.rows[0]: p[i], SOFTMAX_GRAD.rows[1]: dps[i],
                                                  SOFTMAX_GRAD.steps[0].name: s0})
        assert sympy.simplify(vjp - printed) == 0
    rng = np.random.default_rng(0)
    x, g = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    p = evaluate(SOFTMAX, backends.get_backend("cpu"), [x], {"axis": 1})
    np.testing.assert_allclose(evaluate(SOFTMAX_GRAD, backends.get_backend("cpu"), [p, g], {}),
                               p * (g - (g * p).sum(-1, keepdims=True)), rtol=1e-12)


def test_every_variant_is_offered_by_one_kernel():
    names = {k.kernel_name(dt) for k in cb.ATTENTION_KERNELS.values() for dt in attnprint.DTYPES}
    assert len(names) == 2 * len(cb.ATTENTION_KERNELS) == 2 * 10
    with pytest.raises(TypeError, match="no kernel"):
        next(iter(cb.ATTENTION_KERNELS.values())).source("float16")


@codegen.needs_nvcc
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nvcc_compiles_every_attention_kernel(dtype, tmp_path):
    """Every printed variant in one translation unit (the device functions are shared)."""
    source = "".join(cb.attention_kernel_source(k, dtype) for k in cb.ATTENTION_KERNELS.values())
    codegen._nvcc(tmp_path, f"attention_{dtype}", source, no_double=dtype == "float32")


def test_graph_replays_draw_the_eager_dropout_bits(be, rng):
    """Under eg.jit with CUDA graphs the kernel reads its first counter from the
    recording's device state: each replay draws new bits, the ones eager draws."""
    from tests.test_cuda_graphs import _graph_status
    arrays = [eg.tensor(a, device="cuda") for a in _inputs(rng, np.float32)]
    mask = eg.tensor(_masks(rng, np.float32)["causal"], device="cuda")

    def f(q, k_t, v, m):
        out, w = attention(q, k_t, v, m, None, 0.5, True)
        return out * 2.0, w

    compiled = eg.jit(f)
    before = be.fused_runs
    runs = {}
    for name, run in (("eager", f), ("jit", compiled)):
        eg.manual_seed(3)
        runs[name] = [[t.numpy() for t in run(*arrays, mask)] for _ in range(4)]
        runs[name].append(be.rng_counter)
    assert _graph_status(compiled)["captured"] and _graph_status(compiled)["replays"] >= 2
    assert be.fused_runs > before + 4
    assert runs["jit"][-1] == runs["eager"][-1]
    for e, j in zip(runs["eager"][:-1], runs["jit"][:-1]):
        np.testing.assert_array_equal(j[1] == 0, e[1] == 0)
        np.testing.assert_allclose(j[0], e[0], rtol=1e-6, atol=1e-6)
    assert len({tuple((r[1] == 0).ravel()) for r in runs["jit"][:-1]}) == 4


@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
def test_the_ops_gradient_is_proved(mask):
    """fused_attention's VJP (attention_backward, with the SOFTMAX_GRAD row program the
    kernel prints) equals sympy.diff of its forward, on the symbolic backend; an
    additive mask's gradient (dScores summed to its shape) too."""
    from engine.symbolic.verify import constant
    keep = np.array([[True, False, True], [False, False, False]])       # the second query: no key
    shapes = [(1, 2, 2), (1, 2, 3), (1, 3, 2)] + ([(2, 3)] if mask == "additive" else [])

    def fn(q, k_t, v, *m):
        extra = (constant(keep),) if mask == "bool" else m
        return fused_attention(q, k_t, v, *extra, scale=0.5, dropout_p=0.0)

    report = eg.verify_gradients(fn, *shapes, names=["q", "k", "v", "m"][:len(shapes)])
    assert report.ok
