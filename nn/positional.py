"""Position information: the paper's fixed sinusoids, or a learned table."""
from __future__ import annotations

from typing import Any

import numpy as np

import engine as eg
from engine import Tensor
from engine.errors import ShapeError

from . import init
from .layers import Dropout
from .module import Module
from .parameter import Parameter


def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...), in float64.

    Host-side constant (computed once at construction, like an initializer).
    An odd d_model gets one more sine column than cosine columns.
    """
    pos = np.arange(max_len, dtype=np.float64)[:, None]
    two_i = np.arange(0, d_model, 2, dtype=np.float64)
    angle = pos / np.power(10000.0, two_i / d_model)
    pe = np.zeros((max_len, d_model), dtype=np.float64)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle[:, : d_model // 2])
    return pe


def _check_positions(layer: str, x: Tensor, d_model: int, offset: int, max_len: int) -> int:
    if x.ndim < 2 or x.shape[-1] != d_model:
        raise ShapeError(f"{layer}: expected input (batch, time, {d_model}), got shape "
                         f"{tuple(x.shape)}")
    t = x.shape[-2]
    if offset < 0 or offset + t > max_len:
        raise ShapeError(f"{layer}: positions {offset}..{offset + t - 1} exceed max_len={max_len}; "
                         f"build the layer with a larger max_len")
    return t


class PositionalEncoding(Module):
    """x + PE[offset : offset + T] with the fixed sinusoids of "Attention Is All You Need".

    The table is a non-persistent buffer (computed in float64, stored in `dtype`),
    so it follows `.to(device)` but is not saved in checkpoints. Dropout is applied
    to the sum, as in the paper.
    """

    def __init__(self, d_model: int, max_len: int = 5000, dropout: float = 0.0,
                 dtype: Any = None, device: str = "cpu") -> None:
        super().__init__()
        self.d_model, self.max_len = int(d_model), int(max_len)
        table = sinusoidal_table(max_len, d_model).astype(dtype or eg.float32)
        self.register_buffer("pe", eg.tensor(table, device=device), persistent=False)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        t = _check_positions("PositionalEncoding", x, self.d_model, offset, self.max_len)
        return self.dropout(x + self.pe[offset: offset + t])

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}"


class LearnedPositionalEmbedding(Module):
    """x + W[offset : offset + T] with a learned (max_len, d_model) table (GPT/BERT style,
    init N(0, 0.02^2))."""

    def __init__(self, max_len: int, d_model: int, dropout: float = 0.0, init_std: float = 0.02,
                 dtype: Any = None, device: str = "cpu") -> None:
        super().__init__()
        self.d_model, self.max_len = int(d_model), int(max_len)
        self.init_std = float(init_std)
        self.weight = Parameter(eg.zeros(max_len, d_model, dtype=dtype or eg.float32, device=device))
        self.dropout = Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.normal_(self.weight, 0.0, self.init_std)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        t = _check_positions("LearnedPositionalEmbedding", x, self.d_model, offset, self.max_len)
        return self.dropout(x + self.weight[offset: offset + t])

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, d_model={self.d_model}"
