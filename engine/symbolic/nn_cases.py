"""Proofs on the trained path: nn modules and losses, run as training runs them.

The modules' own `forward` (and the engine's backward) run on the symbolic backend:
each Parameter is moved there and its data replaced by symbols named after it
(`symbolic_parameters`), so nothing is re-implemented for the proof. Sizes are the
smallest that still take every path (2 heads, a query with no allowed key, one with
one key, one with two; ignored and smoothed loss rows).

A whole TransformerDecoderLayer is too large for sympy.diff of its output: at
d_model 2 and T 2 its output has ~300 distinct subexpressions but ~10^7 as a tree,
its input gradient ~10^13, and sympy walks trees. So the layer is proved twice:
every op of its graph has its VJP proved exactly at the shapes, parameters and
masks it has there (`verify_graph`), and the whole backward, the chain rule that
joins them included, is proved by induction over the graph with every value bound
to a symbol (`engine.symbolic.chain.verify_chain`, `decoder_chain_report`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import sympy

import nn
from backends import get_backend
from backends.symbolic import SymArray

from ..state import keep_graph_inputs
from ..tensor import Tensor
from . import closed_forms as cf
from .chain import ChainReport, verify_chain
from .verify import (GradientReport, constant, graph_nodes, node_key, node_report,
                     symbolic_tensor, symbols, verify_leaves)

__all__ = ["symbolic_parameters", "NNCase", "nn_cases", "nn_case_report", "GraphReport",
           "verify_graph", "decoder_layer", "decoder_run", "decoder_graph_report",
           "decoder_chain_report",
           "causal_lm_run", "seq2seq_run", "CHAIN_CASES", "chain_report"]

_TARGETS = np.array([0, -100, 2])          # the middle row is ignored
_SMOOTHING = 0.1
_EPS = 1e-5
# key 0 is padding: with the causal mask query 0 has no key, query 1 one, query 2 two.
_PADDING = np.array([[True, False, False]])


def symbolic_parameters(module: Any) -> dict[str, Tensor]:
    """Move `module` to the symbolic backend and make each of its Parameters (the same
    objects, so its forward is unchanged) a matrix of symbols named after it."""
    module.to("symbolic")
    be = get_backend("symbolic")
    out = {}
    for name, p in module.named_parameters():
        p._data = SymArray(symbols(name, p.shape), np.float64)
        p._backend = be
        out[name] = p
    return out


@dataclass(frozen=True)
class NNCase:
    """One nn proof: `build()` returns (run, leaves) for `verify_leaves`."""
    key: str
    label: str
    build: Callable[[], tuple]
    cotangent: str | None = "g"
    closed_form: Callable | None = None


def _mha() -> tuple:
    mha = nn.MultiheadAttention(2, 2, dtype=np.float64).eval()
    leaves = symbolic_parameters(mha)
    x = symbolic_tensor(symbols("x", (1, 3, 2)))
    pad = constant(_PADDING)
    return (lambda: mha(x, key_padding_mask=pad, is_causal=True)[0]), {"x": x, **leaves}


def _cross_entropy() -> tuple:
    x = symbolic_tensor(symbols("x", (3, 3)))
    targets = constant(_TARGETS)
    return (lambda: nn.functional.cross_entropy(x, targets, ignore_index=-100,
                                                label_smoothing=_SMOOTHING)), {"x": x}


def _layer_norm() -> tuple:
    norm = nn.LayerNorm(3, eps=_EPS, dtype=np.float64)
    leaves = symbolic_parameters(norm)
    x = symbolic_tensor(symbols("x", (2, 3)))
    return (lambda: norm(x)), {"x": x, **leaves}


def decoder_layer() -> Any:
    """The decoder layer of the proofs: d_model 2, 2 heads, feed-forward 2, no dropout."""
    return nn.TransformerDecoderLayer(2, 2, 2, dropout=0.0, dtype=np.float64).eval()


def _decoder_feed_forward() -> tuple:
    layer = decoder_layer()
    leaves = {k: v for k, v in symbolic_parameters(layer).items()
              if k.startswith(("linear", "norm3"))}
    x = symbolic_tensor(symbols("x", (1, 1, 2)))
    return (lambda: layer.norm3(x + layer._ff(x))), {"x": x, **leaves}


def nn_cases() -> dict[str, NNCase]:
    cases = [
        NNCase("nn_multihead_attention",
               "nn.MultiheadAttention(2, 2 heads)(x, key_padding_mask=[[True, False, False]], "
               "is_causal=True): queries with 0, 1 and 2 allowed keys", _mha),
        NNCase("nn_cross_entropy",
               f"nn.functional.cross_entropy(x, {_TARGETS.tolist()}, ignore_index=-100, "
               f"label_smoothing={_SMOOTHING})", _cross_entropy, None,
               cf.cross_entropy_closed(_TARGETS, sympy.Rational(1, 10))),
        NNCase("nn_layer_norm", "nn.LayerNorm(3)(x)", _layer_norm, "g",
               cf.layer_norm_closed(sympy.Rational(1, 10 ** 5))),
        NNCase("nn_decoder_feed_forward",
               "TransformerDecoderLayer(2, 2, 2): norm3(x + linear2(relu(linear1(x)))), its own "
               "modules", _decoder_feed_forward),
    ]
    return {c.key: c for c in cases}


@functools.lru_cache(maxsize=None)
def nn_case_report(key: str) -> GradientReport:
    """The verification report of one nn case (computed once per process)."""
    c = nn_cases()[key]
    run, leaves = c.build()
    return verify_leaves(run, leaves, cotangent=c.cotangent, closed_form=c.closed_form,
                         name=c.key, raise_on_failure=False)


@dataclass
class GraphReport:
    """Every op of one forward's graph, its VJP proved on its own."""
    name: str
    nodes: int                                   # ops in the graph
    reports: list[GradientReport] = field(default_factory=list)   # one per distinct node_key
    unreached: list[str] = field(default_factory=list)   # leaves no op of the graph reads

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.reports) and not self.unreached

    @property
    def ops(self) -> list[str]:
        return sorted({r.name for r in self.reports})

    def count(self, method: str) -> int:
        return sum(r.count(method) for r in self.reports)

    def summary(self) -> str:
        checks = sum(len(r.checks) for r in self.reports)
        head = (f"{self.name}: {self.nodes} ops, {len(self.reports)} distinct (op, shapes, "
                f"params, masks); their VJPs == sympy.diff at {checks} elements "
                f"({self.count('simplified')} simplified to 0, {self.count('rational points')} "
                f"exactly 0 at random rational points)")
        bad = [r.summary() for r in self.reports if not r.ok]
        if self.unreached:
            bad.append(f"no op reads {', '.join(self.unreached)}")
        return head if not bad else head + "\n  FAILED:\n  " + "\n  ".join(bad)


