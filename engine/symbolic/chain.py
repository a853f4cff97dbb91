"""Whole-graph gradient proofs that stay the size of the graph (`verify_chain`).

sympy walks expression trees, and a network's gradient as a tree is exponential in
its depth (a TransformerDecoderLayer at d_model 2: ~10^13 nodes), although as a
graph it is small. Here every value an op produces, forward or backward, is bound to
fresh symbols (`LetInterpreter`: `u = exp(x - mu)` is recorded and `u` flows on), so
no expression is more than one op deep, and the backward is proved by induction
over the graph, consumers first. For every tensor T of the forward (an op's output
or a leaf) and every element j:

    w_T[j]  ==  sum over every op c that read T, at every position where it read it,
                of  sum_k w_c[k] * d f_c[k] / d T[j]

where w_T is the cotangent autograd accumulated for T (its bindings unfolded down to
the consumers' cotangents w_c), and f_c is c's forward re-run on fresh symbols and
differentiated by sympy.diff (the max shift of a stable softmax held once its
derivative is proved 0, as in `verify_leaves`), evaluated at the values c read.
The cotangent of the output is the symbol matrix v. Each op's recorded output is
also checked to be its forward at its recorded inputs, so the graph computes the
output from the leaves; then, by induction from the output down, every w_T is
d(sum v * y)/dT: the multivariable chain rule, summed over every path. What is
proved beyond the op-by-op VJP proofs: autograd's bookkeeping (which cotangent
reaches which input, sums over consumers, views, broadcasting) on the real graph.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import sympy

from backends.symbolic import SymArray

from ..autograd import grad as _autograd_grad
from ..dispatch import EagerInterpreter, interpret
from ..state import keep_graph_inputs
from ..tensor import Tensor
from .verify import GradientReport, _hold_maxima, graph_nodes, symbolic_tensor, symbols
from .zero import DEFAULT_POINTS, decide_zero

__all__ = ["LetInterpreter", "ChainReport", "verify_chain"]


class LetInterpreter(EagerInterpreter):
    """The eager interpreter, with every compound value an op makes on the symbolic
    backend bound to a fresh real symbol (`defs[symbol]` is the value). Numbers,
    infinities and symbols pass unchanged, so a view keeps its input's symbols and
    exp(-oo) is still 0."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.defs: dict[sympy.Symbol, sympy.Expr] = {}
        self._count = itertools.count()

    def compute(self, op: Any, backend: Any, raw: list, args: tuple, params: dict) -> Any:
        out = super().compute(op, backend, raw, args, params)
        if not isinstance(out, SymArray) or out.dtype.kind != "f":
            return out
        data = out.data
        if all(_atomic(e) for e in data.flat):
            return out                                # keep views aliasing their input
        bound = np.empty(data.shape, dtype=object)
        for idx in np.ndindex(*data.shape):
            e = data[idx]
            if _atomic(e):
                bound[idx] = e
            else:
                s = sympy.Symbol(f"{self.prefix}{next(self._count)}", real=True)
                self.defs[s] = sympy.sympify(e)
                bound[idx] = s
        return SymArray(bound, out.dtype)


def _infinite(e: Any) -> bool:
    return isinstance(e, sympy.Basic) and e.is_infinite is True


def _atomic(e: Any) -> bool:
    return not isinstance(e, sympy.Basic) or e.is_Atom


@dataclass
class ChainReport:
    """The induction of `verify_chain`: one entry per tensor of the forward."""
    name: str
    nodes: int = 0                  # ops in the graph
    tensors: int = 0                # tensors whose cotangent was proved (outputs and leaves)
    elements: int = 0               # cotangent elements proved
    bound: int = 0                  # values bound to symbols, forward and backward
    methods: dict = field(default_factory=dict)       # proof method -> elements
    failures: list[str] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)  # leaves no op reads

    @property
    def ok(self) -> bool:
        return not self.failures and not self.unreached and self.elements > 0

    def summary(self) -> str:
        how = ", ".join(f"{n} {m}" for m, n in sorted(self.methods.items()))
        head = (f"{self.name}: chain rule proved over {self.nodes} ops: the cotangent of each "
                f"of {self.tensors} tensors ({self.elements} elements; {how}) equals the sum "
                f"over its consumers of J^T w; {self.bound} values bound to symbols")
        bad = self.failures + [f"no op reads {', '.join(self.unreached)}"] * bool(self.unreached)
        return head if not bad else head + "\n  FAILED:\n  " + "\n  ".join(bad[:12])


def _describe(node: Any) -> str:
    shapes = ", ".join(str(tuple(x.shape)) if isinstance(x, Tensor) else repr(x)
                       for x in node.inputs)
    return f"{node.op.name}({shapes})"


