"""Symbolic verification: prove the engine's gradients with sympy.

The engine's eager interpreter runs unchanged on the symbolic backend
(`backends.symbolic`), whose arrays hold sympy expressions. `verify_gradients`
makes a matrix of symbols per input and one for the output's cotangent, runs the
function *and the engine's own backward* on them, differentiates the symbolic
forward with `sympy.diff`, and compares the two element by element (and with a
hand-derived closed form, when one is given). What is proved is the code the engine
runs, not a second hand derivation.

Every comparison is exact (`decide_zero`); the report says, per element, which of
these held:
- "simplified": the difference is 0 as a polynomial or rational function once each
  function application (exp(..), Max(..), Heaviside(..)) and each radical is taken as
  a free unknown. Sound: an identity in free unknowns holds whatever values they
  take. A difference linear in the cotangent is proved one coefficient at a time.
- "rational points": the difference is exactly 0 at 20 random rational points, in
  exact arithmetic: first with the function applications as free unknowns too
  (a Schwartz-Zippel test of the same rational identity), else at points of the
  inputs only, every function evaluated exactly (exponentials of rationals kept as
  exact powers of common bases; nonzero values shown by guaranteed-precision evalf).

The max shift of a stable softmax is proved to cancel (the forward's derivative in
each row max is 0), then held constant, which is what the engine's stop_gradient
does. On a mismatch, each op of the graph has its VJP checked on its own, so the
report names the op and the element that are wrong.

`python -m engine.symbolic --write docs/derivations.md` regenerates the derivations
document from the verified cases (see `case_keys`).
"""
from __future__ import annotations

import argparse
import functools
import math
import random
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import sympy
from sympy.polys.domains import QQ
from sympy.polys.polyerrors import BasePolynomialError, CoercionFailed, NotAlgebraic
from sympy.polys.rings import PolyRing

import ops
from backends import get_backend
from backends.symbolic import SymArray
from ops.errors import GradError

from .autograd import grad as _autograd_grad
from .dispatch import Edge, Node
from .state import keep_graph_inputs
from .tensor import Tensor

__all__ = ["verify_gradients", "verify_elementwise_spec", "elementwise_engine_check",
           "GradientReport", "SpecReport", "ElementCheck", "GradientMismatch", "decide_zero",
           "Proof", "symbols", "symbolic_tensor", "constant", "case_keys", "case_report",
           "DERIVATIONS", "render_derivations", "main"]

DEFAULT_POINTS = 20


# -- symbols and tensors on the symbolic backend ------------------------------------------------

def symbols(name: str, shape: Sequence[int], positive: bool = False) -> np.ndarray:
    """An object array of real symbols `name_{i,j}` (0-based indices, as NumPy's)."""
    shape = tuple(shape)
    out = np.empty(shape, dtype=object)
    for idx in np.ndindex(*shape):
        label = f"{name}_{{{','.join(str(i) for i in idx)}}}" if idx else name
        out[idx] = sympy.Symbol(label, real=True, positive=True) if positive else \
            sympy.Symbol(label, real=True)
    return out


def symbolic_tensor(data: Any, requires_grad: bool = True, dtype: Any = np.float64) -> Tensor:
    """A tensor on the symbolic backend holding `data` (an object array of sympy
    expressions, or anything NumPy can hold); float64 nominally so it can require grad."""
    be = get_backend("symbolic")
    raw = data if isinstance(data, SymArray) else be.asarray(np.asarray(data, dtype=object),
                                                             np.dtype(dtype))
    return Tensor(raw, be, requires_grad=requires_grad)


def constant(data: Any) -> Tensor:
    """A tensor on the symbolic backend that keeps `data`'s dtype (masks, class
    indices) and never requires grad."""
    be = get_backend("symbolic")
    return Tensor(be.asarray(np.asarray(data)), be)


# -- deciding that an expression is zero -------------------------------------------------------

