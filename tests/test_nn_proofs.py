"""Proofs on the trained path: nn.MultiheadAttention, nn.functional.cross_entropy,
nn.LayerNorm and a TransformerDecoderLayer run their own forward and the engine's
backward on the symbolic backend; gradients are compared exactly with sympy.diff
(engine.symbolic.nn_cases). The whole file takes a few seconds."""
from __future__ import annotations

import numpy as np
import pytest
import sympy

import engine as eg
import ops
from engine import symbolic as S
from engine.symbolic import closed_forms as cf
from engine.symbolic import nn_cases as N



@pytest.mark.parametrize("key", list(N.nn_cases()))
def test_nn_gradients_equal_sympy_diff(key):
    """Every element of the input's and every parameter's gradient, exactly."""
    report = N.nn_case_report(key)
    assert report.ok, str(report)
    n = sum(int(np.prod(s)) for s in report.shapes.values())
    assert sum(c.against == "sympy.diff" for c in report.checks) == n
    assert all(c.proof.method in ("simplified", "rational points") for c in report.checks)
    if N.nn_cases()[key].closed_form is not None:
        assert sum(c.against == "closed form" for c in report.checks) == n


def test_every_parameter_of_the_modules_is_proved():
    mha = N.nn_case_report("nn_multihead_attention").shapes
    assert set(mha) == {"x"} | {f"{p}.{w}" for p in "qkvo" for w in ("weight", "bias")}
    assert set(N.nn_case_report("nn_layer_norm").shapes) == {"x", "weight", "bias"}
    ff = N.nn_case_report("nn_decoder_feed_forward").shapes
    assert set(ff) == {"x", "linear1.weight", "linear1.bias", "linear2.weight",
                       "linear2.bias", "norm3.weight", "norm3.bias"}


def test_attention_masks_take_every_path():
    """Key 0 is padding and the mask is causal: query 0 sees no key (output: the
    output projection's bias alone), query 1 key 1 only, query 2 keys 1 and 2; both
    heads of query 2 take a real softmax (its max shift is proved to cancel)."""
    run, leaves = N.nn_cases()["nn_multihead_attention"].build()
    out = run()._data.data[0]
    x = leaves["x"]._data.data[0]
    assert list(out[0]) == list(leaves["o.bias"]._data.data)
    uses = [set().union(*(sympy.sympify(e).free_symbols for e in row)) for row in out]
    assert not uses[1] & set(x[0]) and not uses[1] & set(x[2]) and set(x[1]) <= uses[1]
    assert not uses[2] & set(x[0]) and set(x[1]) | set(x[2]) <= uses[2]
    notes = N.nn_case_report("nn_multihead_attention").notes
    assert notes == ["max shift: d(forward)/d(max) == 0 proved for the 2 maxima (simplified), "
                     "so sympy.diff holds them constant"]


def test_ignored_loss_row_gets_no_gradient():
    run, leaves = N.nn_cases()["nn_cross_entropy"].build()
    loss = run()
    (g,) = eg.autograd_grad(loss, [leaves["x"]])
    assert all(sympy.sympify(e) == 0 for e in g._data.data[1])
    assert all(sympy.sympify(e) != 0 for e in g._data.data[0])


def test_decoder_layer_every_op_vjp_proved():
    """The layer's own forward on the symbolic backend; each op of its graph (both
    attentions with their masks, the 3 LayerNorms, relu, the projections) has its
    VJP proved at the shapes, params and masks it has there, and every parameter
    is read by the graph."""
    report = N.decoder_graph_report()
    assert report.ok, report.summary()
    assert {"layer_norm", "softmax", "relu", "matmul", "where", "add"} <= set(report.ops)
    assert report.nodes >= 50 and report.unreached == []
    assert all(c.proof.method in ("simplified", "rational points")
               for r in report.reports for c in r.checks)


def test_decoder_layer_whole_backward_proved_by_the_chain_rule():
    """End to end: every tensor of the layer's graph (53 ops, 28 leaves: the input,
    the memory and every parameter) has its autograd cotangent equal to the sum over
    its consumers of J^T w, each value bound to a symbol so nothing grows."""
    report = N.decoder_chain_report()
    assert report.ok, report.summary()
    run, leaves = N.decoder_run()
    assert report.nodes >= 50 and report.tensors == report.nodes + len(leaves) - 1
    assert report.elements >= 300 and report.unreached == []


