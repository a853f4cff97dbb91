"""When an elementwise node is exactly one of its inputs: derived, not listed.

The op's sympy expression is evaluated with the node's constant inputs substituted
(x*1, 1*x, x+0, x-0, x/1, x**1, max(x, -inf), where(c, x, x), ... for every op there
is and will be), and, failing that, composed with the expressions of the elementwise
nodes producing its inputs (neg(neg(x))). When the result is a bare input symbol, the
node is that input in exact arithmetic.

sympy reasons about finite reals; floats are not those (lerp(a, b, 0) is `a` to
sympy but NaN in IEEE arithmetic when b is infinite, and exp(log(x)) rounds). So an
identity also has to hold when the ops run on the CPU on probes of the real dtypes
(zeros of both signs, ones, the extremes, subnormals, infinities, NaN, random values,
the pattern's constants): every result must equal the input (values equal, NaN where
the input is NaN). The probes run first, being cheap and rejecting nearly every
pattern; sympy confirms the rest. Each derivation is cached by the pattern it depends on:
the ops, where each constant sits and its exact value, which inputs are the same
value, and every input's dtype.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import sympy

from backends import get_backend
from ops.elementwise import ElementwiseOp

from .ir import Node, Value

# {pattern: index of the leaf the node equals, or None}
_DERIVED: dict = {}
MAX_PROBES = 1 << 16           # probe rows for nodes with many distinct inputs
MAX_CACHED = 1 << 14           # patterns remembered


def elementwise_identity(n: Node, producers: dict, constants: dict) -> Value | None:
    """The input (of n, or of an elementwise node producing one of n's inputs) that n's
    value always equals, with n's shape and dtype; None when there is none."""
    if not isinstance(n.op, ElementwiseOp):
        return None
    leaves: list = []
    args = _args(n, leaves, constants, None)
    found = _identity(n.op, args, leaves) if args is not None else None
    if found is None and any(_producer(a, producers) for a in n.inputs):
        leaves = []
        args = _args(n, leaves, constants, producers)
        found = _identity(n.op, args, leaves) if args is not None else None
    if found is None:
        return None
    v = leaves[found]
    return v if v.shape == n.out.shape and v.dtype == n.out.dtype else None


# -- the pattern ------------------------------------------------------------------------------

def _producer(a: Any, producers: dict) -> Node | None:
    p = producers.get(a) if isinstance(a, Value) else None
    return p if p is not None and isinstance(p.op, ElementwiseOp) else None


def _args(n: Node, leaves: list, constants: dict, producers: dict | None) -> tuple | None:
    """n's inputs as ("leaf", k) (the k-th distinct value), ("const", constant) or, when
    `producers` is given, ("op", op, args) for an input computed by an elementwise node;
    None when an input is none of these (a bool constant)."""
    out = []
    for a in n.inputs:
        p = _producer(a, producers) if producers is not None else None
        inner = _args(p, leaves, constants, None) if p is not None else None
        if inner is not None:
            out.append(("op", p.op, inner))
            continue
        c = _constant(a, constants)
        if c is not None:
            out.append(("const", c))
        elif isinstance(a, Value):
            if a not in leaves:
                leaves.append(a)
            out.append(("leaf", leaves.index(a)))
        else:
            return None
    return tuple(out)


class _Constant:
    """A constant input: its exact value as sympy reads it, the probe that stands for it,
    and a key naming both (type and exact repr: 1, 1.0 and True are different keys)."""

    __slots__ = ("key", "expr", "probe")

    def __init__(self, key: tuple, expr: sympy.Expr, probe: Any) -> None:
        self.key, self.expr, self.probe = key, expr, probe

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Constant) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


def _constant(a: Any, constants: dict) -> _Constant | None:
    """A Python number, or a folded constant array holding one value everywhere (its
    dtype kept: a 0-d array of that dtype is its probe); None otherwise."""
    if isinstance(a, Value):
        arr = constants.get(a)
        if not isinstance(arr, np.ndarray) or arr.size == 0 or arr.dtype.kind not in "fiu":
            return None
        first = arr.reshape(-1)[0]
        if not (arr == first).all():
            return None
        expr = _exact(first.item())
        return None if expr is None else _Constant(("array", arr.dtype.str, repr(first.item())), expr,
                                                   np.asarray(first, arr.dtype))
    if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, float, np.integer, np.floating)):
        return None
    expr = _exact(a.item() if isinstance(a, np.generic) else a)
    return None if expr is None else _Constant(("scalar", type(a).__name__, repr(a)), expr, a)


@functools.lru_cache(maxsize=4096)
def _exact(v: int | float) -> sympy.Expr | None:
    """The number a constant stands for, exactly (a float as the binary rational it is)."""
    if isinstance(v, int):
        return sympy.Integer(v)
    if math.isnan(v):
        return sympy.nan
    if math.isinf(v):
        return sympy.oo if v > 0 else -sympy.oo
    return sympy.Rational(v)


# -- derivation and check ---------------------------------------------------------------------------

