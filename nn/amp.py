"""Loss scaling for mixed-precision training (with `eg.autocast`).

float16 gradients below ~6e-8 flush to zero. Scaling the loss by S before
backward scales every gradient by S; the scaler divides them back before the
optimizer step, skips steps whose gradients overflowed (inf/NaN), and adapts S:
halve on overflow, double after `growth_interval` clean steps (as torch.amp).
"""
from __future__ import annotations

from typing import Any

import numpy as np

import engine as eg
from engine import Tensor
from engine.validate import validated


class GradScaler:
    @validated
    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 enabled: bool = True) -> None:
        self.scale_value = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.enabled = enabled
        self._good_steps = 0
        self._found_inf: bool | None = None
        self.skipped_steps = 0

    def scale(self, loss: Tensor) -> Tensor:
        """loss * S (computed in float32 so the product does not overflow early)."""
        if not self.enabled:
            return loss
        return loss.to(dtype=eg.float32) * self.scale_value

    def unscale_(self, optimizer: Any) -> bool:
        """Divide every gradient by S in place; returns whether any is inf/NaN."""
        if self._found_inf is not None:
            return self._found_inf
        found = False
        inv = 1.0 / self.scale_value
        with eg.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    g = p.grad.to(dtype=eg.float32) * inv if p.grad.dtype != p.dtype else p.grad * inv
                    p.grad = g.to(dtype=p.dtype)
                    if not found and not bool(np.isfinite(g.numpy()).all()):
                        found = True
        self._found_inf = found
        return found

    def step(self, optimizer: Any) -> bool:
        """Unscale (if not done yet) and step unless the gradients overflowed.
        Returns whether the optimizer stepped."""
        if not self.enabled:
            optimizer.step()
            return True
        found = self.unscale_(optimizer)
        if found:
            self.skipped_steps += 1
        else:
            optimizer.step()
        return not found

    def update(self) -> None:
        """Adapt S after a step: back off on overflow, grow after a run of clean steps."""
        if not self.enabled:
            return
        if self._found_inf:
            self.scale_value *= self.backoff_factor
            self._good_steps = 0
        else:
            self._good_steps += 1
            if self._good_steps >= self.growth_interval:
                self.scale_value *= self.growth_factor
                self._good_steps = 0
        self._found_inf = None

    def state_dict(self) -> dict:
        return dict(scale=self.scale_value, growth_factor=self.growth_factor,
                    backoff_factor=self.backoff_factor, growth_interval=self.growth_interval,
                    good_steps=self._good_steps)

    def load_state_dict(self, state: dict) -> None:
        self.scale_value = float(state["scale"])
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self._good_steps = int(state["good_steps"])
