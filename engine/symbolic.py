"""Symbolic verification: prove the engine's gradients with sympy.

The engine's eager interpreter runs unchanged on the symbolic backend
(`backends.symbolic`), whose arrays hold sympy expressions. `verify_gradients`
makes a matrix of symbols per input, runs the function *and the engine's own
backward* on them, differentiates the symbolic forward with `sympy.diff`, and
compares the two element by element. So what is proved is the code the engine
runs, not a second hand derivation.

A comparison is exact. For each element, either the difference simplifies to 0
(function applications such as exp(...) and Max(...) are taken as independent
unknowns and the rest is cancelled as a rational function: sound, because a
rational identity in free unknowns holds whatever values they take), or, where
that does not close it, the difference is evaluated *exactly* at 20 or more random
rational points and must be exactly 0 at every one (sympy Rationals; exponentials
at a point are written as powers of exp(1/L) and exp(sqrt(n)/L), algebraically
independent by Lindemann-Weierstrass, so the test at a point is exact too). The
report says which of the two held, per element.

`python -m engine.symbolic --write docs/derivations.md` regenerates the
derivations document from the verified cases in `DERIVATIONS`.
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

import ops
from backends import get_backend
from backends.symbolic import SymArray
from ops.errors import GradError

from .autograd import grad as _autograd_grad
from .dispatch import Node
from .tensor import Tensor

__all__ = ["verify_gradients", "verify_elementwise_spec", "GradientReport", "ElementCheck",
           "GradientMismatch", "decide_zero", "Proof", "symbols", "symbolic_tensor", "constant",
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


def _atomize(expr: sympy.Expr) -> sympy.Expr:
    """Replace each function application (exp(..), Max(..), Heaviside(..), ...) by a
    fresh unknown; equal applications get the same unknown. A rational identity that
    holds with free unknowns holds for their true values, so zero here proves zero."""
    reps = {a: sympy.Dummy("a") for a in expr.atoms(*_OPAQUE)}
    return expr.xreplace(reps) if reps else expr


def _exp_bases(expr: sympy.Expr, numeric: bool) -> sympy.Expr:
    """Rewrite every exp(sum of c_k * m_k) as prod B_m ** (c_k * L_m), with B_m an
    unknown standing for exp(m / L_m) and L_m the lcm of the denominators of the
    rational c_k met with m. Hyperbolic functions are first written with exp.

    Why: exp(x - M), exp(x) and exp(-M) then share unknowns, so the max shift of a
    stable softmax cancels as a rational identity. At a numeric point (numeric=True)
    m is 1 or sqrt(n), whose exponentials are algebraically independent."""
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


def _is_zero_rational(expr: sympy.Expr, expand_limit: int) -> bool:
    """Cancel `expr` as a rational function of its symbols and unknowns; if that
    leaves something and it is small, expand the numerator at the Expr level too
    (where sqrt(2)*sqrt(2) becomes 2, which polynomial arithmetic over ZZ[sqrt(2)]
    does not see)."""
    if expr == 0:
        return True
    c = sympy.cancel(expr)
    if c == 0:
        return True
    if sympy.count_ops(c) <= expand_limit:
        num, _ = sympy.fraction(sympy.together(c))
        return sympy.expand(num) == 0
    return False


def _simplifies_to_zero(expr: sympy.Expr) -> bool:
    if expr == 0:
        return True
    if _is_zero_rational(_atomize(expr), 0):
        return True
    return _is_zero_rational(_atomize(_exp_bases(expr, numeric=False)), 400)


def _clearly_nonzero(value: sympy.Expr) -> bool:
    """A constant that evaluates, with guaranteed precision, to a nonzero number.
    (A cheap look first: strict evaluation of an exact 0 is slow to give up.)"""
    try:
        n = sympy.N(value, 20)
        if not n.is_Number or abs(n) < 1e-12:
            return False
        return value.evalf(30, strict=True) != 0
    except (sympy.core.evalf.PrecisionExhausted, TypeError, ValueError, ArithmeticError):
        return False


def _constant_is_zero(value: sympy.Expr) -> bool | None:
    """Exact zero test of a constant: True, False, or None (could not decide)."""
    if value == 0:
        return True
    if value.is_Rational or _clearly_nonzero(value):
        return False
    if _is_zero_rational(_atomize(_exp_bases(value, numeric=True)), 10 ** 6):
        return True
    return None


def _random_value(rng: random.Random, positive: bool) -> sympy.Rational:
    q = rng.randint(1, 7)
    p = rng.randint(1, 2 * q) if positive else rng.choice([-1, 1]) * rng.randint(1, 2 * q)
    return sympy.Rational(p, q)


def _random_point(syms: Sequence[sympy.Symbol], rng: random.Random) -> dict:
    """Distinct, nonzero random rationals (positive for positive symbols): no ties
    or zeros, which are where kink conventions (relu'(0), Max ties) live."""
    point: dict = {}
    used: set = set()
    for s in syms:
        v = _random_value(rng, bool(s.is_positive))
        while v in used:
            v = _random_value(rng, bool(s.is_positive))
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


def decide_zero(expr: Any, points: int = DEFAULT_POINTS, seed: int = 0) -> Proof:
    """Prove `expr` == 0: by simplification, else exactly at `points` random rational
    points. Returns a failing Proof with the point and value where it is not 0."""
    expr = sympy.sympify(expr)
    if expr == 0:
        return Proof(True, "simplified", 0, "identical")
    if _simplifies_to_zero(expr):
        return Proof(True, "simplified")
    syms = sorted(expr.free_symbols, key=lambda s: s.name)
    rng = random.Random(seed)
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
    return Proof(True, "rational points", passed)


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
        refs = sorted({c.against for c in self.checks})
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
            head += "\n  ops whose own VJP fails its symbolic check: " + "; ".join(self.suspects)
        else:
            head += ("\n  every op's VJP passes its own check (ops involved: "
                     f"{', '.join(self.ops)}): the mismatch comes from how they are combined, "
                     f"e.g. a stop_gradient on a path that matters")
        return head

    def __str__(self) -> str:
        return "\n".join([self.summary()] + ["  " + c.describe() for c in self.checks])


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
        if id(t) in seen or not isinstance(t._ctx, Node):
            continue
        seen.add(id(t))
        order.append((t, t._ctx))
        stack.extend(x for x in t._ctx.inputs if isinstance(x, Tensor) and x.requires_grad)
    return order


def _node_key(node: Node) -> tuple:
    shapes = tuple((tuple(x.shape), str(x.dtype), x.requires_grad) if isinstance(x, Tensor)
                   else ("scalar", repr(x)) for x in node.inputs)
    return node.op.name, shapes, repr(sorted(node.params.items(), key=lambda kv: kv[0]))


def _local_check(node: Node, points: int) -> list[str]:
    """Check one op's VJP on its own: fresh symbols for the inputs that took a
    gradient, the other inputs as they were. Returns the failing elements."""
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
    shape_text = ", ".join(str(tuple(x.shape)) if isinstance(x, Tensor) else repr(x)
                           for x in node.inputs)
    return [f"{node.op.name} (inputs {shape_text}; params {node.params or 'none'}): "
            f"{c.describe()}" for c in report.failures]


def _flat_items(arr: np.ndarray) -> Iterable[tuple[tuple, Any]]:
    for idx in np.ndindex(*arr.shape):
        yield idx, arr[idx]


def verify_gradients(fn: Callable[..., Tensor], *shapes: Sequence[int],
                     names: Sequence[str] | None = None, positive: Sequence[bool] | bool = False,
                     cotangent: str | None = "g", closed_form: Callable[..., Sequence] | None = None,
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
    out = fn(*inputs)
    if not isinstance(out, Tensor) or out.device != "symbolic":
        raise TypeError("verify_gradients: fn must return one tensor computed from its inputs")
    y = out._data.data
    if cotangent is None:
        v = np.empty(out.shape, dtype=object)
        v.fill(sympy.Integer(1))
    else:
        v = symbols(cotangent, out.shape)
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
    for k, (nm, arr) in enumerate(zip(names, arrays)):
        for idx, s in _flat_items(arr):
            proof = decide_zero(engine[k][idx] - sympy.diff(loss, s), points, seed)
            report.checks.append(ElementCheck(nm, idx, "sympy.diff", proof))
    if closed_form is not None:
        closed = closed_form(arrays, y, v)
        for k, (nm, arr) in enumerate(zip(names, arrays)):
            ref = np.asarray(closed[k], dtype=object)
            for idx, _ in _flat_items(arr):
                proof = decide_zero(engine[k][idx] - ref[idx], points, seed)
                report.checks.append(ElementCheck(nm, idx, "closed form", proof))
    if not report.ok and blame:
        checked: set = set()
        for _, node in nodes:
            key = _node_key(node)
            if key not in checked:
                checked.add(key)
                report.suspects.extend(_local_check(node, points))
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


def _domain_symbols(op: Any) -> dict:
    """The spec's symbols with the assumptions of its input domain."""
    if op.domain == "positive":
        return {s: sympy.Symbol(s.name, positive=True) for s in op.symbols}
    return {}


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
                            positive=op.domain == "positive", points=points, name=op.name,
                            raise_on_failure=False)