@pytest.mark.parametrize("key", ["causal_lm_loss", "seq2seq_loss"])
def test_whole_model_training_losses_proved_by_the_chain_rule(key):
    """What users train, end to end: embedding (tied to the output projection, so its
    cotangent sums two paths), positions, attention with its masks, LayerNorms, the
    feed-forward blocks and the loss, every parameter's gradient proved."""
    report = N.chain_report(key)
    assert report.ok, report.summary()
    run, leaves = N.CHAIN_CASES[key][1]()
    assert report.tensors == report.nodes + len(leaves) - 1 and report.unreached == []
    assert any("embed" in k or "token" in k for k in leaves)


def test_chain_proof_names_a_miswired_gradient(monkeypatch):
    """A backward that sends a cotangent to the wrong place (LayerNorm's weight and bias
    gradients swapped: same shapes, every value plausible) fails the induction at the
    leaves it reaches, and only there."""
    from engine.symbolic.chain import verify_chain
    op = ops.REGISTRY["layer_norm"]
    right = op.vjp

    def swapped(*args, **kwargs):
        gx, gw, gb = right(*args, **kwargs)
        return gx, gb, gw
    monkeypatch.setattr(op, "vjp", swapped)
    report = verify_chain(*N.decoder_run(), "swapped")
    assert not report.ok
    named = " ".join(report.failures)
    assert all(f"leaf norm{i}.{p}" in named for i in (1, 2, 3) for p in ("weight", "bias"))
    assert "leaf x" not in named and "leaf m" not in named


def test_chain_proof_catches_a_lost_contribution(monkeypatch):
    """A tensor read by two ops (the residual stream) must get both cotangents: a
    backward that keeps only the last one fails."""
    from engine import autograd
    from engine.symbolic.chain import verify_chain
    source = __import__("inspect").getsource(autograd._propagate)
    assert "pending[xk] = gx if prev is None else prev + gx" in source
    namespace = dict(vars(autograd))
    exec(source.replace("pending[xk] = gx if prev is None else prev + gx", "pending[xk] = gx"),
         namespace)
    monkeypatch.setattr(autograd, "_propagate", namespace["_propagate"])
    report = verify_chain(*N.decoder_run(), "lost")
    assert not report.ok and "leaf x" in " ".join(report.failures)


# -- the closed forms that docs/derivations.md prints ------------------------------------------

def _same(a, b):
    return S.decide_zero(sympy.sympify(a) - sympy.sympify(b)).ok


def test_printed_softmax_family_formulas_equal_the_verified_closed_forms():
    x, v = S.symbols("x", (2, 3)), S.symbols("g", (2, 3))
    p = cf.stable_softmax(x)
    expected = {"softmax": cf.softmax_jvp([x], None, v)[0],
                "log_softmax": cf.log_softmax_closed([x], None, v)[0]}
    for name, ref in expected.items():
        for r in range(2):
            for i in range(3):
                got = cf.instantiate(name, {cf.P: p[r], cf.YBAR: v[r]}, {cf.n: 3}, i=i)
                assert _same(got, ref[r, i]), (name, r, i)
    vs = S.symbols("g", (2,))
    ref = cf.logsumexp_closed([x], None, vs)[0]
    assert all(_same(cf.instantiate("logsumexp", {cf.P: p[r]}, {cf.SCALAR_YBAR: vs[r]}, i=i),
                     ref[r, i]) for r in range(2) for i in range(3))


def test_printed_cross_entropy_formula_equals_the_verified_closed_form():
    x, targets = S.symbols("x", (3, 3)), np.array([0, -100, 2])
    p = cf.stable_softmax(x)
    ref = cf.cross_entropy_closed(targets, sympy.Rational(1, 10))([x], None, np.array(1))[0]
    for r in (0, 2):                          # the ignored row is 0: said in the text
        for i in range(3):
            got = cf.instantiate("cross_entropy", {cf.P: p[r]},
                                 {cf.SCALAR_YBAR: 1, cf.EPS_LS: sympy.Rational(1, 10), cf.C: 3,
                                  cf.N: 2, cf.T: int(targets[r])}, i=i)
            assert _same(got, ref[r, i]), (r, i)
    assert all(ref[1, i] == 0 for i in range(3))


