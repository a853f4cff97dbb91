import numpy as np, time
import ops
from engine.symbolic import nn_cases as N
from engine.symbolic import verify_leaves
R = ops.REGISTRY
# -- the proofs bite --------------------------------------------------------------------------

def _fresh(key):
    c = N.nn_cases()[key]
    run, leaves = c.build()
    return verify_leaves(run, leaves, cotangent=c.cotangent, raise_on_failure=False, name=key)


def _wrong_scale(op, factor):
    right = op.vjp

    def wrong(g, out, inputs, needs, **params):
        grads = right(g, out, inputs, needs, **params)
        return (R["mul"](grads[0], factor),) + tuple(grads[1:])
    return wrong


def test_a_wrong_softmax_vjp_fails_attention_and_decoder(monkeypatch):
    monkeypatch.setattr(R["softmax"], "vjp", _wrong_scale(R["softmax"], 2.0))
    report = _fresh("nn_multihead_attention")
    assert not report.ok and any(s.startswith("softmax ") for s in report.suspects)
    graph = N.verify_graph(*N.decoder_run(), "decoder")
    assert [r.name for r in graph.reports if not r.ok] == ["softmax"] * \
        sum(r.name == "softmax" for r in graph.reports)


def test_a_wrong_layer_norm_vjp_fails_layer_norm_and_decoder(monkeypatch):
    monkeypatch.setattr(R["layer_norm"], "vjp", _wrong_scale(R["layer_norm"], 1.5))
    report = _fresh("nn_layer_norm")
    assert {c.input for c in report.failures} == {"x"}
    assert not N.verify_graph(*N.decoder_run(), "decoder").ok

