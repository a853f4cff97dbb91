"""Loss modules: the nn.functional losses with their options fixed at construction
(PyTorch's names). Classes are on the last axis of the input, as in nn.functional."""
from __future__ import annotations

from engine import Tensor

from . import functional as F
from .module import Module


class MSELoss(Module):
    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(input, target, self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class NLLLoss(Module):
    """Negative log-likelihood of integer targets given log-probabilities (..., C)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing = float(label_smoothing)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.nll_loss(input, target, self.ignore_index, self.reduction, self.label_smoothing)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class CrossEntropyLoss(NLLLoss):
    """Cross-entropy of integer targets against unnormalised logits (..., C)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, self.ignore_index, self.label_smoothing,
                               self.reduction)


__all__ = ["MSELoss", "NLLLoss", "CrossEntropyLoss"]
