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

