"""sympy expression -> function of ops.

Derivatives of elementwise specs come out of `sympy.diff` as expressions; this
module turns them back into calls of registered ops, so the backward pass is a
graph of ops like any other (it traces, differentiates again and runs on every
backend). Sub-expressions whose values are Python numbers at run time are folded
in Python, and trivial powers are simplified (x**1 -> x, x**0.5 -> sqrt). A
Piecewise becomes `where` ops over comparisons (a branch whose condition Python
numbers decide is picked or dropped without one).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence

import numpy as np
import sympy

from .spec import REGISTRY

_FUNCTIONS = {
    sympy.exp: "exp", sympy.log: "log", sympy.tanh: "tanh", sympy.erf: "erf",
    sympy.Abs: "abs", sympy.sign: "sign", sympy.Heaviside: "heaviside",
    sympy.Max: "maximum", sympy.Min: "minimum",
}
_RELATIONS = {                 # comparisons and logic: bool-valued ops, a Piecewise's conditions
    sympy.Eq: "eq", sympy.Ne: "ne", sympy.StrictLessThan: "lt", sympy.LessThan: "le",
    sympy.StrictGreaterThan: "gt", sympy.GreaterThan: "ge",
    sympy.And: "logical_and", sympy.Or: "logical_or", sympy.Not: "logical_not",
}
_PY = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "pow": lambda a, b: a ** b, "neg": lambda a: -a,
    "exp": math.exp, "log": math.log, "tanh": math.tanh, "erf": math.erf,
    "sqrt": math.sqrt, "rsqrt": lambda a: 1.0 / math.sqrt(a), "abs": abs,
    "sign": lambda a: float((a > 0) - (a < 0)),
    "heaviside": lambda a, h: 1.0 if a > 0 else (h if a == 0 else 0.0),
    "maximum": max, "minimum": min,
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
    "logical_and": lambda a, b: bool(a and b), "logical_or": lambda a, b: bool(a or b),
    "logical_not": lambda a: not a,
}


# The same functions with IEEE results (inf, nan) where Python raises (0.0 ** -1, log(0),
# exp(1000)) or leaves the reals ((-8.0) ** (1/3)), and NaN propagated by max/min as the
# engine's maximum/minimum do.
_IEEE = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "pow": np.power,
    "neg": np.negative, "exp": np.exp, "log": np.log, "tanh": np.tanh, "erf": math.erf,
    "sqrt": np.sqrt, "rsqrt": lambda a: 1.0 / np.sqrt(a), "abs": np.abs, "sign": np.sign,
    "heaviside": np.heaviside, "maximum": np.maximum, "minimum": np.minimum,
    "eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
    "ge": np.greater_equal, "logical_and": np.logical_and, "logical_or": np.logical_or,
    "logical_not": np.logical_not,
}


def _fold(name: str, args: Sequence[Any]) -> Any:
    """`name` applied to Python numbers: exact Python arithmetic where it gives a real
    number (ints stay ints), else the IEEE value a tensor of these numbers would give."""
    if not any(a != a for a in args):
        try:
            r = _PY[name](*args)
        except (ZeroDivisionError, ValueError, OverflowError):
            r = None
        if r is not None and not isinstance(r, complex):
            return r
    with np.errstate(all="ignore"):
        r = _IEEE[name](*(np.float64(a) for a in args))
    return bool(r) if isinstance(r, np.bool_) else float(r)    # a comparison stays a truth value


_number_types: dict[type, bool] = {int: True, float: True, bool: True}


def _is_number(v: Any) -> bool:
    """Python/NumPy number (not a tensor); cached per type because the ABC check is slow."""
    t = type(v)
    known = _number_types.get(t)
    if known is None:
        known = _number_types[t] = isinstance(v, numbers.Number) and not hasattr(v, "_data")
    return known


def call(name: str, *args: Any) -> Any:
    """Apply op `name`, folding Python numbers and trivial cases without an op."""
    numeric = [_is_number(a) for a in args]
    if all(numeric):
        return _fold(name, args)
    if name == "mul":
        a, b = args
        if _is_number(a) and a == 1:
            return b
        if _is_number(b) and b == 1:
            return a
        if _is_number(a) and a == -1:
            return REGISTRY["neg"](b)
        if _is_number(b) and b == -1:
            return REGISTRY["neg"](a)
    elif name == "add":
        a, b = args
        if _is_number(a) and a == 0:
            return b
        if _is_number(b) and b == 0:
            return a
    elif name in ("logical_and", "logical_or"):
        # a known truth value decides the op, or leaves the other operand to decide it
        for known, other in ((args[0], args[1]), (args[1], args[0])):
            if _is_number(known):
                return other if bool(known) == (name == "logical_and") else bool(known)
    elif name == "pow" and _is_number(args[1]):
        base, e = args
        if e == 1:
            return base
        if e == 0.5:
            return REGISTRY["sqrt"](base)
        if e == -0.5:
            return REGISTRY["rsqrt"](base)
        if e == -1:
            return REGISTRY["div"](1.0, base)
    return REGISTRY[name](*args)


def _number(expr: sympy.Expr) -> float | int:
    if expr.is_Integer:
        return int(expr)
    return float(expr)


def _select(branches: list[tuple[Callable, Callable]], expr: sympy.Piecewise) -> Callable[[tuple], Any]:
    """A Piecewise as `where` ops: the first branch whose condition holds. Conditions
    that fold to Python truth values pick or drop their branch without an op, so
    pow's gradient with a Python-number exponent is the plain formula."""
    if expr.args[-1][1] is not sympy.true:
        raise ValueError(f"cannot turn {expr} into ops: it is undefined where no condition holds")

    def select(v: tuple) -> Any:
        pending = []                            # (tensor condition, value) still to select over
        for value, cond in branches:
            c = cond(v)
            if _is_number(c):
                if c:
                    break
                continue
            pending.append((c, value(v)))
        acc = value(v)                          # the first branch that surely holds
        for c, x in reversed(pending):
            acc = call("where", c, x, acc)
        return acc
    return select