@dataclass(frozen=True)
class Proof:
    """The outcome of `decide_zero`: ok, and how ("simplified" or "rational points")."""
    ok: bool
    method: str                # "simplified", "rational points" or "failed"
    points: int = 0
    detail: str = ""


_OPAQUE = (sympy.Function, sympy.Max, sympy.Min)


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
    parts = [_substitute(atomized, zero)]
    for v in vs:
        if v in free:
            parts.append(_substitute(atomized, {**zero, v: sympy.Integer(1)}))
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


def _substitute(expr: sympy.Expr, point: dict) -> sympy.Expr:
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
        value = _substitute(atomized, _random_point(syms, rng))
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
    expr = sympy.sympify(expr)
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
        value = _substitute(expr, point)
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


# -- reports --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ElementCheck:
    """One element of one input's gradient, compared with one reference."""
    input: str
    index: tuple
    against: str               # "sympy.diff" or "closed form"
    proof: Proof

    @property
    def ok(self) -> bool:
        return self.proof.ok

    def describe(self) -> str:
        where = f"{self.input}[{', '.join(map(str, self.index))}]" if self.index else self.input
        p = self.proof
        how = {"simplified": "difference simplifies to 0",
               "rational points": f"difference exactly 0 at {p.points} random rational points"
               }.get(p.method, f"MISMATCH: {p.detail}")
        return f"{where} vs {self.against}: {how}"


@dataclass
class GradientReport:
    """Per-element outcome of `verify_gradients`."""
    name: str
    shapes: dict[str, tuple]
    output_shape: tuple
    checks: list[ElementCheck] = field(default_factory=list)
    ops: tuple[str, ...] = ()            # ops whose VJPs the engine's backward ran
    suspects: list[str] = field(default_factory=list)   # ops whose own VJP fails its check
    notes: list[str] = field(default_factory=list)      # e.g. how the max shift was handled

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[ElementCheck]:
        return [c for c in self.checks if not c.ok]

    def count(self, method: str, against: str = "sympy.diff") -> int:
        return sum(1 for c in self.checks if c.proof.method == method and c.against == against)

    def shapes_text(self) -> str:
        ins = ", ".join(f"{k} {v}" for k, v in self.shapes.items())
        return f"{ins}; output {self.output_shape}"

    def summary(self) -> str:
        refs = [ref for ref in ("sympy.diff", "closed form")
                if any(c.against == ref for c in self.checks)]
        if self.ok:
            parts = []
            for ref in refs:
                n = sum(1 for c in self.checks if c.against == ref)
                parts.append(f"== {ref} at all {n} elements ({self.count('simplified', ref)} "
                             f"simplified to 0, {self.count('rational points', ref)} exactly 0 "
                             f"at random rational points)")
            return f"{self.name}: engine backward " + "; ".join(parts) + f" [{self.shapes_text()}]"
        bad = self.failures
        head = (f"{self.name}: the engine's backward differs from the reference at "
                f"{len(bad)} of {len(self.checks)} element checks [{self.shapes_text()}]; "
                f"first: {bad[0].describe()}")
        if self.suspects:
            head += "\n  ops whose own VJP fails its symbolic check:\n    " + \
                "\n    ".join(self.suspects)
        else:
            head += ("\n  every op's VJP passes its own check (ops involved: "
                     f"{', '.join(self.ops)}): the mismatch comes from how they are combined, "
                     f"e.g. a stop_gradient on a path that matters")
        return head

    def __str__(self) -> str:
        return "\n".join([self.summary()] + ["  note: " + n for n in self.notes] +
                         ["  " + c.describe() for c in self.checks])


class GradientMismatch(GradError):
    """The engine's backward disagrees with sympy; `.report` has the details."""

    def __init__(self, report: GradientReport) -> None:
        super().__init__(report.summary())
        self.report = report


# -- verification ---------------------------------------------------------------------------------

