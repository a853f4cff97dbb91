"""docs/derivations.md: rendered from the verified cases, so it cannot drift.

`python -m engine.symbolic --write docs/derivations.md` regenerates it; every case is
verified while rendering, and a test fails when the committed file differs.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import sympy

from . import closed_forms as cf
from .cases import case_report, cases
from .nn_cases import (CHAIN_CASES, chain_report, decoder_chain_report, decoder_graph_report,
                       nn_case_report, nn_cases)
from .verify import GradientMismatch

__all__ = ["DERIVATIONS", "render_derivations", "main"]

def _vec(name: str, n: int) -> list[sympy.Symbol]:
    return [sympy.Symbol(f"{name}_{i}", real=True) for i in range(n)]


def _tex(e: sympy.Expr) -> str:
    return sympy.latex(e)


def _formula(name: str) -> str:
    """A closed form as `closed_forms.FORMULAS` holds it (tests check each equals the
    closed form the cases are verified against)."""
    return f"$${cf.formula_tex(name)}$$"


def _section_softmax() -> tuple[list[str], list[str]]:
    x = _vec("x", 3)
    p0 = sympy.exp(x[0]) / sympy.Add(*[sympy.exp(e) for e in x])
    body = [
        "Forward, for one row $x \\in \\mathbb{R}^3$ (the engine subtracts the row max "
        "first, as a stop-gradient constant; the verification proves that this shift "
        "cancels):",
        f"$$p_0 = {_tex(p0)}$$",
        "Derived by `sympy.diff`:",
        f"$$\\frac{{\\partial p_0}}{{\\partial x_0}} = {_tex(sympy.diff(p0, x[0]))}$$",
        f"$$\\frac{{\\partial p_0}}{{\\partial x_1}} = {_tex(sympy.diff(p0, x[1]))}$$",
        "Closed form ($J = \\operatorname{diag}(p) - p p^\\top$, $\\bar{x} = J^\\top \\bar{y}$):",
        _formula("softmax"),
    ]
    return body, ["softmax", "softmax_composite"]


def _section_cross_entropy() -> tuple[list[str], list[str]]:
    x = _vec("x", 3)
    lse = sympy.log(sympy.Add(*[sympy.exp(e) for e in x]))
    ce = lse - x[0]
    eps = sympy.Symbol("varepsilon", positive=True)
    smooth = (1 - eps) * ce + eps * sympy.Add(*[lse - e for e in x]) / 3
    body = [
        "Forward: $\\log\\operatorname{softmax}(x)_i = x_i - \\log\\sum_j e^{x_j}$; the "
        "cross-entropy of a row with target class $t$ is its negative at $t$, averaged over "
        "the $N$ rows. For one row with $t = 0$:",
        f"$$\\ell = {_tex(ce)}$$",
        "Derived by `sympy.diff`:",
        f"$$\\frac{{\\partial \\ell}}{{\\partial x_0}} = {_tex(sympy.diff(ce, x[0]))}, \\qquad "
        f"\\frac{{\\partial \\ell}}{{\\partial x_1}} = {_tex(sympy.diff(ce, x[1]))}$$",
        "With label smoothing $\\varepsilon$ (target distribution "
        "$(1-\\varepsilon)\\,\\mathrm{onehot}_t + \\varepsilon / C$):",
        f"$$\\frac{{\\partial \\ell_\\varepsilon}}{{\\partial x_1}} = "
        f"{_tex(sympy.diff(smooth, x[1]))}$$",
        "Closed forms: log-softmax, logsumexp, and the mean cross-entropy over the $N$ rows "
        "that are not ignored, target $t$, smoothing $\\varepsilon$ (an ignored row's "
        "gradient is 0):",
        _formula("log_softmax"), _formula("logsumexp"), _formula("cross_entropy"),
    ]
    return body, ["log_softmax", "log_softmax_composite", "logsumexp", "cross_entropy",
                  "cross_entropy_smoothing"]


def _section_layer_norm() -> tuple[list[str], list[str]]:
    x, w, b = _vec("x", 2), _vec("gamma", 2), _vec("beta", 2)
    eps = sympy.Symbol("epsilon", positive=True)
    mu = sympy.Add(*x) / 2
    var = sympy.Add(*[(e - mu) ** 2 for e in x]) / 2
    y0 = (x[0] - mu) / sympy.sqrt(var + eps) * w[0] + b[0]
    body = [
        "Forward, over the last axis of width $n$ (biased variance): "
        "$y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} \\odot \\gamma + \\beta$. "
        "For $n = 2$ (the verification below uses $n = 3$):",
        f"$$y_0 = {_tex(y0)}$$",
        "Derived by `sympy.diff`:",
        f"$$\\frac{{\\partial y_0}}{{\\partial x_1}} = {_tex(sympy.diff(y0, x[1]))}$$",
        f"$$\\frac{{\\partial y_0}}{{\\partial \\gamma_0}} = {_tex(sympy.diff(y0, w[0]))}, "
        f"\\qquad \\frac{{\\partial y_0}}{{\\partial \\beta_0}} = {_tex(sympy.diff(y0, b[0]))}$$",
        "Closed form, for one row ($\\bar{\\gamma}$ and $\\bar{\\beta}$ are summed over the rows):",
        *[_formula(f"layer_norm_{part}") for part in
          ("rstd", "xhat", "hbar", "dx", "dgamma", "dbeta")],
    ]
    return body, ["layer_norm", "layer_norm_composite"]


def _section_attention() -> tuple[list[str], list[str]]:
    q, k0, k1, v0, v1 = sympy.symbols("q k_0 k_1 v_0 v_1", real=True)
    e0, e1 = sympy.exp(q * k0), sympy.exp(q * k1)
    o = (e0 * v0 + e1 * v1) / (e0 + e1)
    body = [
        "Forward: $S = Q K^\\top / \\sqrt{d}$ (masked entries set to $-\\infty$), "
        "$P = \\operatorname{softmax}(S)$ by rows, $O = P V$. "
        "For one query against two keys with $d = 1$:",
        f"$$o = {_tex(o)}$$",
        "Derived by `sympy.diff`:",
        f"$$\\frac{{\\partial o}}{{\\partial q}} = {_tex(sympy.diff(o, q))}$$",
        f"$$\\frac{{\\partial o}}{{\\partial k_0}} = {_tex(sympy.diff(o, k0))}, \\qquad "
        f"\\frac{{\\partial o}}{{\\partial v_0}} = {_tex(sympy.diff(o, v0))}$$",
        "Closed forms, given $\\bar{O}$ (`dO`), $n$ keys of width $d$:",
        *[_formula(f"attention_{part}") for part in ("dp", "ds", "dv", "dq", "dk")],
        "Through projections $Q = X W_Q^\\top$, $K = X W_K^\\top$, $V = X W_V^\\top$: "
        "$\\bar{X} = \\bar{Q} W_Q + \\bar{K} W_K + \\bar{V} W_V$, "
        "$\\bar{W}_Q = \\bar{Q}^\\top X$ (and likewise for $W_K$, $W_V$).",
    ]
    return body, ["attention", "attention_causal", "attention_padding", "self_attention",
                  "multi_head_attention"]


def _nn_line(key: str) -> str:
    """The 'verified' line of one nn case; raises if it does not verify."""
    c, r = nn_cases()[key], nn_case_report(key)
    if not r.ok:
        raise GradientMismatch(r)
    n = sum(1 for ch in r.checks if ch.against == "sympy.diff")
    line = (f"- verified: engine backward == sympy.diff — `{c.label}`; {r.shapes_text()}; {n} "
            f"elements ({r.count('simplified')} simplified to 0, {r.count('rational points')} "
            f"exactly 0 at 20 random rational points)")
    if c.closed_form is not None:
        line += (f"; == closed form at the same {n} elements "
                 f"({r.count('simplified', 'closed form')} simplified to 0)")
    return line + "."


def _section_nn() -> tuple[list[str], list[str]]:
    graph, chain = decoder_graph_report(), decoder_chain_report()
    for report in (graph, *(chain_report(k) for k in CHAIN_CASES)):
        if not report.ok:
            raise AssertionError(report.summary())
    body = [
        "The same proofs on the code training calls: the nn modules' own `forward` and "
        "Parameters (moved to the symbolic backend, each element a symbol named after the "
        "parameter) and the engine's backward, compared element by element with `sympy.diff` "
        "for the input and every parameter (`engine/symbolic/nn_cases.py`; "
        "`python -m pytest tests/test_nn_proofs.py`, a few seconds). Dropout is off "
        "(`eval()` / p = 0): random masks are tested apart.",
        "\n".join(_nn_line(k) for k in nn_cases()),
        f"A whole `TransformerDecoderLayer(2, 2, 2)` (causal self-attention over 2 positions, "
        f"cross-attention to 3 memory positions with key 0 padded, 2 heads, 3 LayerNorms, relu): "
        f"its own forward runs on the symbolic backend and every op of its graph has its VJP "
        f"proved against `sympy.diff` at the shapes, parameters and masks it has there, with "
        f"fresh symbols for the op's inputs: {graph.nodes} ops, {len(graph.reports)} distinct, "
        f"{sum(len(r.checks) for r in graph.reports)} elements ({graph.count('simplified')} "
        f"simplified to 0, {graph.count('rational points')} exactly 0 at random rational "
        f"points); every parameter is read by the graph.",
        f"The same layer end to end, in one piece: its whole backward is proved by induction over "
        f"its graph (`engine/symbolic/chain.py`). sympy cannot differentiate the output directly "
        f"(about 300 distinct subexpressions, but about $10^7$ as a tree, and its input gradient "
        f"about $10^{{13}}$: sympy walks trees), so every value an op makes, forward and backward, "
        f"is bound to a fresh symbol ({chain.bound} bindings) and no expression is more than one "
        f"op deep. Then, consumers first, for every tensor $T$ of the graph (each op's output, the "
        f"input, the memory and every parameter) and every element $j$: the cotangent autograd "
        f"accumulated, $w_T[j]$, equals $\\sum_c \\sum_k w_c[k]\\, \\partial f_c[k] / "
        f"\\partial T[j]$ over every op $c$ that read $T$, with $f_c$ the op's forward re-run on "
        f"fresh symbols and differentiated by `sympy.diff` (the softmax's max shift held once "
        f"proved to cancel). Each op's recorded output is also checked to be its forward at its "
        f"recorded inputs, so by induction from the output's cotangent $v$ down, every $w_T$ is "
        f"$\\partial (v \\cdot y) / \\partial T$: the multivariable chain rule over every path. "
        f"{chain.nodes} ops, {chain.tensors} tensors, {chain.elements} elements "
        f"({chain.methods.get('simplified', 0)} simplified to 0, "
        f"{chain.methods.get('rational points', 0)} exactly 0 at random rational points). "
        f"This proves what the op-by-op proofs cannot: autograd's bookkeeping on the real graph "
        f"(a backward that keeps only the last of two contributions to the residual stream "
        f"passes every op-by-op proof and fails here; `tests/test_nn_proofs.py`). "
        f"The float64 gradcheck of the whole layer is `tests/test_nn_transformer.py::"
        f"test_layers_gradcheck` (numerical, not a proof).",
        "The same induction, on the layer above and on whole models' training losses (the "
        "code a training step runs from token ids to the scalar loss, every parameter's "
        "gradient included):",
        "\n".join(_chain_line(k) for k in CHAIN_CASES),
    ]
    return body, []


def _chain_line(key: str) -> str:
    """The 'verified' line of one whole-graph proof; raises if it does not verify."""
    r = chain_report(key)
    if not r.ok:
        raise AssertionError(r.summary())
    return (f"- verified end to end: {CHAIN_CASES[key][0]}; {r.nodes} ops, {r.tensors} tensors, "
            f"{r.elements} cotangent elements ({r.methods.get('simplified', 0)} simplified to 0, "
            f"{r.methods.get('rational points', 0)} exactly 0 at random rational points), "
            f"{r.bound} bindings.")


_SECTIONS = [("Softmax", _section_softmax),
             ("Log-softmax and cross-entropy", _section_cross_entropy),
             ("Layer norm", _section_layer_norm),
             ("Scaled dot-product attention", _section_attention),
             ("Proofs on the trained path: nn modules and losses", _section_nn)]

DERIVATIONS = [title for title, _ in _SECTIONS]


def _verified_line(key: str) -> str:
    """The 'verified' line of one case; raises if the case does not verify."""
    c = cases()[key]
    r = case_report(key)
    if not r.ok:
        raise GradientMismatch(r)
    n = sum(1 for ch in r.checks if ch.against == "sympy.diff")
    parts = [f"verified: engine backward == sympy.diff — `{c.label}`; {r.shapes_text()}; "
             f"{n} elements ({r.count('simplified')} simplified to 0, "
             f"{r.count('rational points')} exactly 0 at 20 random rational points)"]
    if c.closed_form is not None:
        parts.append(f"engine backward == closed form at the same {n} elements "
                     f"({r.count('simplified', 'closed form')} simplified to 0, "
                     f"{r.count('rational points', 'closed form')} at rational points)")
    return "- " + "; ".join(parts) + "."


def render_derivations() -> str:
    """The text of docs/derivations.md: every case is verified while rendering."""
    lines = [
        "# Gradient derivations, proved on the engine's own code",
        "",
        "Generated by `python -m engine.symbolic --write docs/derivations.md`; do not edit by "
        "hand (`tests/test_symbolic.py` fails when this file differs from the generator).",
        "",
        "Each section gives the forward, its gradient as `sympy.diff` derives it (printed by "
        "`sympy.latex`), and the closed form. The \"verified\" lines are not a second hand "
        "derivation: the engine's forward *and its own backward* ran on the symbolic backend "
        "(NumPy object arrays of sympy expressions), with a matrix of symbols per input and a "
        "symbolic cotangent (so the whole Jacobian is checked at once), and every element of "
        "every input gradient was compared with `sympy.diff` of the symbolic forward, and with "
        "the closed form, exactly: either the difference simplifies to 0 (function "
        "applications such as exp and Max taken as free unknowns, then the zero polynomial or "
        "rational function), or it is exactly 0 at 20 random rational points. The max shift of "
        "the stable softmax is first proved to cancel (the derivative of the forward in each "
        "row max is 0), then held constant, as the engine's `stop_gradient` does.",
        "",
        "What is proved and what is checked: \"simplified to 0\" is a proof (an identity with "
        "every function application and radical a free unknown holds for their true values). "
        "\"Exactly 0 at 20 random rational points\" is a check, not a proof: exact arithmetic, "
        "so no rounding hides an error, but a nonzero function can vanish at chosen points "
        "(here it is used where relu's Max does not cancel: sympy.diff gives Heaviside(u) "
        "where the engine states relu' on its output). Both hold away from kinks and ties: "
        "the points avoid zeros and ties, and the kink conventions (relu'(0) = 0, ties share "
        "the gradient) are tested in `tests/test_symbolic_kinks.py`.",
        "",
        "Softmax, log-softmax, logsumexp, layer norm, RMS norm and the per-row losses "
        "(`cross_entropy_per_row`, `nll_per_row`, which `ops.composite.cross_entropy` / "
        "`nll_loss` and so nn's losses call) are row programs (`ops/rows.py`): per-row "
        "reductions, picks of the target's entry and elementwise sympy. The forward proved "
        "here is that program run step by step on the symbolic backend, and the losses' "
        "gradients are row programs too, so their backward is proved in the same form. The "
        "kernels that run, host C and CUDA, are printed from the same declarations "
        "(`backends/rowprint.py`) and tested equal to the NumPy references: what trains is "
        "the printed form of the proved program. The printers themselves are not proved: "
        "the printed kernels are tested numerically against the NumPy references. The "
        "fused CUDA attention (`ops/attention.py`) calls the same softmax program and its "
        "gradient `SOFTMAX_GRAD` (p * (dp - sum(dp * p)), proved equal to the softmax's "
        "gradient in `tests/test_cuda_attention.py`, where `verify_gradients` also proves the "
        "fused op's VJP on the symbolic backend) as printed `__device__` functions.",
        "",
        "The closed forms are the sympy expressions of `engine/symbolic/closed_forms.py` "
        "(`FORMULAS`), printed by `sympy.latex`; `tests/test_nn_proofs.py` checks each equals, "
        "exactly, the closed form the cases are verified against.",
        "",
    ]
    for title, section in _SECTIONS:
        body, keys = section()
        lines += [f"## {title}", ""]
        for para in body:
            lines += [para, ""]
        lines += [_verified_line(k) for k in keys] + [""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m engine.symbolic [--write PATH | --check PATH]`."""
    parser = argparse.ArgumentParser(prog="python -m engine.symbolic",
                                     description="Verify the gradient derivations with sympy "
                                                 "and render docs/derivations.md.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="PATH", help="write the document to PATH")
    group.add_argument("--check", metavar="PATH",
                       help="exit 1 if PATH differs from what the generator produces")
    args = parser.parse_args(argv)
    text = render_derivations()
    if args.write:
        with open(args.write, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.write}")
    elif args.check:
        with open(args.check, encoding="utf-8") as f:
            same = f.read() == text
        print(f"{args.check} is {'up to date' if same else 'out of date'}")
        return 0 if same else 1
    else:
        sys.stdout.write(text)
    return 0

