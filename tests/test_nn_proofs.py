"""Proofs on the trained path: nn.MultiheadAttention, nn.functional.cross_entropy,
nn.LayerNorm and a TransformerDecoderLayer run their own forward and the engine's
backward on the symbolic backend; gradients are compared exactly with sympy.diff
(engine.symbolic.nn_cases). The whole file takes a few seconds."""
from __future__ import annotations

import numpy as np
import pytest
import sympy

import engine as eg
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