def _graph_nodes(out: Tensor) -> list[tuple[Tensor, Node]]:
    """The autograd nodes reachable from `out` (the VJPs its backward runs)."""
    seen, order, stack = set(), [], [out]
    while stack:
        t = stack.pop()
        node = t._ctx
        if not isinstance(node, Node) or node.inputs is None or id(node) in seen:
            continue
        seen.add(id(node))
        order.append((t, node))
        stack.extend(x for x in node.inputs if isinstance(x, (Tensor, Edge)) and x.requires_grad)
    return order


def _node_key(node: Node) -> tuple:
    shapes = tuple((tuple(x.shape), str(x.dtype), x.requires_grad) if isinstance(x, Tensor)
                   else ("scalar", repr(x)) for x in node.inputs)
    return node.op.name, shapes, repr(sorted(node.params.items(), key=lambda kv: kv[0]))


def _local_check(node: Node, points: int) -> str | None:
    """Check one op's VJP on its own: fresh symbols for the inputs that took a
    gradient, the other inputs as they were. Returns what fails, or None."""
    grad_pos = [i for i, x in enumerate(node.inputs) if isinstance(x, Tensor) and x.requires_grad]
    shapes = [tuple(node.inputs[i].shape) for i in grad_pos]
    names = [f"in{i}" for i in grad_pos]

    def call(*fresh: Tensor) -> Tensor:
        args = list(node.inputs)
        for i, t in zip(grad_pos, fresh):
            args[i] = t
        args = [a.detach() if isinstance(a, Tensor) and not any(a is f for f in fresh) else a
                for a in args]
        return node.op(*args, **node.params)

    report = verify_gradients(call, *shapes, names=names, points=points, name=node.op.name,
                              raise_on_failure=False, blame=False)
    bad = report.failures
    if not bad:
        return None
    shape_text = ", ".join(str(tuple(x.shape)) if isinstance(x, Tensor) else repr(x)
                           for x in node.inputs)
    where = ", ".join(f"{c.input}{list(c.index)}" for c in bad[:6])
    where += " ..." if len(bad) > 6 else ""
    return (f"{node.op.name} (inputs {shape_text}; params {node.params or 'none'}): "
            f"wrong gradient at {len(bad)} element(s): {where}; e.g. {bad[0].describe()}")


def _flat_items(arr: np.ndarray) -> Iterable[tuple[tuple, Any]]:
    for idx in np.ndindex(*arr.shape):
        yield idx, arr[idx]


def _xreplace_all(arr: np.ndarray, reps: dict) -> np.ndarray:
    if not reps:
        return arr
    out = np.empty(arr.shape, dtype=object)
    for idx, e in _flat_items(arr):
        out[idx] = sympy.sympify(e).xreplace(reps)
    return out


def _hold_maxima(loss: sympy.Expr, y: np.ndarray, points: int, seed: int,
                 linear: Sequence[sympy.Symbol], report: "GradientReport") -> dict:
    """The max shift of a stable softmax, proved to cancel, then held constant.

    Each Max(...)/Min(...) of the forward is replaced by a symbol mu_k. If the
    forward's derivative in every mu_k is proved 0 (the shift cancels), then by the
    chain rule d forward/dx = (d/dx with mu held) + sum_k 0 * d Max_k/dx, so
    sympy.diff may be taken with the maxima held: the same thing the engine's
    stop_gradient does, now justified. Returns {Max(...): mu_k}, or {} when there
    are no maxima or one of them does not cancel (then Max is differentiated)."""
    maxima = sorted(set().union(*[sympy.sympify(e).atoms(sympy.Max, sympy.Min)
                                  for e in y.reshape(-1)]), key=sympy.default_sort_key)
    if not maxima:
        return {}
    mu = {m: sympy.Symbol(f"mu_{{{k}}}", real=True) for k, m in enumerate(maxima)}
    held_loss = loss.xreplace(mu)
    proofs = [decide_zero(sympy.diff(held_loss, m), points, seed, linear) for m in mu.values()]
    if not all(p.ok for p in proofs):
        report.notes.append(f"{len(mu)} max/min of the forward do not cancel: sympy.diff "
                            f"differentiates through them")
        return {}
    how = sorted({p.method for p in proofs})
    report.notes.append(f"max shift: d(forward)/d(max) == 0 proved for the {len(mu)} maxima "
                        f"({' / '.join(how)}), so sympy.diff holds them constant")
    return mu


