"""engine: a spec-driven tensor/autograd engine.

    import engine as eg
    x = eg.tensor([[1.0, 2.0]], requires_grad=True)
    (x @ x.T).sum().backward()

`from engine import nn` gives the neural-network library built on it.
"""
from __future__ import annotations

from typing import Any

import ops

from . import autograd, dispatch, tensor as _tensor_module  # noqa: F401  (dispatch installs the interpreter)
from .autograd import grad as autograd_grad
from .autograd import grad_fn as grad
from .autograd import value_and_grad
from .creation import (arange, bool_, eye, float16, float32, float64, from_dlpack, from_numpy,
                       full, full_like, int8, int16, int32, int64, ones, ones_like, rand, randint,
                       randn, tensor, uint8, zeros, zeros_like)
from .errors import (DeviceError, DTypeError, EngineError, GradcheckError, GradError, OpError,
                     ShapeError, TraceError)
from .functional import *  # noqa: F401,F403
from .functional import abs, max, min, pow, sum  # noqa: F401  (shadow builtins on purpose)
from .compiler import jit
from . import distributed
from .gradcheck import gradcheck
from .profiler import profile
from .state import (autocast, enable_grad, fold_in_rng, get_rng_state, is_grad_enabled, manual_seed,
                    no_grad, set_grad_enabled, set_rng_state)
from .tensor import Tensor, _operand
from .threads import get_num_threads, set_num_threads
from . import symbolic
from .symbolic import verify_gradients

# The one call from Tensor up the layering (docs/design.md, "Layering"): Tensor.backward
# runs autograd, which is built on Tensor.
_tensor_module.set_backward(autograd.backward)


def __getattr__(name: str) -> Any:
    if name == "nn":      # `from engine import nn`: nn is built on engine, so named on first use
        import nn
        return nn
    op = ops.REGISTRY.get(name)
    if op is not None:                # any other registered op: eg.<name>(tensors..., **params)
        return _registered(op)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


def _registered(op: Any) -> Any:
    """A function calling op `op` with Python numbers and arrays taken as tensors."""
    def call(*args: Any, **params: Any) -> Any:
        return op(*(_operand(a) for a in args), **params)
    call.__name__ = call.__qualname__ = op.name
    call.__doc__ = op.doc
    return call
