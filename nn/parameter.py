"""Parameter: a leaf Tensor that a Module registers and an optimizer updates.

It is an engine Tensor (ops accept it unchanged, results are plain Tensors), so
nothing in the engine needs to know about it; the subclass only marks "this is
learnable state" for Module registration and says so in its repr.
"""
from __future__ import annotations

from typing import Any

import engine as eg
from engine import Tensor


class Parameter(Tensor):
    """A Tensor that requires grad by default and is registered by Module.__setattr__.

    `Parameter(t)` shares `t`'s memory (like torch.nn.Parameter); arrays and lists
    are copied into a new CPU tensor.
    """

    __slots__ = ()

    def __init__(self, data: Any, requires_grad: bool = True) -> None:
        if not isinstance(data, Tensor):
            data = eg.tensor(data)
        super().__init__(data._data, data._backend, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()

    def __deepcopy__(self, memo: dict) -> "Parameter":
        """A copy on the same device (the default deepcopy would clone the backend object)."""
        if id(self) in memo:
            return memo[id(self)]
        new = Parameter(eg.tensor(self), requires_grad=self.requires_grad)
        if self.grad is not None:
            new.grad = eg.tensor(self.grad)
        memo[id(self)] = new
        return new