def verify_gradients(fn: Callable[..., Tensor], *shapes: Sequence[int],
                     names: Sequence[str] | None = None, positive: Sequence[bool] | bool = False,
                     cotangent: str | None = "g",
                     closed_form: Callable[..., Sequence] | None = None,
                     points: int = DEFAULT_POINTS, seed: int = 0, name: str | None = None,
                     raise_on_failure: bool = True, blame: bool = True) -> GradientReport:
    """Prove that the engine's backward of `fn` equals sympy.diff of its forward.

    fn: a function of one tensor per shape, returning one float tensor; it runs on
        the symbolic backend (create constants inside with `constant(...)`).
    names: symbol names of the inputs ("x0", "x1", ... by default).
    positive: make (all, or per input) the symbols positive (log, sqrt domains).
    cotangent: the output's cotangent is a matrix of symbols with this name, so the
        whole Jacobian is checked at once (J^T v is linear in v); None means ones
        (natural for a scalar loss).
    closed_form: optional f(inputs, out, v) -> one object array per input: a
        hand-derived gradient, also compared exactly with the engine's.
    Raises GradientMismatch (or returns a failing report) naming the elements and
    the ops whose own VJPs fail their check.
    """
    names = list(names) if names is not None else [f"x{i}" for i in range(len(shapes))]
    if len(names) != len(shapes):
        raise ValueError(f"verify_gradients: {len(shapes)} shapes but {len(names)} names")
    pos = [positive] * len(shapes) if isinstance(positive, bool) else list(positive)
    arrays = [symbols(n, s, p) for n, s, p in zip(names, shapes, pos)]
    inputs = [symbolic_tensor(a) for a in arrays]
    with keep_graph_inputs():          # _local_check re-runs each node on its inputs
        out = fn(*inputs)
    if not isinstance(out, Tensor) or out.device != "symbolic":
        raise TypeError("verify_gradients: fn must return one tensor computed from its inputs")
    y = out._data.data
    if cotangent is None:
        v = np.empty(out.shape, dtype=object)
        v.fill(sympy.Integer(1))
    else:
        v = symbols(cotangent, out.shape)
    linear = [] if cotangent is None else list(v.reshape(-1))
    report = GradientReport(name or getattr(fn, "__name__", "fn"),
                            {n: tuple(s) for n, s in zip(names, shapes)}, tuple(out.shape))
    if out.requires_grad:
        nodes = _graph_nodes(out)
        report.ops = tuple(sorted({n.op.name for _, n in nodes}))
        grads = _autograd_grad(out, inputs, grad_outputs=symbolic_tensor(v, requires_grad=False),
                               retain_graph=True, allow_unused=True)
    else:
        nodes, grads = [], [None] * len(inputs)
    engine = [np.full(a.shape, sympy.Integer(0), dtype=object) if g is None else g._data.data
              for a, g in zip(arrays, grads)]
    loss = sympy.Add(*[vi * yi for vi, yi in zip(v.reshape(-1), y.reshape(-1))])
    held = _hold_maxima(loss, y, points, seed, linear, report)
    if held:
        loss = loss.xreplace(held)
        engine = [_xreplace_all(e, held) for e in engine]
    for k, (nm, arr) in enumerate(zip(names, arrays)):
        for idx, s in _flat_items(arr):
            proof = decide_zero(engine[k][idx] - sympy.diff(loss, s), points, seed, linear)
            report.checks.append(ElementCheck(nm, idx, "sympy.diff", proof))
    if closed_form is not None:
        closed = closed_form(arrays, y, v)
        for k, (nm, arr) in enumerate(zip(names, arrays)):
            ref = _xreplace_all(np.asarray(closed[k], dtype=object), held)
            for idx, _ in _flat_items(arr):
                proof = decide_zero(engine[k][idx] - ref[idx], points, seed, linear)
                report.checks.append(ElementCheck(nm, idx, "closed form", proof))
    if not report.ok and blame:
        checked: set = set()
        for _, node in nodes:
            if any(isinstance(x, Edge) for x in node.inputs):
                continue               # recorded outside keep_graph_inputs: values not kept
            key = _node_key(node)
            if key not in checked:
                checked.add(key)
                found = _local_check(node, points)
                if found:
                    report.suspects.append(found)
    if not report.ok and raise_on_failure:
        raise GradientMismatch(report)
    return report


