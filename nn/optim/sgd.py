"""Stochastic gradient descent with momentum, dampening, Nesterov and weight decay,
step for step as torch.optim.SGD:

    g = grad + wd * p
    buf = g (first step) | momentum * buf + (1 - dampening) * g
    g = g + momentum * buf (nesterov) | buf
    p = p - lr * g

`lr` may be a 0-d tensor (schedulers then update it in place, which eg.jit sees).
The first step with momentum takes a Python branch (the buffer starts as a copy of
the gradient, as in torch): run one eager step before tracing a training step.
"""
from __future__ import annotations

from typing import Any, Iterable

import engine as eg
from engine.errors import ArgumentError
from engine import Tensor

from .optimizer import Optimizer


class SGD(Optimizer):
    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False) -> None:
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ArgumentError("SGD: Nesterov momentum needs momentum > 0 and dampening = 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def _update(self, p: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        wd, mom = group["weight_decay"], group["momentum"]
        g = grad + p * wd if wd else grad
        if mom:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = eg.tensor(g)        # a copy
            else:
                buf *= mom
                buf += g * (1.0 - group["dampening"])
            g = g + buf * mom if group["nesterov"] else buf
        lr = group["lr"]
        p -= g * (lr.to(dtype=p.dtype) if isinstance(lr, Tensor) else lr)
