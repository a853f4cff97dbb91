"""Making tensors: from data, from other libraries, and from nothing. (`tensor` and
`transfer`, which Tensor's own methods use, are defined with Tensor in engine/tensor.py.)"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

import ops
from ops.dtypes import as_dtype
from ops.errors import ArgumentError, DeviceError

from .state import DEFAULT_FLOAT, get_backend
from .tensor import Tensor, tensor, transfer  # noqa: F401  (made with Tensor; public here)
from .validate import integer, nonnegative_int

float16, float32, float64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
int8, int16, int32, int64 = (np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64))
uint8, bool_ = np.dtype(np.uint8), np.dtype(bool)


def from_numpy(arr: np.ndarray) -> Tensor:
    """A CPU tensor sharing memory with `arr`."""
    return Tensor(np.asarray(arr), get_backend("cpu"))


def from_dlpack(obj: Any) -> Tensor:
    """A tensor sharing memory with any DLPack producer (NumPy, CuPy, PyTorch)."""
    device_type, device_id = obj.__dlpack_device__() if hasattr(obj, "__dlpack_device__") else (1, 0)
    if device_type == 1:                      # kDLCPU
        return Tensor(np.from_dlpack(obj), get_backend("cpu"))
    if device_type not in (2, 13):            # kDLCUDA, kDLCUDAManaged
        raise DeviceError(f"from_dlpack: the producer's memory is on DLPack device type "
                          f"{device_type}; only CPU (1) and CUDA (2, 13) memory can be shared")
    be = get_backend("cuda" if int(device_id) == 0 else f"cuda:{int(device_id)}")
    return Tensor(be.from_dlpack(obj), be)


def _dims(shape: Sequence[Any], where: str) -> tuple:
    """A shape as ints >= 0 (2.5 or -1 is an error, not a silently different shape)."""
    return tuple(nonnegative_int(f"shape[{i}]", d, where) for i, d in enumerate(shape))


def _shape(shape: Sequence[Any], where: str = "zeros") -> tuple:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, np.ndarray)):
        shape = tuple(shape[0])
    return _dims(shape, where)


def full(shape: Any, value: Any, dtype: Any = None, device: str = "cpu",
         requires_grad: bool = False) -> Tensor:
    shape = _dims((shape,) if isinstance(shape, (int, np.integer)) else tuple(shape), "full")
    if dtype is None:
        dtype = DEFAULT_FLOAT if isinstance(value, float) else np.asarray(value).dtype
    t = ops.REGISTRY["full"](shape=shape, value=value, dtype=as_dtype(dtype), device=device)
    return t.requires_grad_(True) if requires_grad else t


def zeros(*shape: Any, dtype: Any = None, device: str = "cpu", requires_grad: bool = False) -> Tensor:
    return full(_shape(shape), 0.0, dtype or DEFAULT_FLOAT, device, requires_grad)


def ones(*shape: Any, dtype: Any = None, device: str = "cpu", requires_grad: bool = False) -> Tensor:
    return full(_shape(shape, "ones"), 1.0, dtype or DEFAULT_FLOAT, device, requires_grad)


def zeros_like(t: Tensor, dtype: Any = None) -> Tensor:
    return full(t.shape, 0, dtype or t.dtype, t.device)


def ones_like(t: Tensor, dtype: Any = None) -> Tensor:
    return full(t.shape, 1, dtype or t.dtype, t.device)


def full_like(t: Tensor, value: Any, dtype: Any = None) -> Tensor:
    return full(t.shape, value, dtype or t.dtype, t.device)


def arange(start: Any, stop: Any = None, step: Any = 1, dtype: Any = None,
           device: str = "cpu") -> Tensor:
    if stop is None:
        start, stop = 0, start
    if step == 0:
        raise ArgumentError(f"arange: step must not be 0 (start={start}, stop={stop})")
    if dtype is None:
        dtype = np.int64 if all(isinstance(v, int) for v in (start, stop, step)) else DEFAULT_FLOAT
    return ops.REGISTRY["arange"](start=start, stop=stop, step=step, dtype=as_dtype(dtype), device=device)


def eye(n: int, m: int | None = None, dtype: Any = None, device: str = "cpu") -> Tensor:
    n = nonnegative_int("n", n, "eye")
    m = None if m is None else nonnegative_int("m", m, "eye")
    rows = arange(n, device=device).reshape(n, 1)
    cols = arange(n if m is None else m, device=device).reshape(1, -1)
    return (rows == cols).to(dtype=dtype or DEFAULT_FLOAT)


def randn(*shape: Any, dtype: Any = None, device: str = "cpu", requires_grad: bool = False) -> Tensor:
    """Standard normal samples from the device's generator (see manual_seed)."""
    t = ops.REGISTRY["random_normal"](shape=_shape(shape, "randn"), dtype=as_dtype(dtype or DEFAULT_FLOAT),
                                      device=device)
    return t.requires_grad_(True) if requires_grad else t


def rand(*shape: Any, dtype: Any = None, device: str = "cpu", requires_grad: bool = False) -> Tensor:
    """Uniform samples in [0, 1)."""
    t = ops.REGISTRY["random_uniform"](shape=_shape(shape, "rand"), dtype=as_dtype(dtype or DEFAULT_FLOAT),
                                       device=device)
    return t.requires_grad_(True) if requires_grad else t


def randint(low: int, high: int, shape: Sequence[int], device: str = "cpu") -> Tensor:
    low, high = integer("low", low, "randint"), integer("high", high, "randint")
    if low >= high:
        raise ArgumentError(f"randint: need low < high, got low={low}, high={high}")
    u = rand(*_shape((shape,), "randint"), dtype=float64, device=device)
    return (u * (high - low) + low).to(dtype=int64).clip(low, high - 1)
