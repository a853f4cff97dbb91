"""Closed forms: hand derivations of the gradients, written in sympy.

Each is compared exactly with the engine's backward by `verify_gradients`; they are
written independently of the engine (their own stable softmax, plain NumPy object
arrays), so agreeing with them is evidence, not a tautology.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import sympy

def _rows(a: np.ndarray) -> Iterable[tuple]:
    """Indices of the rows (all leading axes) of `a`."""
    return np.ndindex(*a.shape[:-1])


def stable_softmax(s: np.ndarray) -> np.ndarray:
    """softmax over the last axis as exp(s - max s) / sum: the standard stable form,
    written independently of the engine (entries at -oo give 0)."""
    p = np.empty(s.shape, dtype=object)
    for r in _rows(s):
        row = [sympy.sympify(e) for e in s[r]]
        m = sympy.Max(*[e for e in row if e != -sympy.oo])
        ex = [sympy.exp(e - m) for e in row]
        total = sympy.Add(*ex)
        p[r] = [e / total for e in ex]
    return p


def softmax_jvp(arrays: list, y: np.ndarray, v: np.ndarray) -> list:
    """J^T v with J = diag(p) - p p^T, row by row."""
    (x,) = arrays
    p = stable_softmax(x)
    out = np.empty(x.shape, dtype=object)
    for r in _rows(x):
        pc = sympy.Matrix(list(p[r]))
        jac = sympy.diag(*list(p[r])) - pc * pc.T
        out[r] = list(jac.T * sympy.Matrix(list(v[r])))
    return [out]


def log_softmax_closed(arrays: list, y: np.ndarray, v: np.ndarray) -> list:
    """d log_softmax: v - p * sum(v)."""
    (x,) = arrays
    p = stable_softmax(x)
    out = np.empty(x.shape, dtype=object)
    for r in _rows(x):
        total = sympy.Add(*v[r])
        out[r] = [vi - pi * total for vi, pi in zip(v[r], p[r])]
    return [out]


def logsumexp_closed(arrays: list, y: np.ndarray, v: np.ndarray) -> list:
    """d logsumexp: p * v."""
    (x,) = arrays
    p = stable_softmax(x)
    out = np.empty(x.shape, dtype=object)
    for r in _rows(x):
        out[r] = [pi * v[r] for pi in p[r]]
    return [out]


def cross_entropy_closed(targets: np.ndarray, smoothing: sympy.Rational,
                         ignore_index: int = -100) -> Callable:
    """d mean cross-entropy: (softmax - ((1 - s) onehot + s / C)) / rows counted, and 0
    on the rows whose target is `ignore_index`."""
    def closed(arrays: list, y: np.ndarray, v: np.ndarray) -> list:
        (x,) = arrays
        p = stable_softmax(x)
        classes, rows = x.shape[-1], int(np.sum(targets != ignore_index))
        out = np.empty(x.shape, dtype=object)
        for r in _rows(x):
            for c in range(classes):
                target = (1 - smoothing) * (1 if targets[r] == c else 0) + smoothing / classes
                out[r + (c,)] = 0 if targets[r] == ignore_index else \
                    v[()] * (p[r + (c,)] - target) / rows
        return [out]
    return closed


def layer_norm_closed(eps: sympy.Rational) -> Callable:
    """dx = rstd (dxh - mean(dxh) - xh mean(dxh xh)) with dxh = v w; dw = sum v xh; db = sum v."""
    def closed(arrays: list, y: np.ndarray, v: np.ndarray) -> list:
        x, w, b = arrays
        n = x.shape[-1]
        dx = np.empty(x.shape, dtype=object)
        dw = np.full(w.shape, sympy.Integer(0), dtype=object)
        db = np.full(b.shape, sympy.Integer(0), dtype=object)
        for r in _rows(x):
            row = list(x[r])
            mu = sympy.Add(*row) / n
            xc = [e - mu for e in row]
            rstd = (sympy.Add(*[e * e for e in xc]) / n + eps) ** sympy.Rational(-1, 2)
            xh = [e * rstd for e in xc]
            dxh = [vi * wi for vi, wi in zip(v[r], w)]
            m1 = sympy.Add(*dxh) / n
            m2 = sympy.Add(*[a * c for a, c in zip(dxh, xh)]) / n
            dx[r] = [rstd * (a - m1 - c * m2) for a, c in zip(dxh, xh)]
            dw += np.array([vi * c for vi, c in zip(v[r], xh)], dtype=object)
            db += np.array(list(v[r]), dtype=object)
        return [dx, dw, db]
    return closed


def attention_closed_parts(q: np.ndarray, k: np.ndarray, v: np.ndarray, do: np.ndarray,
                            mask: np.ndarray | None) -> tuple:
    """The closed forms of attention: S = Q K^T / sqrt(d), P = softmax(S), O = P V;
    dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)), dQ = dS K / sqrt(d),
    dK = dS^T Q / sqrt(d)."""
    scale = 1 / sympy.sqrt(q.shape[-1])
    s = np.matmul(q, k.T) * scale
    if mask is not None:
        s = np.where(mask, s, -sympy.oo)
    p = stable_softmax(s)
    dv = np.matmul(p.T, do)
    dp = np.matmul(do, v.T)
    rowsum = (dp * p).sum(axis=-1, keepdims=True)
    ds = p * (dp - rowsum)
    return np.matmul(ds, k) * scale, np.matmul(ds.T, q) * scale, dv


def attention_closed(mask: np.ndarray | None) -> Callable:
    def closed(arrays: list, y: np.ndarray, do: np.ndarray) -> list:
        q, k, v = arrays
        return list(attention_closed_parts(q, k, v, do, mask))
    return closed


def self_attention_closed(arrays: list, y: np.ndarray, do: np.ndarray) -> list:
    """Through the projections Q = X W_Q^T, K = X W_K^T, V = X W_V^T:
    dX = dQ W_Q + dK W_K + dV W_V and dW_* = d*^T X."""
    x, wq, wk, wv = arrays
    dq, dk, dv = attention_closed_parts(np.matmul(x, wq.T), np.matmul(x, wk.T),
                                         np.matmul(x, wv.T), do, None)
    dx = np.matmul(dq, wq) + np.matmul(dk, wk) + np.matmul(dv, wv)
    return [dx, np.matmul(dq.T, x), np.matmul(dk.T, x), np.matmul(dv.T, x)]



# -- the closed forms as formulas (printed in docs/derivations.md) ---------------------------
# Indexed sympy expressions for one row (0-based indices). `instantiate` turns one into
# the expression of one element, and tests/test_nn_proofs.py checks, exactly, that each
# equals the closed form above that the cases are verified against; the document
# prints these very expressions, so what it shows is what is checked.

i, j, k, c = sympy.symbols("i j k c", integer=True)
n, C, N = sympy.symbols("n C N", integer=True, positive=True)
P, YBAR, X, GAMMA = (sympy.IndexedBase(s) for s in ("p", r"\bar{y}", "x", r"\gamma"))
HBAR, XHAT = sympy.IndexedBase(r"\bar{h}"), sympy.IndexedBase(r"\hat{x}")
SCALAR_YBAR, T, EPS_LS = sympy.Symbol(r"\bar{y}"), sympy.Symbol("t", integer=True), \
    sympy.Symbol(r"\varepsilon", positive=True)
MU, VAR, EPS_LN, RSTD = sympy.symbols(r"\mu \sigma^2 \epsilon r", positive=True)
SP, DP, DO, Q, K, V, DS = (sympy.IndexedBase(s) for s in
                           ("P", r"\bar{P}", r"\bar{O}", "Q", "K", "V", r"\bar{S}"))
d = sympy.Symbol("d", integer=True, positive=True)

FORMULAS = {
    "softmax": (r"\bar{x}_i", P[i] * (YBAR[i] - sympy.Sum(YBAR[j] * P[j], (j, 0, n - 1)))),
    "log_softmax": (r"\bar{x}_i", YBAR[i] - P[i] * sympy.Sum(YBAR[j], (j, 0, n - 1))),
    "logsumexp": (r"\bar{x}_i", P[i] * SCALAR_YBAR),
    "cross_entropy": (r"\bar{x}_i", SCALAR_YBAR * (P[i] - (1 - EPS_LS) * sympy.KroneckerDelta(i, T)
                                                   - EPS_LS / C) / N),
    "layer_norm_rstd": ("r", (VAR + EPS_LN) ** sympy.Rational(-1, 2)),
    "layer_norm_xhat": (r"\hat{x}_i", (X[i] - MU) * RSTD),
    "layer_norm_hbar": (r"\bar{h}_i", YBAR[i] * GAMMA[i]),
    "layer_norm_dx": (r"\bar{x}_i", RSTD * (HBAR[i] - sympy.Sum(HBAR[j], (j, 0, n - 1)) / n
                                            - XHAT[i] * sympy.Sum(HBAR[j] * XHAT[j], (j, 0, n - 1)) / n)),
    "layer_norm_dgamma": (r"\bar{\gamma}_i", YBAR[i] * XHAT[i]),
    "layer_norm_dbeta": (r"\bar{\beta}_i", YBAR[i]),
    "attention_dp": (r"\bar{P}_{ij}", sympy.Sum(DO[i, c] * V[j, c], (c, 0, d - 1))),
    "attention_ds": (r"\bar{S}_{ij}", SP[i, j] * (DP[i, j] - sympy.Sum(DP[i, k] * SP[i, k],
                                                                        (k, 0, n - 1)))),
    "attention_dv": (r"\bar{V}_{jc}", sympy.Sum(SP[i, j] * DO[i, c], (i, 0, n - 1))),
    "attention_dq": (r"\bar{Q}_{ic}", sympy.Sum(DS[i, j] * K[j, c], (j, 0, n - 1)) / sympy.sqrt(d)),
    "attention_dk": (r"\bar{K}_{jc}", sympy.Sum(DS[i, j] * Q[i, c], (i, 0, n - 1)) / sympy.sqrt(d)),
}
"""name -> (the left-hand side in LaTeX, the right-hand side as a sympy expression)."""


def formula_tex(name: str) -> str:
    """`lhs = rhs` of one formula, the right-hand side printed by sympy.latex."""
    lhs, rhs = FORMULAS[name]
    return f"{lhs} = {sympy.latex(rhs)}"


def instantiate(name: str, arrays: dict, scalars: dict, **indices: int) -> sympy.Expr:
    """One element of formula `name`: sizes and scalars from `scalars` ({n: 3, ...}),
    the free indices from `indices` (i=0, ...), each Indexed base read from `arrays`
    (an object array per IndexedBase)."""
    _, rhs = FORMULAS[name]
    free = {sympy.Symbol(s, integer=True): v for s, v in indices.items()}
    e = rhs.xreplace({**scalars, **free}).doit()
    reps = {a: arrays[a.base][tuple(int(t) for t in a.indices)]
            for a in e.atoms(sympy.Indexed)}
    return e.xreplace(reps)