# -- elementwise specs ----------------------------------------------------------------------------

@dataclass
class SpecReport:
    """The identities of one elementwise spec, each with its proof."""
    op: str
    checks: list[tuple[str, Proof]]

    @property
    def ok(self) -> bool:
        return all(p.ok for _, p in self.checks)

    def __str__(self) -> str:
        return "\n".join(f"{self.op}: {what}: {p.method}" + (f" ({p.detail})" if p.detail else "")
                         for what, p in self.checks)


def _positive_inputs(op: Any) -> list[bool]:
    """Which inputs of an elementwise spec have the "positive" domain (the domain is
    one name for all inputs or a tuple with one per input)."""
    dom = op.domain if isinstance(op.domain, tuple) else (op.domain,) * op.nin
    return [d == "positive" for d in dom]


def _domain_symbols(op: Any) -> dict:
    """The spec's symbols with the assumptions of its input domain."""
    return {s: sympy.Symbol(s.name, positive=True)
            for s, pos in zip(op.symbols, _positive_inputs(op)) if pos}


def verify_elementwise_spec(op: Any, points: int = DEFAULT_POINTS) -> SpecReport:
    """Prove an elementwise spec's own identities: each declared gradient (with `out`
    replaced by the expression) equals sympy.diff of the expression, and the
    implementation expression equals the expression."""
    from ops.elementwise import OUT
    dom = _domain_symbols(op)
    expr = op.expr.xreplace(dom)
    checks = []
    for i, (g, d) in enumerate(zip(op.grads, op.derived_grads)):
        stated = g.xreplace(dom).xreplace({OUT: expr})
        checks.append((f"grad[{i}] == sympy.diff(expr, {op.symbols[i]})",
                       decide_zero(stated - d.xreplace(dom), points)))
    checks.append(("impl_expr == expr", decide_zero(op.impl_expr.xreplace(dom) - expr, points)))
    return SpecReport(op.name, checks)


def elementwise_engine_check(op: Any, shapes: Sequence[Sequence[int]],
                             points: int = DEFAULT_POINTS) -> GradientReport:
    """The engine's backward of one elementwise op on the symbolic backend vs sympy.diff."""
    return verify_gradients(lambda *xs: op(*xs), *shapes,
                            names=[f"{s.name}" for s in op.symbols],
                            positive=_positive_inputs(op), points=points, name=op.name,
                            raise_on_failure=False)


# -- closed forms (hand derivations, in sympy, compared exactly with the engine) -----------------

def _rows(a: np.ndarray) -> Iterable[tuple]:
    """Indices of the rows (all leading axes) of `a`."""
    return np.ndindex(*a.shape[:-1])


def _stable_softmax(s: np.ndarray) -> np.ndarray:
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


def _softmax_jvp(arrays: list, y: np.ndarray, v: np.ndarray) -> list:
    """J^T v with J = diag(p) - p p^T, row by row."""
    (x,) = arrays
    p = _stable_softmax(x)
    out = np.empty(x.shape, dtype=object)
    for r in _rows(x):
        pc = sympy.Matrix(list(p[r]))
        jac = sympy.diag(*list(p[r])) - pc * pc.T
        out[r] = list(jac.T * sympy.Matrix(list(v[r])))
    return [out]