def build(expr: sympy.Expr, symbols: Sequence[sympy.Symbol]) -> Callable[..., Any]:
    """A function f(*values) computing `expr` with `symbols` bound to `values`."""
    position = {s: i for i, s in enumerate(symbols)}

    def walk(e: sympy.Expr) -> Callable[[tuple], Any]:
        if e.is_Symbol:
            i = position[e]
            return lambda v: v[i]
        if e.is_Number or e.is_NumberSymbol:
            c = _number(e)
            return lambda v: c
        if e.is_Add:
            pos, neg = [], []
            for t in e.args:
                coeff, rest = t.as_coeff_Mul()
                (neg if coeff.is_negative else pos).append(-t if coeff.is_negative else t)
            terms_pos = [walk(t) for t in pos] or [lambda v: 0]
            terms_neg = [walk(t) for t in neg]

            def add(v: tuple) -> Any:
                acc = terms_pos[0](v)
                for f in terms_pos[1:]:
                    acc = call("add", acc, f(v))
                for f in terms_neg:
                    acc = call("sub", acc, f(v))
                return acc
            return add
        if e.is_Mul:
            num, den = [], []
            for f in e.args:
                b, ex = f.as_base_exp()
                if ex.is_Number and ex.is_negative:
                    den.append(b ** -ex)
                else:
                    num.append(f)
            fnum = [walk(f) for f in num] or [lambda v: 1]
            fden = [walk(f) for f in den]

            def mul(v: tuple) -> Any:
                acc = fnum[0](v)
                for f in fnum[1:]:
                    acc = call("mul", acc, f(v))
                if fden:
                    d = fden[0](v)
                    for f in fden[1:]:
                        d = call("mul", d, f(v))
                    acc = call("div", acc, d)
                return acc
            return mul
        if e.is_Pow:
            fb, fe = walk(e.base), walk(e.exp)
            return lambda v: call("pow", fb(v), fe(v))
        if e is sympy.true or e is sympy.false:
            t = bool(e)
            return lambda v: t
        if isinstance(e, sympy.Piecewise):
            return _select([(walk(x), walk(c)) for x, c in e.args], e)
        if isinstance(e, (sympy.And, sympy.Or)) and len(e.args) > 2:
            first, rest = e.args[0], e.func(*e.args[1:], evaluate=False)
            fa, fb = walk(first), walk(rest)
            name = _RELATIONS[e.func]
            return lambda v: call(name, fa(v), fb(v))
        if e.func in _FUNCTIONS or e.func in _RELATIONS:
            name = _FUNCTIONS.get(e.func) or _RELATIONS[e.func]
            fargs = [walk(a) for a in e.args]
            if name == "heaviside" and len(fargs) == 1:
                raise ValueError("Heaviside needs its value at 0 stated: Heaviside(x, h0)")
            return lambda v: call(name, *(f(v) for f in fargs))
        raise ValueError(f"cannot turn {e} ({e.func}) into ops")

    f = walk(sympy.sympify(expr))
    return lambda *values: f(values)
