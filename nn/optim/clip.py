"""Gradient clipping (in place, on .grad), as torch.nn.utils."""
from __future__ import annotations

import math
from typing import Iterable

import engine as eg
from engine import Tensor
from engine.errors import GradError
from engine.validate import validated


def _with_grad(parameters: Iterable[Tensor] | Tensor) -> list[Tensor]:
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    return [p for p in params if p.grad is not None]


@validated
def clip_grad_norm_(parameters: Iterable[Tensor] | Tensor, max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
    """Scale all gradients together so that their joint norm is at most max_norm.

    Returns the norm before clipping (a 0-d tensor). As torch: the scale is
    min(1, max_norm / (norm + 1e-6)), computed with tensor ops (no host sync
    unless error_if_nonfinite).
    """
    params = _with_grad(parameters)
    grads = [p.grad for p in params]
    if not grads:
        return eg.tensor(0.0)
    with eg.no_grad():
        if math.isinf(norm_type):
            norms = [g.abs().max() for g in grads]
            total = norms[0]
            for n in norms[1:]:
                total = eg.maximum(total, n)
        else:
            acc = None
            for g in grads:
                s = (g.abs() ** norm_type).sum() if norm_type != 2.0 else (g * g).sum()
                acc = s if acc is None else acc + s
            total = acc.sqrt() if norm_type == 2.0 else acc ** (1.0 / norm_type)
        if error_if_nonfinite and not math.isfinite(total.item()):
            raise GradError(f"clip_grad_norm_: the total norm of the gradients is {total.item()}; "
                            f"pass error_if_nonfinite=False to clip anyway")
        coef = eg.minimum(max_norm / (total + 1e-6), 1.0)
        for p in params:        # out of place: a .grad may be a read-only broadcast view
            p.grad = p.grad * coef
    return total


@validated
def clip_grad_value_(parameters: Iterable[Tensor] | Tensor, clip_value: float) -> None:
    """Clamp every gradient element to [-clip_value, clip_value]."""
    with eg.no_grad():
        for p in _with_grad(parameters):
            p.grad = p.grad.clip(-clip_value, clip_value)
