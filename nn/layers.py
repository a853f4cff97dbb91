"""Basic layers: Linear, Embedding, LayerNorm, Dropout, activations, FeedForward.

Constructor arguments are checked by name (engine.validate.RULES, applied by
Module.__init_subclass__), so the layers here only check what spans arguments."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

import engine as eg
from engine import Tensor
from engine.dispatch import check_values
from engine.errors import ArgumentError, DTypeError, ShapeError
from engine.validate import positive_int

from . import functional as F
from . import init
from .arrays import to_numpy
from .module import Module
from .parameter import Parameter


def _empty(*shape: int, dtype: Any = None, device: str = "cpu") -> Parameter:
    return Parameter(eg.zeros(*shape, dtype=dtype or eg.float32, device=device))


def _check_features(layer: str, x: Tensor, expected: int) -> None:
    if x.ndim == 0 or x.shape[-1] != expected:
        raise ShapeError(f"{layer}: expected input (..., {expected}), got shape {tuple(x.shape)}")


class Linear(Module):
    """y = x @ weight + bias, with weight of shape (in_features, out_features).

    This is the transpose of torch.nn.Linear's (out, in) weight: it is the layout of
    the benchmark spec and avoids a transposed matmul operand. `state_dict()` is
    therefore not interchangeable with PyTorch's; use `load_torch(weight, bias)` or
    `nn.load_torch_state_dict` to import torch weights. Default init as PyTorch:
    U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: Any = None, device: str = "cpu") -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = _empty(in_features, out_features, dtype=dtype, device=device)
        if bias:
            self.bias = _empty(out_features, dtype=dtype, device=device)
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        _check_features("Linear", x, self.in_features)
        y = x @ self.weight
        return y if self.bias is None else y + self.bias

    def load_torch(self, weight: Any, bias: Any = None) -> "Linear":
        """Load torch.nn.Linear weights: `weight` is (out, in) and is transposed here."""
        w = to_numpy(weight)
        if w.shape != (self.out_features, self.in_features):
            raise ShapeError(f"Linear.load_torch: torch weight of shape {w.shape} does not fit "
                             f"Linear({self.in_features}, {self.out_features}), which expects "
                             f"({self.out_features}, {self.in_features})")
        state = {"weight": w.T}
        if self.bias is not None:
            state["bias"] = to_numpy(bias) if bias is not None else np.zeros(self.out_features)
        self.load_state_dict(state)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


class Embedding(Module):
    """A lookup table of `num_embeddings` vectors; `padding_idx` gets a zero vector that
    receives no gradient (as in PyTorch). Default init N(0, 1), or N(0, init_std^2)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 init_std: float = 1.0, dtype: Any = None, device: str = "cpu") -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ArgumentError(f"Embedding: padding_idx {padding_idx} is outside the table of "
                                    f"{num_embeddings} entries")
            padding_idx %= num_embeddings
        self.padding_idx = padding_idx
        self.init_std = float(init_std)
        self.weight = _empty(num_embeddings, embedding_dim, dtype=dtype, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.normal_(self.weight, 0.0, self.init_std)
        if self.padding_idx is not None:
            with eg.no_grad():
                self.weight[self.padding_idx] = 0.0

    def forward(self, idx: Tensor) -> Tensor:
        if np.dtype(idx.dtype).kind not in "iu":
            raise DTypeError(f"Embedding: indices must be integer, got {idx.dtype} "
                             f"(shape {tuple(idx.shape)})")
        n = self.num_embeddings

        def check_indices(values: np.ndarray) -> None:
            if values.size and (values.min() < 0 or values.max() >= n):
                bad = values[(values < 0) | (values >= n)].flat[0]
                raise ShapeError(f"Embedding: index {int(bad)} is outside [0, {n}) "
                                 f"(input shape {tuple(idx.shape)})")
        check_values(idx, check_indices)           # under eg.jit: at every call
        out = self.weight[idx]
        if self.padding_idx is not None and self.weight.requires_grad:
            # Same values, but the padding row's lookups are constants: it gets no gradient.
            keep = (idx != self.padding_idx).reshape(*idx.shape, 1)
            out = eg.where(keep, out, eg.stop_gradient(out))
        return out

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}"


class LayerNorm(Module):
    """Normalise over the last axis (biased variance), then scale and shift."""

    def __init__(self, normalized_shape: int | tuple, eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, dtype: Any = None,
                 device: str = "cpu") -> None:
        super().__init__()
        if isinstance(normalized_shape, (tuple, list)):
            if len(normalized_shape) != 1:
                raise ShapeError(f"LayerNorm: only the last axis can be normalised, got "
                                 f"normalized_shape={tuple(normalized_shape)}")
            normalized_shape = normalized_shape[0]
        self.normalized_shape = (positive_int("normalized_shape", normalized_shape, "LayerNorm"),)
        self.eps = float(eps)
        if elementwise_affine:
            self.weight = Parameter(eg.ones(normalized_shape, dtype=dtype or eg.float32, device=device))
            if bias:
                self.bias = _empty(normalized_shape, dtype=dtype, device=device)
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_features("LayerNorm", x, self.normalized_shape[0])
        return eg.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.weight is not None}"


class Dropout(Module):
    """Zero each element with probability p in training mode (scaling the rest by 1/(1-p))."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return eg.dropout(x, self.p, self.training) if self.p and self.training else x

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Identity(Module):
    def forward(self, x: Any) -> Any:
        return x


class ReLU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return eg.relu(x)


class Tanh(Module):
    def forward(self, x: Tensor) -> Tensor:
        return eg.tanh(x)


class Sigmoid(Module):
    def forward(self, x: Tensor) -> Tensor:
        return eg.sigmoid(x)


class Softmax(Module):
    """softmax over `dim` (PyTorch's name; no default, as there: say which axis)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return eg.softmax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(Softmax):
    def forward(self, x: Tensor) -> Tensor:
        return eg.log_softmax(x, self.dim)


class GELU(Module):
    """GELU, exact (erf) or approximate='tanh'."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        F.activation_fn("gelu" if approximate == "none" else "gelu_tanh")
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return eg.gelu(x, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class FeedForward(Module):
    """The position-wise feed-forward network: linear2(dropout(act(linear1(x))))."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float = 0.0,
                 activation: Any = "relu", bias: bool = True, dtype: Any = None,
                 device: str = "cpu") -> None:
        super().__init__()
        self.linear1 = Linear(d_model, dim_feedforward, bias, dtype, device)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias, dtype, device)
        self.activation = F.activation_fn(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))
