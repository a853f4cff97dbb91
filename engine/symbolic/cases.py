"""The catalogue of verified cases: what the engine runs, on which shapes, against
which closed form. The test suite and docs/derivations.md use these."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import sympy

import ops

from .. import functional as F
from ..tensor import Tensor
from . import closed_forms as cf
from .verify import GradientReport, constant, verify_gradients

__all__ = ["Case", "cases", "case_keys", "case_report", "engine_fns"]

_CAUSAL = np.tril(np.ones((3, 3), dtype=bool))
_PADDING = np.array([[True, True, False]] * 3)      # the last key is padding
_TARGETS = np.array([0, 2, 1])
_SMOOTHING = sympy.Rational(1, 10)
_EPS = sympy.Rational(1, 10 ** 5)


def _self_attention(x: Tensor, wq: Tensor, wk: Tensor, wv: Tensor) -> Tensor:
    """The worked example: q_i = W_Q x_i, k_j = W_K x_j, v_j = W_V x_j for 3 positions."""
    return ops.composite.scaled_dot_product_attention(x @ wq.T, x @ wk.T, x @ wv.T)


def _multi_head_attention(x: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, wo: Tensor) -> Tensor:
    """2 heads of width 1 on a model width of 2, then the output projection W_O."""
    t, width = x.shape
    heads = 2

    def split(m: Tensor) -> Tensor:
        return m.reshape(t, heads, width // heads).permute(1, 0, 2)

    o = ops.composite.scaled_dot_product_attention(split(x @ wq.T), split(x @ wk.T),
                                                   split(x @ wv.T))
    return o.permute(1, 0, 2).reshape(t, width) @ wo.T


@dataclass(frozen=True)
class Case:
    """One verified gradient: what the engine runs, on which shapes, against what."""
    key: str
    label: str                           # the call, as the docs show it
    fn: Callable[..., Tensor]
    shapes: tuple
    names: tuple
    cotangent: str | None = "g"
    closed_form: Callable | None = None


def engine_fns() -> dict:
    C = ops.composite
    return {
        "softmax": lambda x: F.softmax(x, -1),
        "softmax_composite": lambda x: C.softmax(x, -1),
        "log_softmax": lambda x: F.log_softmax(x, -1),
        "log_softmax_composite": lambda x: C.log_softmax(x, -1),
        "logsumexp": lambda x: C.logsumexp(x, -1),
        "cross_entropy": lambda x: C.cross_entropy(x, constant(_TARGETS)),
        "cross_entropy_smoothing": lambda x: C.cross_entropy(x, constant(_TARGETS),
                                                             label_smoothing=0.1),
        "layer_norm": lambda x, w, b: F.layer_norm(x, w, b, eps=1e-5),
        "layer_norm_composite": lambda x, w, b: C.layer_norm(x, w, b, eps=1e-5),
        "attention": lambda q, k, v: C.scaled_dot_product_attention(q, k, v),
        "attention_causal": lambda q, k, v: C.scaled_dot_product_attention(
            q, k, v, mask=constant(_CAUSAL)),
        "attention_padding": lambda q, k, v: C.scaled_dot_product_attention(
            q, k, v, mask=constant(_PADDING)),
        "self_attention": _self_attention,
        "multi_head_attention": _multi_head_attention,
    }


def cases() -> dict[str, Case]:
    fns = engine_fns()
    qkv = dict(shapes=((3, 2), (3, 2), (3, 2)), names=("Q", "K", "V"), cotangent="dO")
    cases = [
        Case("softmax", "eg.softmax(x, axis=-1) (row program and its VJP)", fns["softmax"],
             ((2, 3),), ("x",), "g", cf.softmax_jvp),
        Case("softmax_composite", "ops.composite.softmax(x, -1) (primitives)",
             fns["softmax_composite"], ((2, 3),), ("x",), "g", cf.softmax_jvp),
        Case("log_softmax", "eg.log_softmax(x, axis=-1) (row program and its VJP)", fns["log_softmax"],
             ((2, 3),), ("x",), "g", cf.log_softmax_closed),
        Case("log_softmax_composite", "ops.composite.log_softmax(x, -1) (primitives)",
             fns["log_softmax_composite"], ((2, 3),), ("x",), "g", cf.log_softmax_closed),
        Case("logsumexp", "ops.composite.logsumexp(x, -1)", fns["logsumexp"], ((2, 3),), ("x",),
             "g", cf.logsumexp_closed),
        Case("cross_entropy", f"ops.composite.cross_entropy(x, targets={_TARGETS.tolist()})",
             fns["cross_entropy"], ((3, 3),), ("x",), None,
             cf.cross_entropy_closed(_TARGETS, sympy.Integer(0))),
        Case("cross_entropy_smoothing",
             f"ops.composite.cross_entropy(x, targets={_TARGETS.tolist()}, label_smoothing=0.1)",
             fns["cross_entropy_smoothing"], ((3, 3),), ("x",), None,
             cf.cross_entropy_closed(_TARGETS, _SMOOTHING)),
        Case("layer_norm", "eg.layer_norm(x, w, b, eps=1e-5) (row program and its VJP)",
             fns["layer_norm"], ((2, 3), (3,), (3,)), ("x", "w", "b"), "g",
             cf.layer_norm_closed(_EPS)),
        Case("layer_norm_composite", "ops.composite.layer_norm(x, w, b, eps=1e-5) (primitives)",
             fns["layer_norm_composite"], ((2, 3), (3,), (3,)), ("x", "w", "b"), "g",
             cf.layer_norm_closed(_EPS)),
        Case("attention", "scaled_dot_product_attention(Q, K, V)", fns["attention"],
             closed_form=cf.attention_closed(None), **qkv),
        Case("attention_causal", "scaled_dot_product_attention(Q, K, V, mask=causal)",
             fns["attention_causal"], closed_form=cf.attention_closed(_CAUSAL), **qkv),
        Case("attention_padding",
             "scaled_dot_product_attention(Q, K, V, mask=padding: last key masked)",
             fns["attention_padding"], closed_form=cf.attention_closed(_PADDING), **qkv),
        Case("self_attention", "self-attention of 3 tokens: attention(X W_Q^T, X W_K^T, X W_V^T)",
             fns["self_attention"], ((3, 2), (2, 2), (2, 2), (2, 2)),
             ("X", "W_Q", "W_K", "W_V"), "dO", cf.self_attention_closed),
        Case("multi_head_attention",
             "multi-head attention: 2 heads (width 1), output projection W_O",
             fns["multi_head_attention"], ((3, 2), (2, 2), (2, 2), (2, 2), (2, 2)),
             ("X", "W_Q", "W_K", "W_V", "W_O"), "dO"),
    ]
    return {c.key: c for c in cases}


@functools.lru_cache(maxsize=None)
def case_report(key: str) -> GradientReport:
    """The verification report of one case of `DERIVATIONS` (computed once per process)."""
    c = cases()[key]
    return verify_gradients(c.fn, *c.shapes, names=c.names, cotangent=c.cotangent,
                            closed_form=c.closed_form, name=c.key, raise_on_failure=False)


def case_keys() -> list[str]:
    return list(cases())

