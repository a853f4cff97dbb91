"""Finite-difference gradient checking, with a pointer to the op at fault."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .autograd import _topological, grad as autograd_grad
from .creation import tensor
from .dispatch import Edge, Node
from .errors import GradcheckError
from .state import keep_graph_inputs, no_grad
from .tensor import Tensor


def _as_float64(x: Any) -> Any:
    if isinstance(x, Tensor) and np.dtype(x.dtype).kind == "f":
        return tensor(x.numpy().astype(np.float64), device=x.device, requires_grad=True)
    return x


def _projected(f: Callable[..., Tensor], args: list, cot: np.ndarray | None) -> tuple:
    with keep_graph_inputs():          # _first_bad_op re-runs each node on its inputs
        out = f(*args)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: the function must return a tensor, got {type(out).__name__}")
    if cot is None:
        cot = np.random.default_rng(0).standard_normal(out.shape)
    return out, (out * tensor(cot, dtype=out.dtype, device=out.device)).sum(), cot


def _numeric(f: Callable[..., Tensor], args: list, i: int, cot: np.ndarray, eps: float) -> np.ndarray:
    x = args[i]
    base = x.numpy().astype(np.float64)
    num = np.zeros(base.shape)          # C order: num.reshape(-1) below must be a view
    flat = base.reshape(-1)
    with no_grad():
        for j in range(flat.size):
            vals = []
            for delta in (eps, -eps):
                pert = flat.copy()
                pert[j] += delta
                a = list(args)
                a[i] = tensor(pert.reshape(base.shape), device=x.device)
                out = f(*a)
                vals.append(float(np.sum(out.numpy().astype(np.float64) * cot)))
            num.reshape(-1)[j] = (vals[0] - vals[1]) / (2 * eps)
    return num


def _graph_nodes(out: Tensor) -> list[tuple[Tensor, Node]]:
    """Nodes of out's graph in the order they were computed."""
    return [(t, t._ctx) for t in reversed(_topological([out])) if isinstance(t._ctx, Node)]


def _first_bad_op(out: Tensor, eps: float, atol: float, rtol: float) -> str | None:
    """Check each op of the graph on its own recorded inputs; name the first that fails."""
    for t, node in _graph_nodes(out):
        if any(isinstance(x, Edge) for x in node.inputs):
            continue                   # recorded outside keep_graph_inputs: values not kept
        if not all(np.dtype(x.dtype) == np.float64 for x in node.inputs
                   if isinstance(x, Tensor) and x.requires_grad):
            continue
        inputs = [x.detach().requires_grad_(True) if isinstance(x, Tensor) and x.requires_grad
                  else x for x in node.inputs]
        fn = (lambda *a, _n=node: _n.op(*a, **_n.params))
        try:
            _check(fn, inputs, eps, atol, rtol, localize=False)
        except GradcheckError as e:
            shapes = ", ".join(str(tuple(x.shape)) if isinstance(x, Tensor) else repr(x)
                               for x in node.inputs)
            return f"{node.op.name}({shapes}) with {node.params or 'no params'}: {e}"
    return None


def _check(f: Callable[..., Tensor], args: list, eps: float, atol: float, rtol: float,
           localize: bool) -> None:
    diff_idx = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.requires_grad]
    out, proj, cot = _projected(f, args, None)
    if not proj.requires_grad:
        return
    analytic = autograd_grad(proj, [args[i] for i in diff_idx], retain_graph=True,
                             allow_unused=True)
    for i, ga in zip(diff_idx, analytic):
        a = np.zeros(args[i].shape) if ga is None else ga.numpy().astype(np.float64)
        n = _numeric(f, args, i, cot, eps)
        err = np.abs(a - n) - (atol + rtol * np.abs(n))
        if np.any(err > 0) or not np.all(np.isfinite(a)):
            j = np.unravel_index(int(np.argmax(np.where(np.isfinite(err), err, np.inf))), a.shape)
            path = " -> ".join(node.op.name for _, node in _graph_nodes(out))
            msg = (f"input {i} (shape {tuple(args[i].shape)}): worst element {tuple(int(k) for k in j)}: "
                   f"analytic {a[j]!r} vs numeric {n[j]!r} (atol {atol}, rtol {rtol})")
            if localize:
                culprit = _first_bad_op(out, eps, atol, rtol)
                msg += f"\n  op path: {path}"
                msg += f"\n  first op whose own gradient fails: {culprit}" if culprit else \
                    "\n  every op passes on its own: the composition or the function itself is at fault"
            raise GradcheckError("gradcheck failed: " + msg)


def gradcheck(f: Callable[..., Tensor], *inputs: Any, eps: float = 1e-6, atol: float = 1e-5,
              rtol: float = 1e-4) -> bool:
    """Compare autograd with central differences in float64.

    Floating tensor inputs are copied to float64 and differentiated; the output is
    projected on a fixed random cotangent. Returns True, or raises GradcheckError
    naming the input, the worst element, analytic vs numeric values, the op path
    and the first op whose own VJP disagrees with its forward.
    """
    args = [_as_float64(x) for x in inputs]
    _check(f, args, eps, atol, rtol, localize=True)
    return True

