"""Symbolic proofs of the gradients: the engine's own forward and backward run on the
symbolic backend and are compared exactly with sympy.diff (and with closed forms).

Shapes are small on purpose: the whole file runs in well under a minute.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import sympy

import engine as eg
import ops
from backends import get_backend
from backends.symbolic import SymArray, SymbolicBackend
from engine import symbolic as S
from engine.symbolic.document import render_derivations
from engine.tensor import Tensor
from ops.elementwise import OUT

ROOT = Path(__file__).resolve().parents[1]
R = ops.REGISTRY

# A select's condition is bool, not a symbol to differentiate: `where` is proved on its samples.
_SELECT = {name for name, op in R.items() if getattr(op, "condition", None) is not None}
ELEMENTWISE = sorted(name for name, op in R.items()
                     if op.kind == "elementwise" and op.differentiable and name not in _SELECT)
PRIMITIVES = sorted(name for name, op in R.items()
                    if (op.kind != "elementwise" or name in _SELECT) and op.differentiable
                    and op.sample is not None)
COMPOSITES = sorted(name for name, c in ops.COMPOSITES.items()
                    if any(_f for args, _ in c.sample(np.random.default_rng(0))
                           for _f in (isinstance(a, np.ndarray) and a.dtype.kind == "f" for a in args)))
FORWARD_OPS = sorted(name for name, op in R.items()
                     if op.sample is not None and op.reference is not None and not op.random)


def as_float(t: Tensor) -> np.ndarray:
    data = t._data.data
    if t.dtype == np.dtype(bool):
        return np.vectorize(bool, otypes=[bool])(data)
    return np.vectorize(float, otypes=[float])(data)


# -- the backend -------------------------------------------------------------------------------

def test_backend_is_registered_and_holds_sympy_arrays():
    be = get_backend("symbolic")
    assert isinstance(be, SymbolicBackend) and be.name == "symbolic"
    x = S.symbolic_tensor(S.symbols("x", (2,)))
    assert x.device == "symbolic" and x.dtype == np.float64 and x.requires_grad
    y = (x * 2 + 1).sum()
    assert y._data.data[()] == 2 * sympy.Symbol("x_{0}", real=True) + \
        2 * sympy.Symbol("x_{1}", real=True) + 2


@pytest.mark.parametrize("name", FORWARD_OPS)
def test_every_primitive_forward_matches_numpy(name):
    """Every op of the registry computes on sympy arrays what it computes on NumPy."""
    op = R[name]
    for args, params in op.sample(np.random.default_rng(0)):
        # Values on a 1/8 grid are exact in binary and keep sympy's exact powers small.
        args = [np.asarray(np.round(a * 8) / 8) if isinstance(a, np.ndarray) and a.dtype.kind == "f"
                else a for a in args]
        sym_params = {**params, "device": "symbolic"} if "device" in params else params
        out = op(*[S.constant(a) if isinstance(a, np.ndarray) else a for a in args], **sym_params)
        ref = np.asarray(op.reference(*args, **params))
        assert out.shape == ref.shape and out.dtype == ref.dtype, name
        np.testing.assert_allclose(as_float(out), ref, rtol=1e-12, atol=1e-12)


def test_float_constants_become_exact_numbers():
    x = S.symbolic_tensor(S.symbols("x", (1,)))
    y = x * (1 / math.sqrt(2)) + 1e-5
    x0 = sympy.Symbol("x_{0}", real=True)
    assert y._data.data[0] == sympy.sqrt(2) * x0 / 2 + sympy.Rational(1, 100000)
    data = get_backend("symbolic").asarray(np.array([0.1]))   # data: the exact binary value
    assert data.data[0] == sympy.Rational(0.1) and data.data[0] != sympy.Rational(1, 10)


def test_comparisons_decide_and_where_picks_a_branch():
    x = S.symbolic_tensor(S.symbols("x", (3,)))
    m = x.max()
    assert (m == float("-inf"))._data.data[()] is sympy.false           # real symbols are finite
    picked = eg.where(m == float("-inf"), 0.0, m)
    assert picked._data.data[()] == sympy.Max(*S.symbols("x", (3,)))
    undecided = eg.where(x > 0, x, 0.0)._data.data[0]
    assert isinstance(undecided, sympy.Piecewise)
    masked = eg.softmax(eg.where(S.constant(np.array([True, True, False])), x, float("-inf")), -1)
    assert masked._data.data[2] == 0


def test_random_draws_are_exact_rationals():
    get_backend("symbolic").seed(3)             # this backend only: other tests keep their seeds
    r = eg.randn(2, 2, dtype=eg.float64, device="symbolic")
    assert isinstance(r._data, SymArray)
    assert all(isinstance(e, sympy.Rational) for e in r._data.data.flat)


# -- deciding zero -----------------------------------------------------------------------------

def test_decide_zero_simplifies_exactly():
    x, y = sympy.symbols("x y", real=True)
    assert S.decide_zero((x + 1) ** 2 - x ** 2 - 2 * x - 1).method == "simplified"
    assert S.decide_zero(sympy.exp(x) * sympy.exp(-x) - 1).ok
    assert S.decide_zero(sympy.exp(x) / (sympy.exp(x) + sympy.exp(y))
                         - 1 / (1 + sympy.exp(y - x))).ok


def test_decide_zero_falls_back_to_rational_points_and_reports_it():
    x = sympy.Symbol("x", real=True)
    proof = S.decide_zero(sympy.Heaviside(x, 0) - sympy.Heaviside(x))   # differ only at the kink 0
    assert proof.ok and proof.method == "rational points" and proof.points == 20


def test_decide_zero_is_exact_not_floating_point():
    x = sympy.Symbol("x", real=True)
    tiny = S.decide_zero(sympy.Rational(1, 10 ** 40) * sympy.exp(x))
    assert not tiny.ok and "nonzero at" in tiny.detail
    assert not S.decide_zero(sympy.exp(x) - 1 - x - x ** 2 / 2).ok
    third = sympy.exp(sympy.Rational(1, 3))
    assert S.decide_zero(third ** 3 - sympy.E).ok


# -- elementwise specs -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_spec_grads_equal_sympy_diff(name):
    """grads (stable forms with `out` replaced by the expression) == sympy.diff(expr), and
    the implementation expression == expr."""
    op = R[name]
    report = S.verify_elementwise_spec(op)
    assert report.ok, str(report)
    assert len(report.checks) == op.nin + 1


def test_stable_forms_written_with_out_are_checked():
    uses_out = [n for n in ELEMENTWISE if any(g.has(OUT) for g in R[n].grads)]
    assert {"exp", "sigmoid", "tanh", "sqrt", "rsqrt", "div"} <= set(uses_out)
    assert any(R[n].impl_expr != R[n].expr for n in ELEMENTWISE)   # sigmoid's tanh form


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_engine_backward_equals_sympy_diff(name):
    op = R[name]
    shapes = [(2, 2), (2,)] if op.nin == 2 else [(2,)] * op.nin   # binary ops broadcast
    report = S.elementwise_engine_check(op, shapes)
    assert report.ok, str(report)
    assert len(report.checks) == sum(int(np.prod(s)) for s in shapes)


def _float_positions(args: list) -> list[int]:
    return [i for i, a in enumerate(args) if isinstance(a, np.ndarray) and a.dtype.kind == "f"]


def _prove_on_samples(name: str, fn, samples: list) -> None:
    """Every sample (keepdims, partial axes, batching, broadcasting: no size cap, so a
    VJP that is wrong only at such shapes cannot hide), each float input a matrix of
    symbols, the rest constants."""
    for args, params in samples:
        fpos = _float_positions(args)
        if name == "max" and sum(args[i].size for i in fpos) > 30:
            continue                 # Max over 60 symbols takes sympy minutes; smaller samples prove it

        def call(*xs, args=args, params=params, fpos=fpos):
            full = [S.constant(a) if isinstance(a, np.ndarray) else a for a in args]
            for i, x in zip(fpos, xs):
                full[i] = x
            return fn(*full, **params)

        report = S.verify_gradients(call, *[args[i].shape for i in fpos],
                                    names=[f"a{i}" for i in fpos], name=name,
                                    raise_on_failure=False)
        assert report.ok, str(report)


@pytest.mark.parametrize("name", PRIMITIVES)
def test_every_primitive_vjp_equals_sympy_diff(name):
    """Reductions, movement, indexing, matmul and fused ops: their hand-written VJPs."""
    op = R[name]
    _prove_on_samples(name, op, op.sample(np.random.default_rng(0)))


@pytest.mark.parametrize("name", COMPOSITES)
def test_every_composite_gradient_equals_sympy_diff(name):
    """Composites are differentiated through their primitives; proved on their samples."""
    c = ops.COMPOSITES[name]
    _prove_on_samples(name, c.fn, c.sample(np.random.default_rng(0)))


def test_no_differentiable_op_or_composite_goes_unproved():
    differentiable = {n for n, op in R.items() if op.differentiable}
    proved = set(ELEMENTWISE) | set(PRIMITIVES)
    assert differentiable <= proved, sorted(differentiable - proved)
    assert {"clip", "masked_fill", "min", "split", "squeeze", "stack", "var"} <= set(COMPOSITES)
    assert set(ops.COMPOSITES) - set(COMPOSITES) == {"one_hot"}     # integer in, no gradient


# -- softmax, losses, layer norm and attention -------------------------------------------------

@pytest.mark.parametrize("key", S.case_keys())
def test_derivation_case(key):
    """Each case: engine backward == sympy.diff at every element, and == the closed form
    (J^T v for softmax, softmax - onehot for cross-entropy, dV = P^T dO ... for attention)."""
    report = S.case_report(key)
    assert report.ok, str(report)
    case = S.cases()[key]
    n = sum(int(np.prod(s)) for s in case.shapes)
    assert sum(c.against == "sympy.diff" for c in report.checks) == n
    assert sum(c.against == "closed form" for c in report.checks) == \
        (n if case.closed_form is not None else 0)
    assert all(c.proof.method in ("simplified", "rational points") for c in report.checks)


def test_softmax_is_checked_against_the_jacobian_and_the_shift_cancels():
    report = S.case_report("softmax")
    assert report.shapes == {"x": (2, 3)}
    assert any(c.against == "closed form" for c in report.checks)
    assert any(n.startswith("max shift: d(forward)/d(max) == 0 proved") for n in report.notes)
    assert "x[1, 2] vs sympy.diff: difference simplifies to 0" in str(report)


def test_attention_masks_are_really_applied():
    """The masked cases see zero weight on the masked keys: dV of a masked key is 0."""
    fns = S.engine_fns()
    q, k, v = (S.symbolic_tensor(S.symbols(n, (3, 2))) for n in "QKV")
    dv = eg.autograd_grad(fns["attention_padding"](q, k, v).sum(), [v])[0]
    assert all(e == 0 for e in dv._data.data[2])                # the padding key gets nothing
    dv = eg.autograd_grad(fns["attention_causal"](q, k, v)[0].sum(), [v])[0]
    assert all(e == 0 for e in dv._data.data[1:].flat)          # query 0 sees only key 0


def test_nn_cross_entropy_gradient_is_softmax_minus_onehot():
    """The user-facing loss (nn.functional) too, with label smoothing and ignore_index."""
    F = pytest.importorskip("nn.functional")
    targets = np.array([0, 2, 1])
    for smoothing in (0.0, 0.1):
        closed = S.closed_forms.cross_entropy_closed(targets, sympy.Rational(smoothing).limit_denominator(10))
        report = S.verify_gradients(
            lambda x: F.cross_entropy(x, S.constant(targets), label_smoothing=smoothing),
            (3, 3), names=["x"], cotangent=None, closed_form=closed, name="F.cross_entropy")
        assert report.ok
    ignored = S.verify_gradients(lambda x: F.cross_entropy(x, S.constant(np.array([0, -100, 1]))),
                                 (3, 3), names=["x"], cotangent=None)
    assert ignored.ok


# -- the verifier catches wrong gradients ------------------------------------------------------

def test_a_wrong_vjp_is_caught_naming_the_op_and_the_element(monkeypatch):
    matmul = R["matmul"]
    right = matmul.vjp

    def wrong(g, out, inputs, needs):
        ga, gb = right(g, out, inputs, needs)
        return ga, (None if gb is None else R["mul"](gb, 2.0))    # dB twice too large

    monkeypatch.setattr(matmul, "vjp", wrong)
    fn = S.engine_fns()["attention"]
    with pytest.raises(S.GradientMismatch) as info:
        S.verify_gradients(fn, (3, 2), (3, 2), (3, 2), names=["Q", "K", "V"], cotangent="dO")
    report = info.value.report
    bad = {c.input for c in report.failures}
    assert bad == {"K", "V"}                  # Q's gradient does not go through a dB
    assert "K[0, 0] vs sympy.diff: MISMATCH: nonzero at" in str(info.value)
    assert len(report.suspects) >= 1 and all(s.startswith("matmul ") for s in report.suspects)
    assert "in1[0, 0]" in report.suspects[0]


def test_a_wrong_elementwise_derivative_is_caught(monkeypatch):
    exp = R["exp"]
    monkeypatch.setattr(exp, "vjp", lambda g, out, inputs, needs: (R["mul"](g, inputs[0]),))
    report = S.verify_gradients(lambda x: ops.composite.softmax(x, -1), (2, 3), names=["x"],
                                raise_on_failure=False)
    assert not report.ok and len(report.failures) == 6
    assert [s.split(" ")[0] for s in report.suspects] == ["exp"]


def test_a_gradient_cut_by_stop_gradient_is_reported_without_blaming_an_op():
    report = S.verify_gradients(lambda x: x * eg.stop_gradient(x), (2,), names=["x"],
                                raise_on_failure=False)
    assert not report.ok and report.suspects == []
    assert "every op's VJP passes its own check" in report.summary()


# -- the derivations document ------------------------------------------------------------------

def test_derivations_document_is_up_to_date():
    committed = (ROOT / "docs" / "derivations.md").read_text(encoding="utf-8")
    assert committed == render_derivations(), \
        "docs/derivations.md is out of date: run " \
        "python -m engine.symbolic --write docs/derivations.md"


def test_derivations_document_covers_the_four_topics():
    text = (ROOT / "docs" / "derivations.md").read_text(encoding="utf-8")
    for title in ("## Softmax", "## Log-softmax and cross-entropy", "## Layer norm",
                  "## Scaled dot-product attention"):
        assert title in text
    assert text.count("verified: engine backward == sympy.diff") == \
        len(S.case_keys()) + len(S.nn_cases.nn_cases())
    assert "\\frac{\\partial p_0}{\\partial x_0}" in text