def verify_graph(run: Callable[[], Tensor], leaves: dict[str, Tensor], name: str) -> GraphReport:
    """Run `run()` on the symbolic backend and prove the VJP of every op of its graph
    at the inputs' shapes, the op's params and its integer/bool inputs (masks); also
    report the `leaves` that no op reads (a parameter the forward skips)."""
    with keep_graph_inputs():                      # node_report re-runs each op on its inputs
        out = run()
    nodes = graph_nodes(out)
    read = {id(x) for _, node in nodes for x in node.inputs}
    report = GraphReport(name, len(nodes),
                         unreached=[k for k, t in leaves.items() if id(t) not in read])
    seen: set = set()
    for _, node in nodes:
        key = node_key(node)
        if key not in seen:
            seen.add(key)
            report.reports.append(node_report(node))
    return report


def decoder_run() -> tuple:
    """(run, leaves) of a whole TransformerDecoderLayer forward: causal self-attention,
    memory key 0 padded, 2 heads, residuals, 3 LayerNorms, relu feed-forward."""
    layer = decoder_layer()
    tgt = symbolic_tensor(symbols("x", (1, 2, 2)))
    memory = symbolic_tensor(symbols("m", (1, 3, 2)))
    leaves = {"x": tgt, "m": memory, **symbolic_parameters(layer)}
    pad = constant(_PADDING)
    return (lambda: layer(tgt, memory, tgt_is_causal=True, memory_key_padding_mask=pad)), leaves