def test_printed_layer_norm_formulas_equal_the_verified_closed_form():
    x, w, b, v = S.symbols("x", (1, 3)), S.symbols("w", (3,)), S.symbols("b", (3,)), \
        S.symbols("g", (1, 3))
    eps = sympy.Rational(1, 10 ** 5)
    dx, dw, db = cf.layer_norm_closed(eps)([x, w, b], None, v)
    mu = sum(x[0]) / 3
    sizes = {cf.n: 3, cf.MU: mu, cf.VAR: sum((e - mu) ** 2 for e in x[0]) / 3, cf.EPS_LN: eps}
    r = cf.instantiate("layer_norm_rstd", {}, sizes)
    sizes[cf.RSTD] = r
    xhat = np.array([cf.instantiate("layer_norm_xhat", {cf.X: x[0]}, sizes, i=i)
                     for i in range(3)], dtype=object)
    hbar = np.array([cf.instantiate("layer_norm_hbar", {cf.YBAR: v[0], cf.GAMMA: w}, sizes, i=i)
                     for i in range(3)], dtype=object)
    arrays = {cf.HBAR: hbar, cf.XHAT: xhat, cf.YBAR: v[0]}
    for i in range(3):
        assert _same(cf.instantiate("layer_norm_dx", arrays, sizes, i=i), dx[0, i])
        assert _same(cf.instantiate("layer_norm_dgamma", arrays, sizes, i=i), dw[i])
        assert _same(cf.instantiate("layer_norm_dbeta", arrays, sizes, i=i), db[i])


def test_printed_attention_formulas_equal_the_verified_closed_form():
    q, k, v, do = (S.symbols(nm, (3, 2)) for nm in ("Q", "K", "V", "dO"))
    dq, dk, dv = cf.attention_closed_parts(q, k, v, do, None)
    p = cf.stable_softmax(np.matmul(q, k.T) / sympy.sqrt(2))
    sizes = {cf.n: 3, cf.d: 2}
    arrays = {cf.SP: p, cf.DO: do, cf.V: v, cf.Q: q, cf.K: k}
    arrays[cf.DP] = np.array([[cf.instantiate("attention_dp", arrays, sizes, i=a, j=b)
                               for b in range(3)] for a in range(3)], dtype=object)
    arrays[cf.DS] = np.array([[cf.instantiate("attention_ds", arrays, sizes, i=a, j=b)
                               for b in range(3)] for a in range(3)], dtype=object)
    for a in range(3):
        for col in range(2):
            assert _same(cf.instantiate("attention_dv", arrays, sizes, j=a, c=col), dv[a, col])
            assert _same(cf.instantiate("attention_dq", arrays, sizes, i=a, c=col), dq[a, col])
            assert _same(cf.instantiate("attention_dk", arrays, sizes, j=a, c=col), dk[a, col])



# -- the proofs bite ----------------------------------------------------------------------------

def _double_first_gradient(monkeypatch, name):
    op = ops.REGISTRY[name]
    right = op.vjp

    def wrong(g, out, inputs, needs, **params):
        grads = right(g, out, inputs, needs, **params)
        return (ops.REGISTRY["mul"](grads[0], 2.0),) + tuple(grads[1:])
    monkeypatch.setattr(op, "vjp", wrong)


def test_a_wrong_softmax_vjp_fails_the_decoder_layer_proof(monkeypatch):
    _double_first_gradient(monkeypatch, "softmax")
    report = N.verify_graph(*N.decoder_run(), "decoder")
    failed = [r.name for r in report.reports if not r.ok]
    assert failed and set(failed) == {"softmax"}          # both attentions' softmax


def test_a_wrong_layer_norm_vjp_fails_layer_norm_and_decoder_layer(monkeypatch):
    _double_first_gradient(monkeypatch, "layer_norm")
    c = N.nn_cases()["nn_layer_norm"]
    run, leaves = c.build()
    report = S.verify_leaves(run, leaves, raise_on_failure=False, blame=False)
    assert {f.input for f in report.failures} == {"x"}
    graph = N.verify_graph(*N.decoder_run(), "decoder")
    assert {r.name for r in graph.reports if not r.ok} == {"layer_norm"}


def test_a_wrong_row_program_vjp_fails_the_cross_entropy_proof(monkeypatch):
    """The row program the loss runs (log_softmax, or a cross-entropy row program)."""
    c = N.nn_cases()["nn_cross_entropy"]
    run, leaves = c.build()
    rows = sorted({node.op.name for _, node in S.verify.graph_nodes(run())
                   if node.op.kind == "rows"})
    assert rows
    _double_first_gradient(monkeypatch, rows[0])
    report = S.verify_leaves(run, leaves, cotangent=None, closed_form=c.closed_form,
                             raise_on_failure=False, blame=False)
    assert not report.ok
    assert {f.index[0] for f in report.failures} == {0, 2}     # the ignored row stays 0
