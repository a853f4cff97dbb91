"""Deciding, exactly, that a sympy expression is zero (`decide_zero`).

Why a procedure of its own: sympy.simplify is slow and may give up, and a floating
point comparison proves nothing. Here every function application (exp, Max,
Heaviside, ...) and radical becomes a free unknown and the difference is tested as
a polynomial or rational function (sound: an identity in free unknowns holds for
any values); failing that, it is evaluated exactly at random rational points.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

import sympy
from sympy.codegen.cfunctions import expm1, log1p
from sympy.polys.domains import QQ
from sympy.polys.polyerrors import BasePolynomialError, CoercionFailed, NotAlgebraic
from sympy.polys.rings import PolyRing

__all__ = ["DEFAULT_POINTS", "Proof", "decide_zero", "substitute"]

DEFAULT_POINTS = 20

@dataclass(frozen=True)
class Proof:
    """The outcome of `decide_zero`: ok, and how ("simplified" or "rational points")."""
    ok: bool
    method: str                # "simplified", "rational points" or "failed"
    points: int = 0
    detail: str = ""


_OPAQUE = (sympy.Function, sympy.Max, sympy.Min)
# C's accurate spellings of elementary functions (an impl_expr may use them): proved as
# what they stand for, log1p(u) = log(1 + u), expm1(u) = exp(u) - 1.
_C_FORMS = (log1p, expm1)


def _elementary(expr: sympy.Expr) -> sympy.Expr:
    """`expr` with each of `_C_FORMS` written in the elementary functions it stands for."""
    reps = {a: sympy.expand_func(a) for a in expr.atoms(*_C_FORMS)}
    return expr.xreplace(reps) if reps else expr


def _atomize(expr: sympy.Expr, keep: frozenset = frozenset()) -> sympy.Expr:
    """Replace each function application (exp(..), Max(..), Heaviside(..), ...) by a
    fresh unknown; equal applications get the same unknown. A rational identity that
    holds with free unknowns holds for their true values, so zero here proves zero.
    Applications that contain a symbol of `keep` are left in place.

    exp(c * u), for a rational c and a primitive u (sympy's `as_content_primitive`),
    becomes B_u ** (c * L_u), B_u standing for exp(u / L_u): sympy writes exp(u)**2 as
    exp(2*u) with the 2 distributed into u, and both must meet as powers of one unknown."""
    atoms = [a for a in expr.atoms(*_OPAQUE) if not (keep and a.free_symbols & keep)]
    if not atoms:
        return expr
    reps: dict = {}
    exps: dict = {}
    for a in atoms:
        if isinstance(a, sympy.exp):
            c, u = a.args[0].as_content_primitive()
            if u.could_extract_minus_sign():
                c, u = -c, -u
            if c.is_Rational:
                exps[a] = (c, u)
                continue
        reps[a] = sympy.Dummy("a")
    lcm: dict = {}
    for c, u in exps.values():
        lcm[u] = math.lcm(lcm.get(u, 1), int(c.q))
    base = {u: sympy.Dummy("e") for u in lcm}
    for a, (c, u) in exps.items():
        reps[a] = base[u] ** int(c * lcm[u])
    return expr.xreplace(reps)


def _exp_bases(expr: sympy.Expr, numeric: bool) -> sympy.Expr:
    """Rewrite every exp(sum of c_k * m_k) as prod B_m ** (c_k * L_m), with B_m an
    unknown standing for exp(m / L_m) and L_m the lcm of the denominators of the
    rational c_k met with m. Hyperbolic functions are first written with exp.

    Why: exp(x - M), exp(x) and exp(-M) then share unknowns, so identities that need
    exp(a + b) = exp(a) exp(b) become rational identities (sigmoid's tanh form, for
    one). At a numeric point (numeric=True) the same is done to exp(1/3), E, ..."""
    hyper = {a: a.rewrite(sympy.exp) for a in expr.atoms(sympy.tanh, sympy.sinh, sympy.cosh)}
    if hyper:
        expr = expr.xreplace(hyper)
    if numeric and expr.has(sympy.E):
        expr = expr.xreplace({sympy.E: sympy.exp(1, evaluate=False)})
    exps = [e for e in expr.atoms(sympy.exp)]
    if not exps:
        return expr
    terms: dict[sympy.Expr, list[tuple[sympy.Rational, sympy.Expr]]] = {}
    lcm: dict[sympy.Expr, int] = {}
    for e in exps:
        parts = []
        for t in sympy.Add.make_args(sympy.expand(e.args[0])):
            c, m = t.as_coeff_Mul()
            if not c.is_Rational:
                c, m = sympy.Integer(1), t
            parts.append((c, m))
            lcm[m] = math.lcm(lcm.get(m, 1), int(c.q))
        terms[e] = parts
    base = {m: sympy.Dummy("E") for m in lcm}
    reps = {e: sympy.Mul(*[base[m] ** int(c * lcm[m]) for c, m in parts])
            for e, parts in terms.items()}
    return expr.xreplace(reps)


def _polynomial_zero(expr: sympy.Expr) -> bool:
    """Whether `expr` is the zero polynomial once each power with a negative or
    fractional exponent (sqrt(2), (v + eps)**(-1/2), 1/sum(...)) is written as a power
    of an unknown of its own (b**(n/L) -> r_b**n, b**(-n/L) -> i_b**n). Sound, since
    an identity between polynomials in free unknowns survives any substitution; and
    fast, as sparse polynomial arithmetic needs no gcd."""
    groups: dict = {}
    for p in expr.atoms(sympy.Pow):
        e = p.exp
        if e.is_Integer and e > 0:
            continue
        if not e.is_Rational:
            return False
        groups.setdefault(p.base, []).append((p, e))
    reps: dict = {}
    for b, powers in groups.items():
        lcm = math.lcm(*[int(e.q) for _, e in powers])
        up, down = sympy.Dummy("r"), sympy.Dummy("i")
        for p, e in powers:
            n = int(e * lcm)
            reps[p] = up ** n if n > 0 else down ** (-n)
    poly = expr.xreplace(reps) if reps else expr
    gens = sorted(poly.free_symbols, key=sympy.default_sort_key)
    if not gens:
        return poly == 0
    try:
        ring = PolyRing(gens, QQ)
        return ring(poly) == 0
    except (BasePolynomialError, CoercionFailed, TypeError, ValueError):
        return False


_CANCEL_LIMIT = 300           # count_ops above which sympy.cancel is not attempted
_EXP_REWRITE_LIMIT = 300      # count_ops above which the exp-normalised attempt is skipped


def _rational_zero(expr: sympy.Expr, expand_limit: int = 0) -> bool:
    """Whether `expr` is 0 as a polynomial (above) or, if it is not too large, as a
    rational function (sympy.cancel, then for small results the numerator expanded
    at the Expr level, where sqrt(2)*sqrt(2) is 2)."""
    if expr == 0 or _polynomial_zero(expr):
        return True
    if sympy.count_ops(expr) > _CANCEL_LIMIT:
        return False
    c = sympy.cancel(expr)
    if c == 0:
        return True
    if sympy.count_ops(c) <= expand_limit:
        num, _ = sympy.fraction(sympy.together(c))
        return sympy.expand(num) == 0
    return False


def _simplifies_to_zero(expr: sympy.Expr, parts: list[sympy.Expr]) -> bool:
    """Symbolic proof that `expr` is 0: each of `parts` (the atomized expression, or
    its coefficients from `_components`) is 0 as a rational function; failing that,
    for small expressions, once more with exponentials split over common bases."""
    if all(_rational_zero(p) for p in parts):
        return True
    if sympy.count_ops(expr) > _EXP_REWRITE_LIMIT:
        return False
    expr = sympy.expand_log(expr)           # log(p*q) = log(p) + log(q) where assumptions allow
    return _rational_zero(_atomize(_exp_bases(expr, numeric=False)), 400)


def _log_primes(value: sympy.Expr) -> sympy.Expr:
    """Write each log(r), r a positive rational, as sum e_p * log(p) over the primes of r
    (each log(p) an unknown): exact, and it makes identities like log(r**2) = 2 log(r)
    rational ones."""
    reps: dict = {}
    primes: dict = {}
    for a in value.atoms(sympy.log):
        r = a.args[0]
        if not (r.is_Rational and r > 0):
            continue
        total = sympy.Integer(0)
        for sign, n in ((1, r.p), (-1, r.q)):
            for prime, e in sympy.factorint(n).items():
                total += sign * e * primes.setdefault(prime, sympy.Dummy(f"log{prime}"))
        reps[a] = total
    return value.xreplace(reps) if reps else value


def _affine_in(expr: sympy.Expr, vs: frozenset) -> bool:
    """Whether `expr` is, syntactically, an affine function of the symbols `vs`: they
    occur only as sums of terms with at most one factor of degree one in them (and in
    the branches of a Piecewise whose conditions do not contain them)."""
    memo: dict = {}

    def deg(e: sympy.Basic) -> int | None:      # 0, 1, or None (not affine)
        if e in memo:
            return memo[e]
        if e in vs:
            r: int | None = 1
        elif not (e.free_symbols & vs):
            r = 0
        elif e.is_Add:
            ds = [deg(a) for a in e.args]
            r = None if None in ds else max(ds)
        elif e.is_Mul:
            ds = [deg(a) for a in e.args]
            r = None if None in ds or sum(ds) > 1 else sum(ds)
        elif isinstance(e, sympy.Piecewise):
            ok = all(not (c.free_symbols & vs) for _, c in e.args)
            ds = [deg(a) for a, _ in e.args]
            r = max(ds) if ok and None not in ds else None
        else:
            r = None
        memo[e] = r
        return r

    return deg(expr) is not None


def _components(expr: sympy.Expr, vs: Sequence[sympy.Symbol]) -> tuple[sympy.Expr, list]:
    """The atomized `expr` and the pieces whose vanishing proves it 0.

    For `expr` (syntactically) affine in the symbols `vs`, the pieces are the atomized
    expr(v=0) and expr(v=e_i): expr = c0 + sum v_i c_i is 0 exactly when they all are.
    Why: a gradient compared with a symbolic cotangent is linear in it, and proving it
    one Jacobian row at a time is much cheaper for sympy than the whole. Otherwise the
    one piece is the atomized expression itself."""
    vset = frozenset(vs)
    atomized = _atomize(expr, keep=vset)
    if not vs or not _affine_in(atomized, vset):
        atomized = _atomize(expr) if vs else atomized
        return atomized, [atomized]
    free = atomized.free_symbols
    zero = {v: sympy.Integer(0) for v in vs}
    parts = [substitute(atomized, zero)]
    for v in vs:
        if v in free:
            parts.append(substitute(atomized, {**zero, v: sympy.Integer(1)}))
    return atomized, parts


def _clearly_nonzero(value: sympy.Expr) -> bool:
    """A constant that evaluates, with guaranteed relative precision (sympy's strict
    evalf), to a nonzero number. An exact 0 that sympy does not see as 0 cannot be
    evaluated to any precision: that raises, and the answer is False (undecided)."""
    try:
        if not sympy.N(value, 15).is_Number:
            return False
        return value.evalf(30, strict=True, maxn=400) != 0
    except (sympy.core.evalf.PrecisionExhausted, TypeError, ValueError, ArithmeticError):
        return False


def _algebraic_zero(value: sympy.Expr) -> bool | None:
    """Exact zero test of a constant without transcendental parts (rationals and
    radicals): by its minimal polynomial. None when it is not algebraic."""
    if value == 0:
        return True
    if value.is_Rational or _clearly_nonzero(value):
        return False
    if sympy.expand(value) == 0:
        return True
    try:
        z = sympy.Dummy("z")
        return sympy.minimal_polynomial(value, z) == z
    except (NotAlgebraic, BasePolynomialError, RuntimeError, ValueError, TypeError):
        return None


def _constant_is_zero(value: sympy.Expr) -> bool | None:
    """Exact zero test of a constant: True, False, or None (could not decide).
    Nonzero: strict evaluation with guaranteed precision. Zero: exact algebra, with
    exponentials written over common bases exp(1/L), exp(sqrt(n)/L) as unknowns."""
    if value == 0:
        return True
    if value.is_Rational or _clearly_nonzero(value):
        return False
    reduced = _atomize(_exp_bases(_log_primes(value), numeric=True))
    if not reduced.free_symbols:
        return _algebraic_zero(reduced)
    if _rational_zero(reduced, 10 ** 6):
        return True
    return None


def _random_value(rng: random.Random, positive: bool) -> sympy.Rational:
    """A random nonzero rational p/q with q <= 9 and |p/q| <= 4 (positive if asked)."""
    q = rng.randint(1, 9)
    p = rng.randint(1, 4 * q)
    return sympy.Rational(p if positive else rng.choice([-1, 1]) * p, q)


def _random_point(syms: Sequence[sympy.Symbol], rng: random.Random) -> dict:
    """Nonzero random rationals, positive for positive symbols and distinct as far as
    the draws allow: no zeros or ties, which is where kink conventions (relu'(0), Max
    ties) live."""
    point: dict = {}
    used: set = set()
    for s in syms:
        positive = bool(s.is_positive)
        v = _random_value(rng, positive)
        for _ in range(50):
            if v not in used:
                break
            v = _random_value(rng, positive)
        used.add(v)
        point[s] = v
    return point


def substitute(expr: sympy.Expr, point: dict) -> sympy.Expr:
    """`expr` with symbols replaced by numbers, evaluating each distinct subexpression
    once (gradients repeat the same exp(...) and Max(...) many times; plain xreplace
    would evaluate every occurrence)."""
    memo: dict = dict(point)

    def walk(e: sympy.Basic) -> sympy.Basic:
        hit = memo.get(e)
        if hit is not None:
            return hit
        if not e.args or not e.free_symbols:
            out = e
        else:
            out = e.func(*[walk(a) for a in e.args])
        memo[e] = out
        return out

    return walk(expr)


def _finite(v: sympy.Expr) -> bool:
    return not v.has(sympy.nan, sympy.zoo, sympy.oo, -sympy.oo)


def _fmt_point(point: dict) -> str:
    return ", ".join(f"{s}={v}" for s, v in point.items())


def _points_on_atoms(atomized: sympy.Expr, points: int, rng: random.Random) -> bool:
    """Whether the atomized expression (function applications as free unknowns) is
    exactly 0 at `points` random rational points: a Schwartz-Zippel test of the
    rational identity, in exact arithmetic."""
    syms = sorted(atomized.free_symbols, key=sympy.default_sort_key)
    passed = tries = 0
    while passed < points:
        tries += 1
        if tries > 5 * points:
            return False
        value = substitute(atomized, _random_point(syms, rng))
        if not _finite(value):
            continue
        if _algebraic_zero(value) is not True:
            return False
        passed += 1
    return True


def decide_zero(expr: Any, points: int = DEFAULT_POINTS, seed: int = 0,
                linear: Sequence[sympy.Symbol] = ()) -> Proof:
    """Prove `expr` == 0 exactly: by simplification, else at `points` random rational
    points. Returns a failing Proof with the point and value where it is not 0.

    Order: (1) symbolic: the difference, with each function application (exp, Max,
    Heaviside, ...) an unknown, is the zero polynomial or rational function, checked
    one cotangent coefficient at a time when it is linear in `linear`; (2) points on
    that atomized form, unknowns included (Schwartz-Zippel); (3) points of the inputs
    only, every function evaluated exactly. (2) and (3) report "rational points"."""
    expr = _elementary(sympy.sympify(expr))
    if expr == 0:
        return Proof(True, "simplified", 0, "identical")
    atomized, parts = _components(expr, linear)
    if _simplifies_to_zero(expr, parts):
        return Proof(True, "simplified")
    rng = random.Random(seed)
    if _points_on_atoms(atomized, points, rng):
        return Proof(True, "rational points", points,
                     "function applications taken as free unknowns")
    syms = sorted(expr.free_symbols, key=sympy.default_sort_key)
    passed, tries = 0, 0
    while passed < points:
        tries += 1
        if tries > 5 * points:
            return Proof(False, "failed", passed,
                         f"undefined at most random points (only {passed} usable)")
        point = _random_point(syms, rng)
        value = substitute(expr, point)
        if not _finite(value):
            continue
        zero = _constant_is_zero(value)
        if zero is None:
            return Proof(False, "failed", passed,
                         f"could not decide whether {value} (at {_fmt_point(point)}) is 0")
        if not zero:
            return Proof(False, "failed", passed,
                         f"nonzero at {_fmt_point(point)}: value {sympy.N(value, 6)}")
        passed += 1
    return Proof(True, "rational points", passed, "points of the inputs")

