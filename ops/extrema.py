"""The max reduction. Its VJP compares the input with the maxima (ties share the
gradient), so it sits above the elementwise ops, unlike `sum` (ops/reduce.py)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .elementwise import div, eq, mul
from .movement import cast
from .reduce import infer_reduction, keepdims_form, sample_reduction, sum
from .spec import Op, register


def _max_vjp(g: Any, out: Any, inputs: tuple, needs: tuple, axis: Any, keepdims: bool) -> tuple:
    """Gradient to the maxima; ties share it evenly."""
    (x,) = inputs
    hit = cast(eq(x, keepdims_form(out, x.shape, axis, keepdims)), dtype=x.dtype)
    count = sum(hit, axis=axis, keepdims=True)
    return (mul(keepdims_form(g, x.shape, axis, keepdims), div(hit, count)),)


max = register(Op(
    "max", kind="reduction", reduction="max",
    forward=lambda be, x, axis, keepdims: be.max(x, axis, keepdims),
    infer=lambda x, axis, keepdims: (infer_reduction("max", x, axis, keepdims), np.dtype(x.dtype)),
    vjp=_max_vjp, sample=sample_reduction, saves=(0, -1),
    reference=lambda x, axis, keepdims: np.max(x, axis=axis, keepdims=keepdims)))