def _consumer_terms(node: Any, out: Tensor, w_out: np.ndarray, defs: dict, points: int,
                    seed: int, report: ChainReport) -> dict[int, np.ndarray]:
    """J_c^T w_c for each input of op c that takes a gradient, as {input position: array},
    from sympy.diff of c's forward re-run on fresh symbols, at the values c read."""
    grad_pos = [i for i, x in enumerate(node.inputs) if isinstance(x, Tensor) and x.requires_grad]
    fresh, at = {}, {}                 # fresh symbols per input; each one -> the value read
    for i in grad_pos:      # an infinite entry (a masked score) stays itself: no derivative there
        z, actual = symbols(f"z{i}", node.inputs[i].shape), node.inputs[i]._data.data
        fresh[i] = np.where(np.vectorize(_infinite, otypes=[bool])(actual), actual, z)
        at.update((s, a) for s, a in zip(fresh[i].reshape(-1), actual.reshape(-1))
                  if isinstance(s, sympy.Symbol))
    args = [symbolic_tensor(fresh[i]) if i in fresh else
            (x.detach() if isinstance(x, Tensor) else x) for i, x in enumerate(node.inputs)]
    f = node.op(*args, **node.params)._data.data
    # the recorded output is the op at the recorded inputs (so the graph computes y)
    for idx in np.ndindex(*f.shape):
        got, want = out._data.data[idx], sympy.sympify(f[idx]).xreplace(at)
        if got == want:                              # a view: its input's own symbols
            continue
        recorded = defs.get(got, got)
        if recorded != want and not decide_zero(recorded - want, points, seed).ok:
            report.failures.append(f"{_describe(node)}: its recorded output at {list(idx)} is "
                                   f"not the op at its recorded inputs")
            return {}
    wt = symbols("wt", f.shape)
    loss = sympy.Add(*[a * sympy.sympify(b) for a, b in zip(wt.reshape(-1), f.reshape(-1))])
    scratch = GradientReport(node.op.name, {}, tuple(f.shape))
    held = _hold_maxima(loss, f, points, seed, list(wt.reshape(-1)), scratch)
    if held:
        loss = loss.xreplace(held)
    unhold = {mu: m.xreplace(at) for m, mu in held.items()}
    to_actual = dict(at)
    to_actual.update(zip(wt.reshape(-1), w_out.reshape(-1)))
    terms = {}
    for i in grad_pos:
        arr = np.empty(fresh[i].shape, dtype=object)
        for idx in np.ndindex(*arr.shape):
            z = fresh[i][idx]
            arr[idx] = (sympy.diff(loss, z).xreplace(to_actual).xreplace(unhold)
                        if isinstance(z, sympy.Symbol) else sympy.Integer(0))
        terms[i] = arr
    return terms


def _unfold(e: Any, defs: dict, stop: set, cache: dict) -> sympy.Expr:
    """`e` with every backward binding replaced by its value, down to the symbols in
    `stop` (the consumers' cotangents) and the forward's symbols."""
    e = sympy.sympify(e)
    reps = {}
    for s in e.free_symbols:
        if s in defs and s not in stop:
            if s not in cache:
                cache[s] = _unfold(defs[s], defs, stop, cache)
            reps[s] = cache[s]
    return e.xreplace(reps) if reps else e


def verify_chain(run: Callable[[], Tensor], leaves: dict[str, Tensor], name: str, *,
                 cotangent: str = "v", points: int = DEFAULT_POINTS,
                 seed: int = 0) -> ChainReport:
    """Prove autograd's gradient of `run()` (on the symbolic backend, from the symbolic
    `leaves`) by the induction in this module's docstring."""
    report = ChainReport(name)
    forward, backward = LetInterpreter("u_"), LetInterpreter("w_")
    with keep_graph_inputs(), interpret(forward):
        out = run()
    nodes = graph_nodes(out)
    report.nodes = len(nodes)
    v = symbols(cotangent, out.shape)
    tensors = [t for t, _ in nodes] + list(leaves.values())
    with interpret(backward):
        grads = _autograd_grad(out, tensors, grad_outputs=symbolic_tensor(v, requires_grad=False),
                               retain_graph=True, allow_unused=True)
    report.bound = len(forward.defs) + len(backward.defs)
    cot = {id(t): (np.full(t.shape, sympy.Integer(0), dtype=object) if g is None else g._data.data)
           for t, g in zip(tensors, grads)}
    if any(sympy.sympify(a) != b for a, b in zip(cot[id(out)].reshape(-1), v.reshape(-1))):
        report.failures.append("the output's cotangent is not v")
    # every op's J^T w, filed under the tensors it read
    reference: dict[int, np.ndarray] = {id(t): np.full(t.shape, sympy.Integer(0), dtype=object)
                                        for t in tensors}
    consumers: dict[int, list] = {id(t): [] for t in tensors}
    for t, node in nodes:
        for i, arr in _consumer_terms(node, t, cot[id(t)], forward.defs, points, seed, report).items():
            x = node.inputs[i]
            if id(x) not in reference:
                report.failures.append(f"{_describe(node)} reads a tensor outside the graph")
                continue
            total = np.empty(arr.shape, dtype=object)     # (a 0-d sum would be a bare scalar)
            total[...] = reference[id(x)] + arr
            reference[id(x)] = total
            consumers[id(x)].append(t)
    read = {id(x) for _, node in nodes for x in node.inputs}
    report.unreached = [k for k, t in leaves.items() if id(t) not in read]
    labels = {id(t): _describe(node) for t, node in nodes}
    labels.update({id(t): f"leaf {k}" for k, t in leaves.items()})
    for t in tensors:
        if t is out:
            continue
        stop = {s for c in consumers[id(t)] for s in cot[id(c)].reshape(-1)
                if isinstance(s, sympy.Symbol)}
        linear = sorted(stop, key=sympy.default_sort_key)
        # the forward values a VJP saved as outputs, written in its inputs (as J is)
        expand = {s: forward.defs[s] for c in consumers[id(t)]
                  for s in c._data.data.reshape(-1) if s in forward.defs}
        cache: dict = {}
        report.tensors += 1
        for idx in np.ndindex(*t.shape):
            got = _unfold(cot[id(t)][idx], backward.defs, stop, cache)
            diff = (got - reference[id(t)][idx]).xreplace(expand)
            proof = decide_zero(diff, points, seed, linear)
            report.elements += 1
            report.methods[proof.method] = report.methods.get(proof.method, 0) + 1
            if not proof.ok:
                report.failures.append(f"the cotangent of {labels[id(t)]} at {list(idx)}: "
                                       f"{proof.detail}")
    return report