def _identity(op: ElementwiseOp, args: tuple, leaves: list) -> int | None:
    dtypes = tuple(v.dtype for v in leaves)
    key = (op, args, dtypes)
    if key not in _DERIVED:
        if len(_DERIVED) >= MAX_CACHED:      # constants that change between traces
            _DERIVED.clear()
        _DERIVED[key] = _derive(op, args, dtypes)
    return _DERIVED[key]


def _derive(op: ElementwiseOp, args: tuple, dtypes: tuple) -> int | None:
    """The leaf both the probes and sympy say the pattern equals (probes first: they are
    cheap and rule out nearly every pattern)."""
    candidates = _equal_on_probes(op, args, dtypes)
    if not candidates:
        return None
    symbols = [sympy.Symbol(f"leaf{k}", real=True) for k in range(len(dtypes))]
    try:
        expr = _expression(op, args, symbols)
    except TypeError:               # a number where sympy wants a truth value (logical ops)
        return None
    return next((k for k in candidates if expr == symbols[k]), None)


def _expression(op: ElementwiseOp, args: tuple, symbols: list) -> sympy.Expr:
    operands = [symbols[a[1]] if a[0] == "leaf" else a[1].expr if a[0] == "const"
                else _as_number(a[1], _expression(a[1], a[2], symbols)) for a in args]
    return op.expr.xreplace(dict(zip(op.symbols, operands)))


def _as_number(op: ElementwiseOp, expr: sympy.Expr) -> sympy.Expr:
    """A comparison's truth value as the 0/1 its bool array holds when another op reads
    it (sympy would read Ne(x, y) != 0 as "a relation is not the number 0": true)."""
    return sympy.Piecewise((1, expr), (0, True)) if op.result == "bool" else expr


def _equal_on_probes(op: ElementwiseOp, args: tuple, dtypes: tuple) -> list[int]:
    """The leaves that running the ops (NumPy backend) reproduces exactly on every probe:
    same dtype, equal values, NaN where the leaf is NaN. The pattern's constants join
    every leaf's probes (where(x != c, x, 0) differs from x only at c)."""
    columns = _probe_columns(dtypes, _constants_of(args))
    if columns is None:
        return []
    with np.errstate(all="ignore"):
        got = np.asarray(_run(op, args, columns, get_backend("cpu")))
    found = []
    for k, want in enumerate(columns):
        if got.dtype != want.dtype or got.shape != want.shape:
            continue
        equal = got == want
        if want.dtype.kind == "f":
            equal |= np.isnan(got) & np.isnan(want)
        if equal.all():
            found.append(k)
    return found


def _run(op: ElementwiseOp, args: tuple, columns: list, backend: Any) -> Any:
    raw = [columns[a[1]] if a[0] == "leaf" else a[1].probe if a[0] == "const"
           else _run(a[1], a[2], columns, backend) for a in args]
    return op.forward(backend, *raw)


def _constants_of(args: tuple) -> list:
    found = []
    for a in args:
        if a[0] == "const":
            found.append(np.asarray(a[1].probe).item())
        elif a[0] == "op":
            found += _constants_of(a[2])
    return found


def _probe_values(dtype: np.dtype, extra: list) -> np.ndarray | None:
    """Probes of `dtype`: its special values, random ones, and the values in `extra`
    with their neighbours, where the dtype holds them."""
    values = _special_values(dtype)
    if values is None or dtype.kind == "b":
        return values
    near = [e + d for e in extra for d in (-1, 0, 1)
            if isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e)]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        near = [int(v) for v in near if float(v).is_integer() and info.min <= v <= info.max]
    with np.errstate(all="ignore"):
        return np.concatenate([values, np.array(near, dtype)]) if near else values


@functools.lru_cache(maxsize=None)
def _special_values(dtype: np.dtype) -> np.ndarray | None:
    if dtype.kind == "b":
        return np.array([False, True])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        vals = {0, 1, 2, 3, 7, 100, info.max, info.max - 1, info.min}
        if dtype.kind == "i":
            vals |= {-1, -3, info.min + 1}
        return np.array(sorted(vals), dtype)
    if dtype.kind == "f":
        info = np.finfo(dtype)
        rng = np.random.default_rng(0)
        special = [0.0, -0.0, 1.0, -1.0, 0.5, -1.5, 3.0, 0.1, 7.25, float(info.max), -float(info.max),
                   float(info.tiny), -float(info.tiny), float(info.smallest_subnormal),
                   math.inf, -math.inf, math.nan]
        with np.errstate(all="ignore"):
            return np.concatenate([np.array(special, dtype),
                                   (rng.standard_normal(8) * 10.0 ** rng.integers(-3, 4, 8)).astype(dtype)])
    return None


def _probe_columns(dtypes: tuple, extra: list) -> list | None:
    """One 1-D probe array per leaf: every combination of the leaves' probe values, or
    MAX_PROBES random combinations when there are more."""
    values = [_probe_values(np.dtype(d), extra) for d in dtypes]
    if any(v is None for v in values):
        return None
    total = math.prod(len(v) for v in values)
    if total <= MAX_PROBES:
        rows = np.indices([len(v) for v in values]).reshape(len(values), total).T
    else:
        rng = np.random.default_rng(0)
        rows = np.stack([rng.integers(0, len(v), MAX_PROBES) for v in values], axis=1)
    return [v[rows[:, j]] for j, v in enumerate(values)]
