"""Initializers: fill a tensor in place, drawing from the engine's seeded generators.

Random values come from the tensor's own device (eg.rand/eg.randn), so
`eg.manual_seed(n)` makes model construction reproducible on every backend.

Fan convention: a 2-D tensor is read as (fan_in, fan_out), the layout of
`nn.Linear.weight` here (y = x @ W); that is the transpose of PyTorch's
(out, in). For more dimensions, (..., fan_in, fan_out) with the leading axes
as the receptive field.
"""
from __future__ import annotations

import math

import engine as eg
from engine.errors import ArgumentError
from engine import Tensor
from engine.validate import validated


def _fill(t: Tensor, value: Tensor | float) -> Tensor:
    with eg.no_grad():
        t[...] = value
    return t


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The recommended gain for a nonlinearity (same values as torch.nn.init)."""
    if nonlinearity in ("linear", "identity", "sigmoid", "conv1d", "conv2d"):
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3.0
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1.0 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4.0
    raise ArgumentError(f"calculate_gain: unknown nonlinearity {nonlinearity!r}; expected one of "
                        f"linear, identity, sigmoid, tanh, relu, leaky_relu, selu")


def fans(t: Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight in this library's (..., in, out) layout."""
    if t.ndim < 2:
        raise ArgumentError(f"init: fan in/out need a tensor with at least 2 dimensions, got shape "
                            f"{tuple(t.shape)}")
    receptive = 1
    for d in t.shape[:-2]:
        receptive *= d
    return t.shape[-2] * receptive, t.shape[-1] * receptive


def constant_(t: Tensor, value: float) -> Tensor:
    return _fill(t, float(value))


def zeros_(t: Tensor) -> Tensor:
    return _fill(t, 0.0)


def ones_(t: Tensor) -> Tensor:
    return _fill(t, 1.0)


@validated
def uniform_(t: Tensor, a: float = 0.0, b: float = 1.0) -> Tensor:
    """Fill with U(a, b)."""
    if not a <= b:
        raise ArgumentError(f"uniform_: need a <= b, got a={a}, b={b}")
    u = eg.rand(*t.shape, dtype=t.dtype, device=t.device)
    return _fill(t, u * (b - a) + a)


@validated
def normal_(t: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """Fill with N(mean, std^2)."""
    return _fill(t, eg.randn(*t.shape, dtype=t.dtype, device=t.device) * std + mean)


@validated
def xavier_uniform_(t: Tensor, gain: float = 1.0) -> Tensor:
    """Glorot & Bengio: U(-a, a) with a = gain * sqrt(6 / (fan_in + fan_out))."""
    fi, fo = fans(t)
    a = gain * math.sqrt(6.0 / (fi + fo))
    return uniform_(t, -a, a)


@validated
def xavier_normal_(t: Tensor, gain: float = 1.0) -> Tensor:
    fi, fo = fans(t)
    return normal_(t, 0.0, gain * math.sqrt(2.0 / (fi + fo)))


def _kaiming_std(t: Tensor, a: float, mode: str, nonlinearity: str) -> float:
    if mode not in ("fan_in", "fan_out"):
        raise ArgumentError(f"kaiming init: mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fi, fo = fans(t)
    fan = fi if mode == "fan_in" else fo
    return calculate_gain(nonlinearity, a) / math.sqrt(fan)


@validated
def kaiming_uniform_(t: Tensor, a: float = 0.0, mode: str = "fan_in",
                     nonlinearity: str = "leaky_relu") -> Tensor:
    """He et al.: U(-b, b) with b = gain * sqrt(3 / fan). With a=sqrt(5) this is the
    default Linear init, b = 1/sqrt(fan_in)."""
    bound = math.sqrt(3.0) * _kaiming_std(t, a, mode, nonlinearity)
    return uniform_(t, -bound, bound)


@validated
def kaiming_normal_(t: Tensor, a: float = 0.0, mode: str = "fan_in",
                    nonlinearity: str = "leaky_relu") -> Tensor:
    return normal_(t, 0.0, _kaiming_std(t, a, mode, nonlinearity))


# Glorot is Xavier.
glorot_uniform_ = xavier_uniform_
glorot_normal_ = xavier_normal_
