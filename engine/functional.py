"""NumPy-style functions over tensors: thin wrappers that normalise arguments and
call ops or composites (so every interpreter sees them).

Like NumPy's functions (and the Tensor operators), these accept array-likes (lists,
NumPy arrays, numbers) where a tensor is expected and convert them; nn's modules and
functions, like PyTorch's, take Tensors only. Reductions, softmax and the joining
functions take PyTorch's `dim=` / `keepdim=` as aliases of `axis=` / `keepdims=`."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

import ops
from ops import composite as C
from ops.dtypes import as_dtype
from ops.errors import ArgumentTypeError, ShapeError
from ops.shapes import normalize_axis

from .creation import full, tensor
from .tensor import Tensor, _operand, torch_names
from .validate import nonnegative, positive_int

R = ops.REGISTRY


def _t(x: Any) -> Any:
    return _operand(x)


def add(a: Any, b: Any) -> Tensor: return R["add"](_t(a), _t(b))
def sub(a: Any, b: Any) -> Tensor: return R["sub"](_t(a), _t(b))
def mul(a: Any, b: Any) -> Tensor: return R["mul"](_t(a), _t(b))
def div(a: Any, b: Any) -> Tensor: return R["div"](_t(a), _t(b))
def pow(a: Any, b: Any) -> Tensor: return R["pow"](_t(a), _t(b))
def maximum(a: Any, b: Any) -> Tensor: return R["maximum"](_t(a), _t(b))
def minimum(a: Any, b: Any) -> Tensor: return R["minimum"](_t(a), _t(b))
def matmul(a: Any, b: Any) -> Tensor: return R["matmul"](_t(a), _t(b))
def neg(x: Any) -> Tensor: return R["neg"](_t(x))
def exp(x: Any) -> Tensor: return R["exp"](_t(x))
def log(x: Any) -> Tensor: return R["log"](_t(x))
def sqrt(x: Any) -> Tensor: return R["sqrt"](_t(x))
def rsqrt(x: Any) -> Tensor: return R["rsqrt"](_t(x))
def abs(x: Any) -> Tensor: return R["abs"](_t(x))
def tanh(x: Any) -> Tensor: return R["tanh"](_t(x))
def sigmoid(x: Any) -> Tensor: return R["sigmoid"](_t(x))
def relu(x: Any) -> Tensor: return R["relu"](_t(x))
def erf(x: Any) -> Tensor: return R["erf"](_t(x))
def sign(x: Any) -> Tensor: return R["sign"](_t(x))


def lerp(start: Any, end: Any, weight: Any) -> Tensor:
    """start + weight * (end - start)."""
    return R["lerp"](_t(start), _t(end), _t(weight))


def ema_sq(avg: Any, value: Any, beta: Any) -> Tensor:
    """beta * avg + (1 - beta) * value**2: Adam's second-moment average."""
    return R["ema_sq"](_t(avg), _t(value), _t(beta))


def adam_param(param: Any, m: Any, v: Any, step_size: Any, bc2_sqrt: Any, decay: Any,
               eps: Any) -> Tensor:
    """param * decay - step_size * m / (sqrt(v) / bc2_sqrt + eps): Adam's parameter update."""
    return R["adam_param"](*(_t(a) for a in (param, m, v, step_size, bc2_sqrt, decay, eps)))


