"""Adam (Kingma & Ba) and AdamW (Loshchilov & Hutter), step for step as torch.optim:

    AdamW: p = p * (1 - lr * wd)            (decoupled decay)
    Adam:  g = g + wd * p                   (L2 penalty in the gradient)
    m = m + (1 - b1) * (g - m);  v = b2 * v + (1 - b2) * g * g
    p = p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Each of the three lines is one elementwise op of the registry (lerp, ema_sq,
adam_param), so a step costs three dispatches per parameter (one fused kernel each
on a GPU); results agree with torch.optim to rounding.

`capturable=True` (as in torch) keeps the step count in a float64 0-d tensor and
computes the bias corrections with tensor ops, and creates the state when the
optimizer is built: nothing that changes between steps is a Python number, so a
training step traced by eg.jit stays correct (a few more scalar ops per parameter).
`lr` may be a 0-d tensor (in the parameters' dtype); schedulers update it in place.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import engine as eg
from engine import Tensor
from engine.errors import TraceError

from .optimizer import Optimizer, check_hyper


def _as_dtype(x: Any, dtype: Any) -> Any:
    return x.to(dtype=dtype) if isinstance(x, Tensor) else x


class Adam(Optimizer):
    _decoupled = False

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, capturable: bool = False) -> None:
        check_hyper(type(self).__name__, lr=lr if not isinstance(lr, Tensor) else 0.0, eps=eps,
                    weight_decay=weight_decay, betas=tuple(betas))
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, capturable=bool(capturable)))
        for g in self.param_groups:
            if g["capturable"]:
                for p in g["params"]:
                    self._init_state(p, self.state.setdefault(id(p), {}), g)

    @staticmethod
    def _init_state(p: Tensor, state: dict, group: dict) -> None:
        state["step"] = eg.zeros((), dtype=eg.float64, device=p.device) if group["capturable"] else 0
        state["exp_avg"] = eg.zeros_like(p)
        state["exp_avg_sq"] = eg.zeros_like(p)

    @staticmethod
    def _step_factors(p: Tensor, state: dict, group: dict) -> tuple[Any, Any]:
        """(lr / (1 - b1^t), sqrt(1 - b2^t)) after advancing the step count."""
        lr, (b1, b2) = group["lr"], group["betas"]
        step = state["step"]
        if group["capturable"]:
            if not isinstance(step, Tensor):             # state loaded from a plain optimizer
                step = state["step"] = eg.tensor(float(step), dtype=eg.float64, device=p.device)
            step += 1.0
            step_size = (_as_dtype(lr, eg.float64) / (1.0 - b1 ** step)).to(dtype=p.dtype)
            return step_size, (1.0 - b2 ** step).sqrt().to(dtype=p.dtype)
        if getattr(p.grad._data, "is_abstract", False):
            raise TraceError("Adam/AdamW: an update traced by eg.jit with a Python step count "
                             "would freeze the bias corrections at their first value; build the "
                             "optimizer with capturable=True to trace it")
        t = state["step"] = (int(step.item()) if isinstance(step, Tensor) else step) + 1
        return _as_dtype(lr / (1.0 - b1 ** t), p.dtype), math.sqrt(1.0 - b2 ** t)

    def _update(self, p: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        if not state:
            self._init_state(p, state, group)
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        step_size, bc2_sqrt = self._step_factors(p, state, group)
        g = grad
        decay = 1.0
        if wd:
            if self._decoupled:
                decay = _as_dtype(1.0 - lr * wd, p.dtype)
            else:
                g = g + p * wd
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.copy_(eg.lerp(m, g, 1.0 - b1))                   # one fused op each:
        v.copy_(eg.ema_sq(v, g, b2))                       # see ops/elementwise.py
        p.copy_(eg.adam_param(p, m, v, step_size, bc2_sqrt, decay, eps))


class AdamW(Adam):
    """Adam with decoupled weight decay (default 0.01, as torch.optim.AdamW)."""

    _decoupled = True

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, capturable: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, capturable)