def _log_softmax_closed(arrays: list, y: np.ndarray, v: np.ndarray) -> list:
    """d log_softmax: v - p * sum(v)."""
    (x,) = arrays
    p = _stable_softmax(x)
    out = np.empty(x.shape, dtype=object)
    for r in _rows(x):
        total = sympy.Add(*v[r])
        out[r] = [vi - pi * total for vi, pi in zip(v[r], p[r])]
    return [out]


def _logsumexp_closed(arrays: list, y: np.ndarray, v: np.ndarray) -> list:
    """d logsumexp: p * v."""
    (x,) = arrays
    p = _stable_softmax(x)
    out = np.empty(x.shape, dtype=object)
    for r in _rows(x):
        out[r] = [pi * v[r] for pi in p[r]]
    return [out]


def _cross_entropy_closed(targets: np.ndarray, smoothing: sympy.Rational) -> Callable:
    """d mean cross-entropy: (softmax - ((1 - s) onehot + s / C)) / rows."""
    def closed(arrays: list, y: np.ndarray, v: np.ndarray) -> list:
        (x,) = arrays
        p = _stable_softmax(x)
        classes, rows = x.shape[-1], int(np.prod(x.shape[:-1]))
        out = np.empty(x.shape, dtype=object)
        for r in _rows(x):
            for c in range(classes):
                target = (1 - smoothing) * (1 if targets[r] == c else 0) + smoothing / classes
                out[r + (c,)] = v[()] * (p[r + (c,)] - target) / rows
        return [out]
    return closed


def _layer_norm_closed(eps: sympy.Rational) -> Callable:
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


def _attention_closed_parts(q: np.ndarray, k: np.ndarray, v: np.ndarray, do: np.ndarray,
                            mask: np.ndarray | None) -> tuple:
    """The closed forms of attention: S = Q K^T / sqrt(d), P = softmax(S), O = P V;
    dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)), dQ = dS K / sqrt(d),
    dK = dS^T Q / sqrt(d)."""
    scale = 1 / sympy.sqrt(q.shape[-1])
    s = np.matmul(q, k.T) * scale
    if mask is not None:
        s = np.where(mask, s, -sympy.oo)
    p = _stable_softmax(s)
    dv = np.matmul(p.T, do)
    dp = np.matmul(do, v.T)
    rowsum = (dp * p).sum(axis=-1, keepdims=True)
    ds = p * (dp - rowsum)
    return np.matmul(ds, k) * scale, np.matmul(ds.T, q) * scale, dv


def _attention_closed(mask: np.ndarray | None) -> Callable:
    def closed(arrays: list, y: np.ndarray, do: np.ndarray) -> list:
        q, k, v = arrays
        return list(_attention_closed_parts(q, k, v, do, mask))
    return closed


def _self_attention_closed(arrays: list, y: np.ndarray, do: np.ndarray) -> list:
    """Through the projections Q = X W_Q^T, K = X W_K^T, V = X W_V^T:
    dX = dQ W_Q + dK W_K + dV W_V and dW_* = d*^T X."""
    x, wq, wk, wv = arrays
    dq, dk, dv = _attention_closed_parts(np.matmul(x, wq.T), np.matmul(x, wk.T),
                                         np.matmul(x, wv.T), do, None)
    dx = np.matmul(dq, wq) + np.matmul(dk, wk) + np.matmul(dv, wv)
    return [dx, np.matmul(dq.T, x), np.matmul(dk.T, x), np.matmul(dv.T, x)]


# -- the verified derivations (the test suite and docs/derivations.md use these) ----------------

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


def _engine_fns() -> dict:
    from . import functional as F
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


