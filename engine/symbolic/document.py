"""docs/derivations.md: rendered from the verified cases, so it cannot drift.

`python -m engine.symbolic --write docs/derivations.md` regenerates it; every case is
verified while rendering, and a test fails when the committed file differs.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import sympy

from .cases import case_report, cases
from .verify import GradientMismatch

__all__ = ["DERIVATIONS", "render_derivations", "main"]

def _vec(name: str, n: int) -> list[sympy.Symbol]:
    return [sympy.Symbol(f"{name}_{i}", real=True) for i in range(n)]


def _tex(e: sympy.Expr) -> str:
    return sympy.latex(e)


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
        "Closed form: $J = \\operatorname{diag}(p) - p p^\\top$, so "
        "$\\bar{x} = J^\\top \\bar{p} = p \\odot (\\bar{p} - \\langle \\bar{p}, p\\rangle)$.",
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
        "Closed forms: log-softmax $\\bar{x} = \\bar{y} - p \\sum_j \\bar{y}_j$; "
        "cross-entropy: $\\bar{x} = (p - \\mathrm{onehot}_t) / N$, with smoothing "
        "$\\bar{x} = (p - (1-\\varepsilon)\\,\\mathrm{onehot}_t - \\varepsilon / C) / N$; "
        "logsumexp: $\\bar{x} = p\\,\\bar{y}$.",
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
        "Closed form, with $\\hat{x} = (x - \\mu)\\, r$, $r = (\\sigma^2 + \\epsilon)^{-1/2}$ and "
        "$\\bar{\\hat{x}} = \\bar{y} \\odot \\gamma$: "
        "$\\bar{x} = r\\,(\\bar{\\hat{x}} - \\operatorname{mean}(\\bar{\\hat{x}}) - \\hat{x}\\,"
        "\\operatorname{mean}(\\bar{\\hat{x}} \\odot \\hat{x}))$, "
        "$\\bar{\\gamma} = \\sum_{\\text{rows}} \\bar{y} \\odot \\hat{x}$, "
        "$\\bar{\\beta} = \\sum_{\\text{rows}} \\bar{y}$.",
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
        "Closed forms, given $\\bar{O}$ (`dO`): "
        "$\\bar{V} = P^\\top \\bar{O}$, $\\bar{P} = \\bar{O} V^\\top$, "
        "$\\bar{S} = P \\odot (\\bar{P} - \\operatorname{rowsum}(\\bar{P} \\odot P))$, "
        "$\\bar{Q} = \\bar{S} K / \\sqrt{d}$, $\\bar{K} = \\bar{S}^\\top Q / \\sqrt{d}$. "
        "Through projections $Q = X W_Q^\\top$, $K = X W_K^\\top$, $V = X W_V^\\top$: "
        "$\\bar{X} = \\bar{Q} W_Q + \\bar{K} W_K + \\bar{V} W_V$, "
        "$\\bar{W}_Q = \\bar{Q}^\\top X$ (and likewise for $W_K$, $W_V$).",
    ]
    return body, ["attention", "attention_causal", "attention_padding", "self_attention",
                  "multi_head_attention"]


_SECTIONS = [("Softmax", _section_softmax),
             ("Log-softmax and cross-entropy", _section_cross_entropy),
             ("Layer norm", _section_layer_norm),
             ("Scaled dot-product attention", _section_attention)]

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
        "Softmax, log-softmax, logsumexp, layer norm, RMS norm and the per-row losses "
        "(`cross_entropy_per_row`, `nll_per_row`, which `ops.composite.cross_entropy` / "
        "`nll_loss` and so nn's losses call) are row programs (`ops/rows.py`): per-row "
        "reductions, picks of the target's entry and elementwise sympy. The forward proved "
        "here is that program run step by step on the symbolic backend, and the losses' "
        "gradients are row programs too, so their backward is proved in the same form. The "
        "kernels that run, host C and CUDA, are printed from the same declarations "
        "(`backends/rowprint.py`) and tested equal to the NumPy references: what trains is "
        "the printed form of the proved program.",
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