@functools.lru_cache(maxsize=None)
def decoder_graph_report() -> GraphReport:
    """Every op of the decoder layer's graph (`decoder_run`), its VJP proved."""
    return verify_graph(*decoder_run(), "TransformerDecoderLayer")


def causal_lm_run() -> tuple:
    """(run, leaves) of a decoder-only language model's training loss: nn.CausalLM
    (vocab 3, d_model 2, 2 heads, one layer, output tied to the embedding) on tokens
    [0, 2, 1], cross_entropy against [2, 1, ignored] with label smoothing 0.1."""
    lm = nn.CausalLM(3, d_model=2, nhead=2, num_layers=1, dim_feedforward=2, dropout=0.0,
                     max_len=4, dtype=np.float64).eval()
    leaves = symbolic_parameters(lm)
    tokens, targets = constant(np.array([[0, 2, 1]])), constant(np.array([2, 1, -100]))
    return (lambda: nn.functional.cross_entropy(lm(tokens).reshape(-1, 3), targets,
                                                ignore_index=-100,
                                                label_smoothing=_SMOOTHING)), leaves


def seq2seq_run() -> tuple:
    """(run, leaves) of an encoder-decoder Transformer's training loss:
    nn.Seq2SeqTransformer (vocab 3, d_model 2, 2 heads, one encoder and one decoder layer)
    from source [0, 2, 1] and target input [1, 2], cross_entropy against [2, 0]."""
    model = nn.Seq2SeqTransformer(3, d_model=2, nhead=2, num_encoder_layers=1,
                                  num_decoder_layers=1, dim_feedforward=2, dropout=0.0,
                                  dtype=np.float64).eval()
    leaves = symbolic_parameters(model)
    src, tgt_in = constant(np.array([[0, 2, 1]])), constant(np.array([[1, 2]]))
    tgt_out = constant(np.array([2, 0]))
    return (lambda: nn.functional.cross_entropy(model(src, tgt_in).reshape(-1, 3),
                                                tgt_out)), leaves


# Whole graphs proved end to end by `verify_chain`: key -> (label, build).
CHAIN_CASES: dict[str, tuple[str, Callable[[], tuple]]] = {
    "decoder_layer": ("a `TransformerDecoderLayer(2, 2, 2)`'s output (the layer above)",
                      decoder_run),
    "causal_lm_loss": ("a decoder-only LM's training loss: `nn.CausalLM` (vocab 3, d_model 2, "
                       "2 heads, 1 layer, output tied to the embedding), `cross_entropy` with "
                       "an ignored target and label smoothing 0.1", causal_lm_run),
    "seq2seq_loss": ("an encoder-decoder's training loss: `nn.Seq2SeqTransformer` (vocab 3, "
                     "d_model 2, 2 heads, 1 + 1 layers, tied embeddings), `cross_entropy`",
                     seq2seq_run),
}


@functools.lru_cache(maxsize=None)
def chain_report(key: str) -> ChainReport:
    """One whole graph of `CHAIN_CASES` proved end to end (computed once per process)."""
    label, build = CHAIN_CASES[key]
    return verify_chain(*build(), key)


def decoder_chain_report() -> ChainReport:
    """The whole decoder layer's backward (`decoder_run`) proved end to end."""
    return chain_report("decoder_layer")