def _cases() -> dict[str, Case]:
    fns = _engine_fns()
    qkv = dict(shapes=((3, 2), (3, 2), (3, 2)), names=("Q", "K", "V"), cotangent="dO")
    cases = [
        Case("softmax", "eg.softmax(x, axis=-1) (fused op, hand-written VJP)", fns["softmax"],
             ((2, 3),), ("x",), "g", _softmax_jvp),
        Case("softmax_composite", "ops.composite.softmax(x, -1) (primitives)",
             fns["softmax_composite"], ((2, 3),), ("x",), "g", _softmax_jvp),
        Case("log_softmax", "eg.log_softmax(x, axis=-1) (fused op)", fns["log_softmax"],
             ((2, 3),), ("x",), "g", _log_softmax_closed),
        Case("log_softmax_composite", "ops.composite.log_softmax(x, -1) (primitives)",
             fns["log_softmax_composite"], ((2, 3),), ("x",), "g", _log_softmax_closed),
        Case("logsumexp", "ops.composite.logsumexp(x, -1)", fns["logsumexp"], ((2, 3),), ("x",),
             "g", _logsumexp_closed),
        Case("cross_entropy", f"ops.composite.cross_entropy(x, targets={_TARGETS.tolist()})",
             fns["cross_entropy"], ((3, 3),), ("x",), None,
             _cross_entropy_closed(_TARGETS, sympy.Integer(0))),
        Case("cross_entropy_smoothing",
             f"ops.composite.cross_entropy(x, targets={_TARGETS.tolist()}, label_smoothing=0.1)",
             fns["cross_entropy_smoothing"], ((3, 3),), ("x",), None,
             _cross_entropy_closed(_TARGETS, _SMOOTHING)),
        Case("layer_norm", "eg.layer_norm(x, w, b, eps=1e-5) (fused op, hand-written VJP)",
             fns["layer_norm"], ((2, 3), (3,), (3,)), ("x", "w", "b"), "g",
             _layer_norm_closed(_EPS)),
        Case("layer_norm_composite", "ops.composite.layer_norm(x, w, b, eps=1e-5) (primitives)",
             fns["layer_norm_composite"], ((2, 3), (3,), (3,)), ("x", "w", "b"), "g",
             _layer_norm_closed(_EPS)),
        Case("attention", "scaled_dot_product_attention(Q, K, V)", fns["attention"],
             closed_form=_attention_closed(None), **qkv),
        Case("attention_causal", "scaled_dot_product_attention(Q, K, V, mask=causal)",
             fns["attention_causal"], closed_form=_attention_closed(_CAUSAL), **qkv),
        Case("attention_padding",
             "scaled_dot_product_attention(Q, K, V, mask=padding: last key masked)",
             fns["attention_padding"], closed_form=_attention_closed(_PADDING), **qkv),
        Case("self_attention", "self-attention of 3 tokens: attention(X W_Q^T, X W_K^T, X W_V^T)",
             fns["self_attention"], ((3, 2), (2, 2), (2, 2), (2, 2)),
             ("X", "W_Q", "W_K", "W_V"), "dO", _self_attention_closed),
        Case("multi_head_attention",
             "multi-head attention: 2 heads (width 1), output projection W_O",
             fns["multi_head_attention"], ((3, 2), (2, 2), (2, 2), (2, 2), (2, 2)),
             ("X", "W_Q", "W_K", "W_V", "W_O"), "dO"),
    ]
    return {c.key: c for c in cases}


@functools.lru_cache(maxsize=None)
def case_report(key: str) -> GradientReport:
    """The verification report of one case of `DERIVATIONS` (computed once per process)."""
    c = _cases()[key]
    return verify_gradients(c.fn, *c.shapes, names=c.names, cotangent=c.cotangent,
                            closed_form=c.closed_form, name=c.key, raise_on_failure=False)


def case_keys() -> list[str]:
    return list(_cases())


# -- the derivations document -----------------------------------------------------------------

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
    c = _cases()[key]
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


if __name__ == "__main__":
    raise SystemExit(main())
