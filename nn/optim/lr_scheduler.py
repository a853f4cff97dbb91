"""Learning-rate schedules, applied like torch.optim.lr_scheduler.LambdaLR:
lr = initial_lr * factor(step), with step = 0 at construction and +1 per
`scheduler.step()` (call it after each `optimizer.step()`).

- noam: the paper's warmup then inverse square root,
  factor(s) = scale * d_model^-0.5 * min(s^-0.5, s * warmup^-1.5), with s = max(s, 1)
  (so the very first update uses step 1, as in the Annotated Transformer). Use it
  with initial lr 1.0 to get the paper's absolute rate.
- warmup_cosine: linear warmup from 0, then a half cosine down to min_ratio.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import engine as eg
from engine import Tensor
from engine.errors import ArgumentError, ArgumentTypeError
from engine.validate import validate_init

from .optimizer import Optimizer


def _value(lr: float | Tensor) -> float:
    return float(lr.item()) if isinstance(lr, Tensor) else float(lr)


def noam_factor(step: int, d_model: int, warmup_steps: int, scale: float = 1.0) -> float:
    if warmup_steps <= 0:
        raise ArgumentError(f"noam: warmup_steps must be > 0, got {warmup_steps}")
    s = max(int(step), 1)
    return scale * d_model ** -0.5 * min(s ** -0.5, s * warmup_steps ** -1.5)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int,
                         min_ratio: float = 0.0) -> float:
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise ArgumentError(f"warmup_cosine: need 0 <= warmup_steps <= total_steps and total_steps "
                            f"> 0, got warmup_steps={warmup_steps}, total_steps={total_steps}")
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LambdaLR:
    """lr of group i = initial_lr_i * lr_lambda(step)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        validate_init(cls)

    def __init__(self, optimizer: Optimizer, lr_lambda: Callable[[int], float],
                 last_epoch: int = -1) -> None:
        if not callable(lr_lambda):
            raise ArgumentTypeError(f"{type(self).__name__}: lr_lambda must be callable, got "
                            f"{type(lr_lambda).__name__}")
        if not isinstance(optimizer, Optimizer):
            raise ArgumentTypeError(f"{type(self).__name__}: expected an nn.optim Optimizer, got "
                                    f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self.lr_lambda = lr_lambda
        for g in optimizer.param_groups:
            if last_epoch == -1:
                g.setdefault("initial_lr", _value(g["lr"]))
            elif "initial_lr" not in g:
                raise KeyError(f"{type(self).__name__}: resuming (last_epoch={last_epoch}) needs "
                               f"'initial_lr' in every parameter group")
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    def get_lr(self) -> list[float]:
        f = self.lr_lambda(self.last_epoch)
        return [base * f for base in self.base_lrs]

    def _apply(self) -> None:
        for g, lr in zip(self.optimizer.param_groups, self.get_lr()):
            if isinstance(g["lr"], Tensor):       # in place: a jit-compiled step reads it afresh
                with eg.no_grad():
                    g["lr"][...] = lr
            else:
                g["lr"] = lr

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [_value(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = int(state["last_epoch"])
        self.base_lrs = list(state["base_lrs"])
        self._apply()


class NoamLR(LambdaLR):
    """The schedule of "Attention Is All You Need" (section 5.3)."""

    def __init__(self, optimizer: Optimizer, d_model: int, warmup_steps: int = 4000,
                 scale: float = 1.0, last_epoch: int = -1) -> None:
        noam_factor(1, d_model, warmup_steps, scale)          # validate now
        self.d_model, self.warmup_steps, self.scale = d_model, warmup_steps, scale
        super().__init__(optimizer, self._factor, last_epoch)

    def _factor(self, step: int) -> float:
        return noam_factor(step, self.d_model, self.warmup_steps, self.scale)


class WarmupCosineLR(LambdaLR):
    """Linear warmup to the initial lr, then cosine decay to min_ratio * initial lr."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int,
                 min_ratio: float = 0.0, last_epoch: int = -1) -> None:
        warmup_cosine_factor(0, warmup_steps, total_steps, min_ratio)
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        super().__init__(optimizer, self._factor, last_epoch)

    def _factor(self, step: int) -> float:
        return warmup_cosine_factor(step, self.warmup_steps, self.total_steps, self.min_ratio)


validate_init(LambdaLR)

__all__ = ["LambdaLR", "NoamLR", "WarmupCosineLR", "noam_factor", "warmup_cosine_factor"]
