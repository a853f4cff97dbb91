"""The verifier: the engine's own backward, run on sympy arrays, against sympy.diff.

`verify_gradients` makes a matrix of symbols per input and one for the output's
cotangent, runs the function and the engine's backward on the symbolic backend,
and compares every element of every input gradient exactly (`decide_zero`) with
sympy.diff of the symbolic forward, and with a closed form when one is given. On a
mismatch each op of the graph has its VJP checked on its own, so the report names
the op and the element that are wrong.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import sympy

from backends import get_backend
from backends.symbolic import SymArray
from ops.elementwise import OUT
from ops.errors import GradError

from ..autograd import grad as _autograd_grad
from ..dispatch import Edge, Node
from ..state import keep_graph_inputs
from ..tensor import Tensor
from .zero import DEFAULT_POINTS, Proof, decide_zero

__all__ = ["symbols", "symbolic_tensor", "constant", "ElementCheck", "GradientReport",
           "GradientMismatch", "verify_gradients", "verify_leaves", "graph_nodes", "node_key",
           "node_report", "SpecReport", "verify_elementwise_spec",
           "elementwise_engine_check"]

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

def graph_nodes(out: Tensor) -> list[tuple[Tensor, Node]]:
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


def node_key(node: Node) -> tuple:
    """What a node's own VJP check depends on: the op, its params, the shapes and dtypes
    of its inputs and the values of its integer and bool inputs (masks, targets)."""
    shapes = tuple(((tuple(x.shape), str(x.dtype), x.requires_grad) +
                    ((repr(np.asarray(x._data).tolist()),) if np.dtype(x.dtype).kind in "biu"
                     else ()))
                   if isinstance(x, Tensor) else ("scalar", repr(x)) for x in node.inputs)
    return node.op.name, shapes, repr(sorted(node.params.items(), key=lambda kv: kv[0]))


def node_report(node: Node, points: int = DEFAULT_POINTS) -> GradientReport:
    """One op's VJP proved on its own: fresh symbols for the inputs that took a
    gradient, the other inputs (masks, class indices) as they were."""
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

    return verify_gradients(call, *shapes, names=names, points=points, name=node.op.name,
                            raise_on_failure=False, blame=False)


def _local_check(node: Node, points: int) -> str | None:
    """`node_report`, as the line naming what fails (None when the VJP is right)."""
    bad = node_report(node, points).failures
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
    inputs = [symbolic_tensor(symbols(n, s, p)) for n, s, p in zip(names, shapes, pos)]
    return verify_leaves(lambda: fn(*inputs), dict(zip(names, inputs)), cotangent=cotangent,
                         closed_form=closed_form, points=points, seed=seed,
                         name=name or getattr(fn, "__name__", "fn"),
                         raise_on_failure=raise_on_failure, blame=blame)


def verify_leaves(run: Callable[[], Tensor], leaves: dict[str, Tensor], *,
                  cotangent: str | None = "g", closed_form: Callable[..., Sequence] | None = None,
                  points: int = DEFAULT_POINTS, seed: int = 0, name: str = "fn",
                  raise_on_failure: bool = True, blame: bool = True) -> GradientReport:
    """`verify_gradients` for leaf tensors made by the caller: each of `leaves` (by
    name) is a symbolic tensor holding distinct symbols and requiring grad, e.g. a
    module's own Parameters, so the module's forward runs unchanged; `run()` computes
    the output from them."""
    names, inputs = list(leaves), list(leaves.values())
    for nm, t in leaves.items():
        if t.device != "symbolic" or not t.requires_grad:
            raise ValueError(f"verify_gradients: leaf {nm!r} must be a symbolic tensor that "
                             f"requires grad, got device {t.device!r}, "
                             f"requires_grad={t.requires_grad}")
    arrays = [t._data.data for t in inputs]
    with keep_graph_inputs():          # _local_check re-runs each node on its inputs
        out = run()
    if not isinstance(out, Tensor) or out.device != "symbolic":
        raise TypeError("verify_gradients: fn must return one tensor computed from its inputs")
    y = out._data.data
    if cotangent is None:
        v = np.empty(out.shape, dtype=object)
        v.fill(sympy.Integer(1))
    else:
        v = symbols(cotangent, out.shape)
    linear = [] if cotangent is None else list(v.reshape(-1))
    report = GradientReport(name, {n: tuple(a.shape) for n, a in zip(names, arrays)},
                            tuple(out.shape))
    if out.requires_grad:
        nodes = graph_nodes(out)
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
            key = node_key(node)
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

