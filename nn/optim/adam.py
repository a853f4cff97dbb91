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
training step traced by eg.jit stays correct. Parameters that have always been
updated together share one step tensor, so the bias corrections cost a handful of
scalar ops per group rather than per parameter; a parameter skipped in a step
(no .grad) while others advance gets its own count, so every parameter's count
is still the number of updates it had, as in torch.
`lr` may be a 0-d tensor (in the parameters' dtype); schedulers update it in place.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import engine as eg
from engine import Tensor
from engine.errors import TraceError

from .optimizer import Optimizer


def _as_dtype(x: Any, dtype: Any) -> Any:
    return x.to(dtype=dtype) if isinstance(x, Tensor) else x


class Adam(Optimizer):
    _decoupled = False

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, capturable: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, capturable=bool(capturable)))
        for g in self.param_groups:
            if g["capturable"]:
                for p in g["params"]:
                    self._init_state(p, self.state.setdefault(id(p), {}), g)
                self._share_steps(g)

    @staticmethod
    def _init_state(p: Tensor, state: dict, group: dict) -> None:
        state["step"] = eg.zeros((), dtype=eg.float64, device=p.device) if group["capturable"] else 0
        state["exp_avg"] = eg.zeros_like(p)
        state["exp_avg_sq"] = eg.zeros_like(p)

    def _share_steps(self, group: dict) -> None:
        """Let the group's parameters with equal step counts (per device) share one tensor."""
        shared: dict = {}
        for p in group["params"]:
            state = self.state.get(id(p))
            if not state or not isinstance(state.get("step"), Tensor):
                continue
            key = (state["step"].item(), p.device)
            state["step"] = shared.setdefault(key, state["step"])

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for g in self.param_groups:
            if g["capturable"]:
                self._share_steps(g)

    def _update_group(self, group: dict, active: list[Tensor]) -> None:
        """Capturable: advance each shared step tensor once and compute its bias
        corrections once for all the parameters that share it."""
        if not group["capturable"]:
            return super()._update_group(group, active)
        states = [self.state.setdefault(id(p), {}) for p in active]
        for p, state in zip(active, states):
            if not state:
                self._init_state(p, state, group)
            elif not isinstance(state["step"], Tensor):  # state loaded from a plain optimizer
                state["step"] = eg.tensor(float(state["step"]), dtype=eg.float64, device=p.device)
        users: dict = {}
        for p in group["params"]:
            step = self.state.get(id(p), {}).get("step")
            if isinstance(step, Tensor):
                users[id(step)] = users.get(id(step), 0) + 1
        advanced: dict = {}
        for state in states:
            step = state["step"]
            if id(step) not in advanced:
                # Users of this count that are not updated now keep it; the rest move on together.
                active_users = sum(s["step"] is step for s in states)
                new = step if active_users == users[id(step)] else step.clone()
                new += 1.0
                advanced[id(step)] = new
            state["step"] = advanced[id(step)]
        factors: dict = {}
        for p, state in zip(active, states):
            key = (id(state["step"]), p.dtype)
            if key not in factors:
                factors[key] = self._bias_corrections(state["step"], p.dtype, group)
            self._update(p, p.grad, state, group, factors[key])

    @staticmethod
    def _bias_corrections(step: Tensor, dtype: Any, group: dict) -> tuple[Tensor, Tensor]:
        """(lr / (1 - b1^t), sqrt(1 - b2^t)) for an already advanced step tensor."""
        lr, (b1, b2) = group["lr"], group["betas"]
        step_size = (_as_dtype(lr, eg.float64) / (1.0 - b1 ** step)).to(dtype=dtype)
        return step_size, (1.0 - b2 ** step).sqrt().to(dtype=dtype)

    @staticmethod
    def _step_factors(p: Tensor, state: dict, group: dict) -> tuple[Any, Any]:
        """(lr / (1 - b1^t), sqrt(1 - b2^t)) after advancing a Python step count."""
        lr, (b1, b2) = group["lr"], group["betas"]
        step = state["step"]
        if getattr(p.grad._data, "is_abstract", False):
            raise TraceError("Adam/AdamW: an update traced by eg.jit with a Python step count "
                             "would freeze the bias corrections at their first value; build the "
                             "optimizer with capturable=True to trace it")
        t = state["step"] = (int(step.item()) if isinstance(step, Tensor) else step) + 1
        return _as_dtype(lr / (1.0 - b1 ** t), p.dtype), math.sqrt(1.0 - b2 ** t)

    def _update(self, p: Tensor, grad: Tensor, state: dict, group: dict,
                factors: tuple | None = None) -> None:
        if not state:
            self._init_state(p, state, group)
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        step_size, bc2_sqrt = factors or self._step_factors(p, state, group)
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
