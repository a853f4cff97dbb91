"""Reverse-mode autodiff over the graph of autograd nodes.

The walk is iterative (a chain of 100,000 ops is fine), gradients of a tensor
used several times are summed before its VJP runs, and the graph is freed after
backward unless `retain_graph=True`. VJPs are op calls: with `create_graph=True`
they are recorded, so gradients can be differentiated again.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

from ops.errors import GradError, ShapeError

from .creation import ones_like, tensor, zeros_like
from .dispatch import Edge, Node
from .state import phase, set_grad_enabled
from .tensor import Tensor

_GRAPH_TYPES = (Tensor, Edge)

# Gradient hooks on leaves (data-parallel training reduces gradients as they become
# final): fn(leaf) runs once the leaf's .grad holds this backward's contribution.
# Keyed by id (Tensor's == is elementwise, so no WeakKeyDictionary); an entry goes with its leaf.
_leaf_hooks: dict[int, list[Callable]] = {}
_end_callbacks: list[Callable[[], None]] = []


def register_leaf_hook(leaf: Tensor, fn: Callable[[Tensor], None]) -> Callable[[], None]:
    """Call fn(leaf) during every .backward() once leaf.grad is final for it; returns a
    function that removes the hook."""
    if leaf._ctx is not None or not leaf.requires_grad:
        raise GradError(f"register_leaf_hook: needs a leaf that requires grad, got a tensor "
                        f"of shape {leaf.shape} ({'non-leaf' if leaf._ctx else 'no grad'})")
    key = id(leaf)
    if key not in _leaf_hooks:
        weakref.finalize(leaf, _leaf_hooks.pop, key, None)
    _leaf_hooks.setdefault(key, []).append(fn)
    return lambda: _leaf_hooks.get(key, [fn]).remove(fn)


def queue_callback(fn: Callable[[], None]) -> None:
    """Run fn() once when the backward now running has finished (hooks use it to flush)."""
    _end_callbacks.append(fn)


def _key(t: Any) -> int:
    """Identity of the graph value t stands for: its node (a tensor and its edges
    share it), or the tensor itself for a leaf."""
    ctx = t._ctx
    return id(t) if ctx is None else id(ctx)


def _topological(roots: Sequence[Tensor]) -> list:
    """One tensor (or edge) per graph value that needs grad, reachable from `roots`,
    every consumer before its inputs."""
    order: list = []
    seen: set[int] = set()
    stack: list[tuple[Any, bool]] = [(r, False) for r in roots]
    while stack:
        t, done = stack.pop()
        if done:
            order.append(t)
            continue
        ctx = t._ctx
        k = id(t) if ctx is None else id(ctx)
        if k in seen:
            continue
        seen.add(k)
        stack.append((t, True))
        if ctx is not None:
            inputs = ctx.inputs
            if inputs is None:
                raise GradError(
                    f"backward through the graph a second time: the graph of {ctx.op.name} "
                    f"was freed by an earlier backward. Pass retain_graph=True to the first "
                    f"call if you need to run backward twice.")
            for x in inputs:
                if isinstance(x, _GRAPH_TYPES) and x.requires_grad:
                    xc = x._ctx
                    if (id(x) if xc is None else id(xc)) not in seen:
                        stack.append((x, False))
    order.reverse()
    return order


def _check_versions(t: Any, ctx: Node) -> None:
    """Raise if a value the VJP reads changed in place since the op ran."""
    saved = ctx.op.saves
    if saved == ():
        return
    inputs, versions = ctx.inputs, ctx.versions
    n = len(inputs)
    for i in (range(n + 1) if saved is None else saved):
        x = t if i == -1 or i == n else inputs[i]
        if isinstance(x, _GRAPH_TYPES) and x._version[0] != versions[i]:
            which = "its output" if x is t else f"input {i}"
            raise GradError(
                f"{ctx.op.name}: {which} (shape {x.shape}) was modified in place after the "
                f"op used it (version {versions[i]} -> {x._version[0]}), and backward needs "
                f"the old value. Use an out-of-place op (x = x + y) or .clone() before "
                f"changing it.")


def _accumulate(prev: Tensor | None, g: Tensor) -> Tensor:
    return g if prev is None else prev + g


def _run(roots: Sequence[Tensor], grads: Sequence[Tensor], retain_graph: bool,
         create_graph: bool, capture: dict[int, Tensor] | None) -> dict[int, Tensor]:
    """Propagate `grads` from `roots`. Leaves get .grad unless `capture` names graph
    values (by `_key`) whose total gradient is returned instead (autograd.grad)."""
    order = _topological(roots)
    pending: dict[int, Tensor] = {}
    for r, g in zip(roots, grads):
        pending[_key(r)] = _accumulate(pending.get(_key(r)), g)
    captured: dict[int, Tensor] = {}
    previous_phase, phase.name = phase.name, "backward"
    try:
        _propagate(order, pending, captured, retain_graph, create_graph, capture)
        while _end_callbacks:
            _end_callbacks.pop(0)()
    finally:
        phase.name = previous_phase
        _end_callbacks.clear()
    return captured


def _propagate(order: list, pending: dict, captured: dict, retain_graph: bool,
               create_graph: bool, capture: dict | None) -> None:
    """The backward loop (hot: one iteration per recorded op). Gradients are keyed
    per graph value (`_key`), so a tensor and its edges sum into one."""
    with set_grad_enabled(create_graph):
        for i, t in enumerate(order):
            if not retain_graph:
                order[i] = None               # t's values die once its node is done
            ctx = t._ctx
            key = id(t) if ctx is None else id(ctx)
            g = pending.pop(key, None)
            if g is None:
                continue
            if capture is not None and key in capture:
                captured[key] = g
            if ctx is None or t._retains_grad:
                if capture is None:
                    holder = t.tensor() if type(t) is Edge else t
                    if holder is not None:
                        g_store = g if create_graph else g.detach()
                        holder.grad = g_store if holder.grad is None else \
                            (holder.grad + g_store if create_graph else
                             (holder.grad + g_store).detach())
                        if _leaf_hooks and id(holder) in _leaf_hooks:
                            for hook in _leaf_hooks[id(holder)]:
                                hook(holder)
                if ctx is None:
                    continue
            inputs = ctx.inputs
            out = ctx.output(t) if ctx.out is not None and type(t) is Edge else t
            _check_versions(out, ctx)
            needs = tuple([getattr(x, "requires_grad", False) for x in inputs])
            in_grads = ctx.op.vjp(g, out, inputs, needs, **ctx.params)
            for x, gx, need in zip(inputs, in_grads, needs):
                if not need or gx is None:
                    continue
                gd = gx._data
                if type(x) is Edge:
                    x_shape, x_dtype = x.shape, x.dtype
                else:
                    xd = x._data
                    x_shape, x_dtype = xd.shape, xd.dtype
                if gd.shape != x_shape:
                    raise ShapeError(f"{ctx.op.name}: its VJP returned a gradient of shape "
                                     f"{gx.shape} for an input of shape {x_shape}")
                if gd.dtype != x_dtype:
                    gx = gx.to(dtype=x_dtype)
                xc = x._ctx
                xk = id(x) if xc is None else id(xc)
                prev = pending.get(xk)
                pending[xk] = gx if prev is None else prev + gx
            if not retain_graph:              # free in place: every holder sees it
                ctx.inputs = None
                ctx.out = None


def _root_grad(t: Tensor, grad: Any) -> Tensor:
    if grad is None:
        if t.size != 1:
            raise GradError(f"backward on a tensor of shape {t.shape} needs a gradient "
                            f"argument; only single-element outputs get an implicit 1")
        return ones_like(t)
    if not isinstance(grad, Tensor):
        grad = tensor(grad, dtype=t.dtype, device=t.device)
    if grad.shape != t.shape:
        raise ShapeError(f"backward: gradient of shape {grad.shape} for an output of "
                         f"shape {t.shape}")
    return grad


def backward(t: Tensor, grad: Any = None, retain_graph: bool = False,
             create_graph: bool = False) -> None:
    """Accumulate d(t)/d(leaf) (times `grad`) into `.grad` of every leaf that requires it."""
    if not t.requires_grad:
        raise GradError(f"backward on a tensor (shape {t.shape}) that does not require grad: "
                        f"no input of its computation has requires_grad=True")
    _run([t], [_root_grad(t, grad)], retain_graph or create_graph, create_graph, None)


def grad(outputs: Tensor | Sequence[Tensor], inputs: Tensor | Sequence[Tensor],
         grad_outputs: Any = None, retain_graph: bool | None = None,
         create_graph: bool = False, allow_unused: bool = False) -> tuple:
    """d(outputs)/d(inputs) as a tuple, without touching any .grad (torch.autograd.grad)."""
    outs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    ins = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    gos = grad_outputs if isinstance(grad_outputs, (list, tuple)) else [grad_outputs] * len(outs)
    for o in outs:
        if not o.requires_grad:
            raise GradError(f"grad: an output (shape {o.shape}) does not require grad")
    for x in ins:
        if not x.requires_grad:
            raise GradError(f"grad: an input (shape {x.shape}) does not require grad")
    retain = create_graph if retain_graph is None else retain_graph
    captured = _run(outs, [_root_grad(o, g) for o, g in zip(outs, gos)], retain, create_graph,
                    {_key(x): x for x in ins})
    result = []
    for x in ins:
        g = captured.get(_key(x))
        if g is None:
            if not allow_unused:
                raise GradError(f"grad: an input of shape {x.shape} was not used to compute "
                                f"the outputs (pass allow_unused=True to get None)")
        result.append(g)
    return tuple(result)


def _argnums(argnums: int | Sequence[int]) -> tuple[int, ...]:
    return (argnums,) if isinstance(argnums, int) else tuple(argnums)


def value_and_grad(f: Callable[..., Any], argnums: int | Sequence[int] = 0,
                   has_aux: bool = False) -> Callable[..., Any]:
    """f -> (x -> (f(x), df/dx)), as in JAX. f must return a scalar tensor (or
    (scalar, aux) with has_aux). Nested calls compose: grad(grad(f)) works."""
    nums = _argnums(argnums)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        args = list(args)
        nested = False
        for i in nums:
            a = args[i]
            if isinstance(a, Tensor) and a.requires_grad:
                nested = True          # an outer grad is watching: keep the graph
            else:
                a = (a.detach() if isinstance(a, Tensor) else tensor(a)).requires_grad_(True)
                args[i] = a
        with set_grad_enabled(True):
            res = f(*args, **kwargs)
        value, aux = res if has_aux else (res, None)
        if not isinstance(value, Tensor) or value.size != 1:
            raise GradError(f"grad: the function must return a single-element tensor, got "
                            f"{getattr(value, 'shape', type(value).__name__)}")
        if not value.requires_grad:
            gs = tuple(zeros_like(args[i]) for i in nums)
        else:
            gs = grad(value, [args[i] for i in nums], create_graph=nested,
                      allow_unused=True)
            gs = tuple(zeros_like(args[i]) if g is None else g for i, g in zip(nums, gs))
        out_g = gs[0] if isinstance(argnums, int) else gs
        if not nested:
            value = value.detach()
        return ((value, aux), out_g) if has_aux else (value, out_g)

    return wrapped


def grad_fn(f: Callable[..., Any], argnums: int | Sequence[int] = 0,
            has_aux: bool = False) -> Callable[..., Any]:
    """f -> df/dx (see value_and_grad)."""
    vg = value_and_grad(f, argnums, has_aux)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        (value, g) = vg(*args, **kwargs)
        return (g, value[1]) if has_aux else g

    return wrapped

