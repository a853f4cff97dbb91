"""Source ops: tensors made from nothing (constants, ranges, random draws).

They take no tensor inputs, so they name their device; random ops draw from that
device's generator (seeded by `engine.manual_seed`) and are never merged by CSE.
"""
from __future__ import annotations

import numpy as np

from .spec import Op, register


def _shape_dtype(shape: tuple, dtype: object, **_: object) -> tuple:
    return tuple(shape), np.dtype(dtype)


full = register(Op(
    "full", kind="source",
    forward=lambda be, shape, value, dtype, device: be.full(shape, value, dtype),
    infer=lambda shape, value, dtype, device: _shape_dtype(shape, dtype),
    sample=lambda rng: [([], dict(shape=(2, 3), value=1.5, dtype=np.dtype(np.float64), device="cpu"))],
    reference=lambda shape, value, dtype, device: np.full(shape, value, dtype)))


def _arange_len(start: float, stop: float, step: float) -> int:
    return max(0, int(np.ceil((stop - start) / step)))


arange = register(Op(
    "arange", kind="source",
    forward=lambda be, start, stop, step, dtype, device: be.arange(start, stop, step, dtype),
    infer=lambda start, stop, step, dtype, device: ((_arange_len(start, stop, step),), np.dtype(dtype)),
    sample=lambda rng: [([], dict(start=0, stop=5, step=1, dtype=np.dtype(np.int64), device="cpu"))],
    reference=lambda start, stop, step, dtype, device: np.arange(start, stop, step, dtype=dtype)))

random_normal = register(Op(
    "random_normal", kind="random", random=True,
    forward=lambda be, shape, dtype, device: be.random_normal(shape, dtype),
    infer=lambda shape, dtype, device: _shape_dtype(shape, dtype)))

random_uniform = register(Op(
    "random_uniform", kind="random", random=True,
    forward=lambda be, shape, dtype, device: be.random_uniform(shape, dtype),
    infer=lambda shape, dtype, device: _shape_dtype(shape, dtype)))

bernoulli = register(Op(
    "bernoulli", kind="random", random=True,
    forward=lambda be, shape, p, dtype, device: be.bernoulli(shape, p, dtype),
    infer=lambda shape, p, dtype, device: _shape_dtype(shape, dtype),
    doc="1 with probability p else 0: the keep-mask of dropout"))