def gelu(x: Any, approximate: str = "none") -> Tensor:
    """GELU: exact (erf) form, or approximate="tanh" as in GPT-2."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return R["gelu" if approximate == "none" else "gelu_tanh"](_t(x))


def where(cond: Any, a: Any, b: Any) -> Tensor:
    return R["where"](_t(cond), _t(a), _t(b))


def _x(x: Any) -> Tensor:
    """A tensor argument: tensors as they are, array-likes converted (NumPy's rule)."""
    if isinstance(x, Tensor):
        return x
    return tensor(x)


@torch_names
def sum(x: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    return _x(x).sum(axis, keepdims)


@torch_names
def max(x: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    return _x(x).max(axis, keepdims)


@torch_names
def min(x: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    return C.min(_x(x), axis, keepdims)


@torch_names
def mean(x: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    return C.mean(_x(x), axis, keepdims)


@torch_names
def var(x: Tensor, axis: Any = None, keepdims: bool = False, correction: int = 0) -> Tensor:
    return C.var(_x(x), axis, keepdims, correction)


@torch_names
def logsumexp(x: Tensor, axis: Any = -1, keepdims: bool = False) -> Tensor:
    return C.logsumexp(_x(x), axis, keepdims)


def masked_fill(x: Tensor, mask: Tensor, value: Any) -> Tensor:
    """`value` where the bool `mask` is True, else x (Tensor.masked_fill)."""
    return _x(x).masked_fill(_x(mask), value)


@torch_names
def expand_dims(x: Tensor, axis: int) -> Tensor:
    return C.expand_dims(_x(x), axis)


unsqueeze = expand_dims


@torch_names
def squeeze(x: Tensor, axis: Any = None) -> Tensor:
    return C.squeeze(_x(x), axis)


swapaxes = C.swapaxes
take_along_axis = C.take_along_axis
scaled_dot_product_attention = C.scaled_dot_product_attention
clip = C.clip


@torch_names
def softmax(x: Tensor, axis: int | None = None) -> Tensor:
    """Stable softmax over `axis` (default the last; one fused op, `ops.composite.softmax`
    is its reference)."""
    x = _x(x)
    return R["softmax"](x, axis=normalize_axis("softmax", -1 if axis is None else axis,
                                               x.ndim)[0])


@torch_names
def log_softmax(x: Tensor, axis: int | None = None) -> Tensor:
    x = _x(x)
    return R["log_softmax"](x, axis=normalize_axis("log_softmax", -1 if axis is None else axis,
                                                   x.ndim)[0])


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """Normalise over the last axis, then scale by `weight` and shift by `bias`."""
    eps = nonnegative("eps", eps, "layer_norm")
    x = _x(x)
    if weight is None or bias is None:
        d = x.shape[-1]
        weight = full((d,), 1.0, x.dtype, x.device) if weight is None else weight
        bias = full((d,), 0.0, x.dtype, x.device) if bias is None else bias
    return R["layer_norm"](x, weight, bias, eps=float(eps))


def one_hot(indices: Tensor, num_classes: int, dtype: Any = np.float32) -> Tensor:
    return C.one_hot(_x(indices), positive_int("num_classes", num_classes, "one_hot"), dtype)


def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    return C.dropout(x, p, training)


def reshape(x: Tensor, shape: Sequence[int]) -> Tensor:
    return x.reshape(tuple(shape))


def transpose(x: Tensor, dim0: int, dim1: int) -> Tensor:
    """Swap two axes (PyTorch's rule; see Tensor.transpose). `permute` reorders all."""
    return _x(x).transpose(dim0, dim1)


def permute(x: Tensor, axes: Sequence[int]) -> Tensor:
    return _x(x).permute(tuple(axes))


def t(x: Tensor) -> Tensor:
    return _x(x).t()


def broadcast_to(x: Tensor, shape: Sequence[int]) -> Tensor:
    return R["broadcast_to"](x, shape=tuple(shape))


def _sequence(where: str, xs: Any) -> list:
    if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
        raise ArgumentTypeError(f"{where}: expected a list or tuple of tensors, got {type(xs).__name__}")
    if not xs:
        raise ShapeError(f"{where}: needs at least one tensor")
    return [_x(x) for x in xs]


@torch_names
def concatenate(xs: Sequence[Tensor], axis: int = 0) -> Tensor:
    xs = _sequence("concatenate", xs)
    return R["concatenate"](*xs, axis=normalize_axis("concatenate", axis, xs[0].ndim)[0])


cat = concatenate


@torch_names
def stack(xs: Sequence[Tensor], axis: int = 0) -> Tensor:
    return C.stack(_sequence("stack", xs), axis)


@torch_names
def split(x: Tensor, sections: int | Sequence[int], axis: int = 0) -> list:
    return C.split(_x(x), sections, axis)


def pad(x: Tensor, pad_width: Any, value: float = 0.0) -> Tensor:
    """Constant padding, NumPy's pad_width: ((before, after), ...) or one pair for all axes."""
    if isinstance(pad_width, int):
        pad_width = ((pad_width, pad_width),) * x.ndim
    elif len(pad_width) == 2 and all(isinstance(p, int) for p in pad_width):
        pad_width = (tuple(pad_width),) * x.ndim
    return R["pad"](x, pad_width=tuple(tuple(int(v) for v in p) for p in pad_width), value=value)


def stop_gradient(x: Tensor) -> Tensor:
    return R["stop_gradient"](x)


def cast(x: Tensor, dtype: Any) -> Tensor:
    return R["cast"](x, dtype=as_dtype(dtype))
