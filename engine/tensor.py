"""The Tensor: an array of one backend plus what autograd needs to know about it.

A Tensor holds raw data of its backend (a NumPy array on the CPU, an abstract
value while tracing), whether it requires grad, its accumulated `.grad`, and
`_ctx`, the autograd node that made it. Every operation goes through an op of the
registry, so the active interpreter (eager, tracing) sees all of them.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Iterator

import numpy as np

import ops
from ops import composite as C
from ops.dtypes import as_dtype
from ops.errors import (ArgumentError, ArgumentTypeError, DeviceError, DTypeError, GradError,
                        ShapeError, TraceError)
from ops.shapes import normalize_axis

from .state import DEFAULT_FLOAT, get_backend, grad_mode, interpreters


_TORCH_NAMES = (("dim", "axis"), ("keepdim", "keepdims"))


def _autograd_not_installed(t: "Tensor", *args: Any, **kwargs: Any) -> None:
    raise RuntimeError("Tensor.backward: autograd is not installed; `import engine` first")


# `Tensor.backward` runs autograd, which sits above this module (it makes tensors and
# reads dispatch's graph nodes). Like `ops.set_dispatcher` for op calls, this is the
# one call from Tensor up the layering: engine/__init__.py installs autograd.backward
# here (docs/design.md, "Layering").
_backward: list[Callable[..., None]] = [_autograd_not_installed]


def set_backward(fn: Callable[..., None]) -> None:
    """Install the function `Tensor.backward` calls (done once by `engine`)."""
    _backward[0] = fn


def torch_names(fn: Callable) -> Callable:
    """Accept PyTorch's `dim=` / `keepdim=` as aliases of NumPy's `axis=` / `keepdims=`;
    giving both spellings of one argument is an error, not a silent choice."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if kwargs:
            for torch_name, numpy_name in _TORCH_NAMES:
                if torch_name in kwargs:
                    if kwargs[torch_name] is None:          # not given: keep axis as passed
                        del kwargs[torch_name]
                        continue
                    if numpy_name in kwargs:
                        raise ArgumentError(f"{fn.__name__}: got both {numpy_name}="
                                            f"{kwargs[numpy_name]!r} and {torch_name}="
                                            f"{kwargs[torch_name]!r}; they are one argument, "
                                            f"give one of them")
                    kwargs[numpy_name] = kwargs.pop(torch_name)
        return fn(*args, **kwargs)
    return wrapper


class Tensor:
    __slots__ = ("_data", "_backend", "requires_grad", "grad", "_ctx", "_version",
                 "_retains_grad", "_edge", "__weakref__")
    __array_priority__ = 100          # NumPy defers to our reflected operators

    def __init__(self, data: Any, backend: Any, requires_grad: bool = False) -> None:
        self._data = data
        self._backend = backend
        self.grad: Tensor | None = None
        self._ctx: Any = None
        self._version = [0]
        self._retains_grad = False
        self._edge: Any = None        # this tensor's autograd edge (engine.dispatch.Edge)
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    # -- metadata ------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self._data.shape

    @property
    def dtype(self) -> np.dtype:
        return self._data.dtype

    @property
    def ndim(self) -> int:
        return self._data.ndim

    @property
    def size(self) -> int:
        n = 1
        for d in self._data.shape:
            n *= d
        return n

    @property
    def device(self) -> str:
        return self._backend.name

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    @property
    def grad_fn(self) -> str | None:
        """Name of the op that made this tensor (None for leaves)."""
        return None if self._ctx is None else self._ctx.op.name

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    # -- autograd ------------------------------------------------------------------------------
    def requires_grad_(self, requires_grad: bool = True) -> "Tensor":
        """Mark a leaf as needing gradients (floating dtypes only)."""
        if requires_grad and np.dtype(self.dtype).kind not in "fc":
            raise DTypeError(f"only floating tensors can require gradients; this tensor has "
                             f"dtype {self.dtype} (shape {self.shape})")
        if not requires_grad and self._ctx is not None:
            raise GradError("requires_grad_(False) on a non-leaf tensor: use .detach()")
        self.requires_grad = requires_grad
        return self

    def retain_grad(self) -> "Tensor":
        """Keep .grad on this non-leaf tensor after backward."""
        if not self.requires_grad:
            raise GradError("retain_grad() on a tensor that does not require grad")
        self._retains_grad = True
        edge = self._edge
        if edge is not None:           # graph nodes that refer to it through its edge
            edge._retains_grad = True
            edge._ref = weakref.ref(self)
        return self

    def backward(self, grad: Any = None, retain_graph: bool = False,
                 create_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's .grad (see autograd.backward)."""
        _backward[0](self, grad, retain_graph=retain_graph, create_graph=create_graph)

    def detach(self) -> "Tensor":
        """The same data as a new leaf that does not require grad (shares memory)."""
        t = Tensor(self._data, self._backend)
        t._version = self._version
        return t

    def zero_grad(self) -> None:
        self.grad = None

    def __deepcopy__(self, memo: dict) -> "Tensor":
        """A copy of the data on the same (shared) backend: backends are per-device
        singletons, so the copy mixes freely with other tensors of its device."""
        t = type(self).__new__(type(self))
        Tensor.__init__(t, self._backend.copy(self._data), self._backend)
        t.requires_grad = self.requires_grad
        if self.grad is not None:
            t.grad = self.grad.__deepcopy__(memo)
        memo[id(self)] = t
        return t

    # -- conversion -------------------------------------------------------------------------------
    def _concrete(self, what: str) -> Any:
        if getattr(self._data, "is_abstract", False):
            raise TraceError(
                f"{what} needs a concrete value, but this tensor (shape {self.shape}, dtype "
                f"{self.dtype}) is being traced by jit. Python control flow cannot depend on "
                f"traced values: use eg.where(...) for data-dependent choices, or pass the "
                f"value as a static argument.")
        interpreters.stack[-1].read_host(self)          # a trace freezes what it reads
        return self._backend.to_numpy(self._data)

    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (shares memory on the CPU)."""
        return np.asarray(self._concrete(".numpy()"))

    def item(self) -> Any:
        if self.size != 1:
            raise ShapeError(f".item() needs a tensor with one element, got shape {self.shape}")
        return self.numpy().reshape(()).item()

    def tolist(self) -> Any:
        return self.numpy().tolist()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.numpy()
        if dtype is not None:
            arr = arr.astype(dtype, copy=False)
        return np.array(arr, copy=True) if copy else arr

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self._concrete("__dlpack__").__dlpack__(**kwargs) if self.device == "cpu" \
            else self._data.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple:
        return self._data.__dlpack_device__()

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __index__(self) -> int:
        if np.dtype(self.dtype).kind not in "iu":
            raise DTypeError(f"only integer tensors can be used as an index, got {self.dtype}")
        return int(self.item())

    def __bool__(self) -> bool:
        if self.size != 1:
            raise ShapeError(f"the truth value of a tensor with shape {self.shape} is ambiguous; "
                             f"use .any() or .all()")
        return bool(self._concrete("bool()").reshape(()))

    def to(self, device: Any = None, dtype: Any = None) -> "Tensor":
        """Move to a device and/or cast (`t.to("cuda")`, `t.to(eg.float64)`)."""
        if device is not None and not isinstance(device, str):
            device, dtype = None, device
        out = self
        if dtype is not None and as_dtype(dtype) != self.dtype:
            out = ops.REGISTRY["cast"](out, dtype=as_dtype(dtype))
        if device is not None and device != self.device:
            out = transfer(out, device)
        return out

    def cpu(self) -> "Tensor":
        return self.to("cpu")

    def astype(self, dtype: Any) -> "Tensor":
        return self.to(dtype=dtype)

    def float(self) -> "Tensor":
        return self.to(dtype=np.float32)

    def double(self) -> "Tensor":
        return self.to(dtype=np.float64)

    def long(self) -> "Tensor":
        return self.to(dtype=np.int64)

    def clone(self) -> "Tensor":
        """A copy that stays in the graph (gradient flows back to self)."""
        return _ops.mul(self, 1) if np.dtype(self.dtype).kind != "b" else Tensor(
            self._backend.copy(self._data), self._backend)

    def __repr__(self) -> str:
        try:
            body = np.array2string(self.numpy(), separator=", ", prefix="tensor(")
        except TraceError:
            body = f"<traced {self.shape}>"
        extra = f", dtype={self.dtype}"
        if self.device != "cpu":
            extra += f", device={self.device!r}"
        if self._ctx is not None:
            extra += f", grad_fn={self.grad_fn}"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        return f"tensor({body}{extra})"

    __hash__ = object.__hash__

    # -- arithmetic -----------------------------------------------------------------------------
    def __add__(self, o: Any) -> "Tensor": return _ops.add(self, _operand(o))
    def __radd__(self, o: Any) -> "Tensor": return _ops.add(_operand(o), self)
    def __sub__(self, o: Any) -> "Tensor": return _ops.sub(self, _operand(o))
    def __rsub__(self, o: Any) -> "Tensor": return _ops.sub(_operand(o), self)
    def __mul__(self, o: Any) -> "Tensor": return _ops.mul(self, _operand(o))
    def __rmul__(self, o: Any) -> "Tensor": return _ops.mul(_operand(o), self)
    def __truediv__(self, o: Any) -> "Tensor": return _ops.div(self, _operand(o))
    def __rtruediv__(self, o: Any) -> "Tensor": return _ops.div(_operand(o), self)
    def __pow__(self, o: Any) -> "Tensor": return _ops.pow(self, _operand(o))
    def __rpow__(self, o: Any) -> "Tensor": return _ops.pow(_operand(o), self)
    def __matmul__(self, o: Any) -> "Tensor": return _ops.matmul(self, _operand(o, self))
    def __rmatmul__(self, o: Any) -> "Tensor": return _ops.matmul(_operand(o, self), self)
    def __neg__(self) -> "Tensor": return _ops.neg(self)
    def __pos__(self) -> "Tensor": return self
    def __abs__(self) -> "Tensor": return _ops.abs(self)
    def __eq__(self, o: Any) -> "Tensor": return _ops.eq(self, _operand(o))  # type: ignore[override]
    def __ne__(self, o: Any) -> "Tensor": return _ops.ne(self, _operand(o))  # type: ignore[override]
    def __lt__(self, o: Any) -> "Tensor": return _ops.lt(self, _operand(o))
    def __le__(self, o: Any) -> "Tensor": return _ops.le(self, _operand(o))
    def __gt__(self, o: Any) -> "Tensor": return _ops.gt(self, _operand(o))
    def __ge__(self, o: Any) -> "Tensor": return _ops.ge(self, _operand(o))
    def __and__(self, o: Any) -> "Tensor": return _ops.logical_and(self, _operand(o))
    def __or__(self, o: Any) -> "Tensor": return _ops.logical_or(self, _operand(o))
    def __invert__(self) -> "Tensor": return _ops.logical_not(self)

    # -- in place (data only; never on a tensor that is part of a graph) ---------------------------
    def _inplace(self, name: str, value: Any, index: tuple | None = None) -> "Tensor":
        """`self op= value` or `self[index] = value`, done by the current interpreter."""
        value = _operand(value, self)
        if grad_mode.enabled and (self.requires_grad or getattr(value, "requires_grad", False)):
            what = "a leaf that requires grad" if self.is_leaf and self.requires_grad else \
                "a tensor that is part of an autograd graph"
            raise GradError(
                f"in-place {name} on {what} (shape {self.shape}): its old value may be needed "
                f"by backward. Write it out of place (x = x + y), or wrap the update in "
                f"eg.no_grad() if it is meant to bypass autograd.")
        if isinstance(value, Tensor) and value._backend is not self._backend:
            raise DeviceError(f"in-place {name}: tensor on {self.device}, value on {value.device}")
        interpreters.stack[-1].assign(self, name, value, index)
        self._version[0] += 1
        return self

    def copy_(self, src: Any) -> "Tensor":
        """Overwrite this tensor's values with `src` (broadcast and cast), in place."""
        return self._inplace("copy", src)

    def __iadd__(self, o: Any) -> "Tensor": return self._inplace("+=", o)
    def __isub__(self, o: Any) -> "Tensor": return self._inplace("-=", o)
    def __imul__(self, o: Any) -> "Tensor": return self._inplace("*=", o)
    def __itruediv__(self, o: Any) -> "Tensor": return self._inplace("/=", o)

    def __setitem__(self, index: Any, value: Any) -> None:
        self._inplace("setitem", value, index=parse_index(index, self))

    # -- indexing ---------------------------------------------------------------------------------
    def __getitem__(self, index: Any) -> "Tensor":
        spec, tensors = parse_index(index, self)
        return _ops.getitem(self, *tensors, index=spec)

    def __iter__(self) -> Iterator["Tensor"]:
        for i in range(len(self)):
            yield self[i]

    # -- reductions (axis= or dim=, keepdims= or keepdim=) ------------------------------------------
    @torch_names
    def sum(self, axis: Any = None, keepdims: bool = False) -> "Tensor":
        return _ops.sum(self, axis=normalize_axis("sum", axis, self.ndim), keepdims=keepdims)

    @torch_names
    def max(self, axis: Any = None, keepdims: bool = False) -> "Tensor":
        return _ops.max(self, axis=normalize_axis("max", axis, self.ndim), keepdims=keepdims)

    @torch_names
    def min(self, axis: Any = None, keepdims: bool = False) -> "Tensor":
        return C.min(self, axis, keepdims)

    @torch_names
    def mean(self, axis: Any = None, keepdims: bool = False) -> "Tensor":
        return C.mean(self, axis, keepdims)

    @torch_names
    def var(self, axis: Any = None, keepdims: bool = False, correction: int = 0) -> "Tensor":
        return C.var(self, axis, keepdims, correction)

    @torch_names
    def std(self, axis: Any = None, keepdims: bool = False, correction: int = 0) -> "Tensor":
        return _ops.sqrt(C.var(self, axis, keepdims, correction))

    @torch_names
    def logsumexp(self, axis: Any = -1, keepdims: bool = False) -> "Tensor":
        return C.logsumexp(self, axis, keepdims)

    @torch_names
    def softmax(self, axis: int = -1) -> "Tensor":
        return _ops.softmax(self, axis=normalize_axis("softmax", axis, self.ndim)[0])

    @torch_names
    def log_softmax(self, axis: int = -1) -> "Tensor":
        return _ops.log_softmax(self, axis=normalize_axis("log_softmax", axis, self.ndim)[0])

    @torch_names
    def argmax(self, axis: int | None = None) -> "Tensor":
        """Indices of the maxima (not differentiable; computed on the device)."""
        data = self._concrete("argmax")
        return tensor(np.argmax(np.asarray(data), axis=axis), device=self.device)

    def any(self) -> bool:
        return bool(np.any(self.numpy()))

    def all(self) -> bool:
        return bool(np.all(self.numpy()))

    # -- shape ------------------------------------------------------------------------------------
    def reshape(self, *shape: Any) -> "Tensor":
        shape = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
        return _ops.reshape(self, shape=resolve_shape(tuple(shape), self.size, self.shape))

    def view(self, *shape: Any) -> "Tensor":
        return self.reshape(*shape)

    def flatten(self) -> "Tensor":
        return self.reshape(-1)

    def transpose(self, *dims: Any) -> "Tensor":
        """PyTorch's transpose(dim0, dim1): swap two axes, at every rank. NumPy's readings
        (no argument: reverse all axes; a full permutation) are refused rather than
        guessed, since transpose(0, 1) on a 2-D tensor means 'unchanged' to NumPy: use
        `.T` / `t()` to reverse, `permute(*axes)` to permute."""
        if len(dims) != 2 or not all(_is_int(d) for d in dims):
            raise ArgumentError(
                f"transpose(dim0, dim1) swaps two axes; got transpose{_args_text(dims)} on a "
                f"{self.ndim}-d tensor. Use permute(*axes) for a permutation of every axis, "
                f".T to reverse all axes, or t() for a matrix.")
        return C.swapaxes(self, int(dims[0]), int(dims[1]))

    def permute(self, *axes: Any) -> "Tensor":
        """Reorder the axes: result axis i is input axis axes[i] (NumPy's transpose(axes))."""
        if len(axes) == 1 and not _is_int(axes[0]):
            axes = tuple(axes[0])
        if sorted(int(a) % self.ndim if self.ndim else a for a in axes) != list(range(self.ndim)):
            raise ShapeError(f"permute: {tuple(axes)} is not a permutation of the {self.ndim} "
                             f"axes of a tensor of shape {tuple(self.shape)}")
        return _ops.transpose(self, axes=tuple(int(a) % self.ndim for a in axes))

    def swapaxes(self, a: int, b: int) -> "Tensor":
        return C.swapaxes(self, a, b)

    @property
    def T(self) -> "Tensor":
        """All axes reversed (a matrix's transpose)."""
        return _ops.transpose(self, axes=tuple(range(self.ndim))[::-1])

    def t(self) -> "Tensor":
        """A matrix's transpose; 0-d and 1-d tensors come back as they are (as torch.t)."""
        if self.ndim > 2:
            raise ShapeError(f"t() expects a tensor with at most 2 axes, got shape "
                             f"{tuple(self.shape)}; use transpose(dim0, dim1) or permute(...)")
        return self.T

    def masked_fill(self, mask: "Tensor", value: Any) -> "Tensor":
        """`value` where the boolean `mask` (broadcast to this shape) is True, else self."""
        if not isinstance(mask, Tensor):
            raise ArgumentTypeError(f"masked_fill: mask must be a bool Tensor, got "
                                    f"{type(mask).__name__}")
        if np.dtype(mask.dtype) != np.dtype(bool):
            raise DTypeError(f"masked_fill: mask must have dtype bool, got {mask.dtype} (shape "
                             f"{tuple(mask.shape)})")
        if isinstance(value, Tensor) and value.ndim != 0:
            raise ShapeError(f"masked_fill: value must be a number or a 0-d tensor, got shape "
                             f"{tuple(value.shape)}")
        try:
            fits = np.broadcast_shapes(tuple(mask.shape), tuple(self.shape)) == tuple(self.shape)
        except ValueError:
            fits = False
        if not fits:
            raise ShapeError(f"masked_fill: mask of shape {tuple(mask.shape)} does not broadcast "
                             f"to the tensor's shape {tuple(self.shape)}")
        return C.masked_fill(self, mask, _operand(value, self))

    @torch_names
    def expand_dims(self, axis: int) -> "Tensor":
        if not _is_int(axis):
            raise ArgumentTypeError(f"expand_dims: axis must be an int, got {axis!r}")
        return C.expand_dims(self, int(axis))

    unsqueeze = expand_dims

    @torch_names
    def squeeze(self, axis: Any = None) -> "Tensor":
        return C.squeeze(self, axis)

    def broadcast_to(self, *shape: Any) -> "Tensor":
        shape = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
        return _ops.broadcast_to(self, shape=tuple(shape))

    # -- elementwise functions ------------------------------------------------------------------------
    def exp(self) -> "Tensor": return _ops.exp(self)
    def log(self) -> "Tensor": return _ops.log(self)
    def sqrt(self) -> "Tensor": return _ops.sqrt(self)
    def rsqrt(self) -> "Tensor": return _ops.rsqrt(self)
    def tanh(self) -> "Tensor": return _ops.tanh(self)
    def sigmoid(self) -> "Tensor": return _ops.sigmoid(self)
    def relu(self) -> "Tensor": return _ops.relu(self)
    def abs(self) -> "Tensor": return _ops.abs(self)
    def sign(self) -> "Tensor": return _ops.sign(self)

    def clip(self, lo: float | None = None, hi: float | None = None) -> "Tensor":
        return C.clip(self, lo, hi)


class _OpTable:
    """Attribute access to registered ops: `_ops.add(...)`."""

    def __getattr__(self, name: str) -> Any:
        op = ops.REGISTRY[name]
        setattr(self, name, op)
        return op


_ops = _OpTable()


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _args_text(args: tuple) -> str:
    return "(" + ", ".join(repr(a) for a in args) + ")"


def _operand(o: Any, like: Tensor | None = None) -> Any:
    """Python scalars stay scalars (weakly typed); arrays and lists become tensors."""
    if isinstance(o, Tensor):
        return o
    if isinstance(o, (bool, int, float)):
        return o
    if isinstance(o, np.generic):
        return o.item()
    return tensor(o, device=like.device if like is not None else "cpu")


def _infer_dtype(data: Any) -> np.dtype | None:
    """Python floats become float32 (the default); arrays keep their dtype."""
    if isinstance(data, (np.ndarray, np.generic)) or hasattr(data, "__array_interface__"):
        return None
    arr = np.asarray(data)
    if arr.dtype.kind == "f":
        return DEFAULT_FLOAT
    return None


def tensor(data: Any, dtype: Any = None, device: str = "cpu",
           requires_grad: bool = False) -> Tensor:
    """A new tensor holding a copy of `data` (lists, scalars, NumPy arrays, tensors)."""
    if isinstance(data, Tensor):
        src = data.detach().to(device)
        arr = src._backend.copy(src._data)
        if dtype is not None:
            arr = src._backend.astype(arr, as_dtype(dtype))
        return Tensor(arr, src._backend, requires_grad=requires_grad)
    dtype = None if dtype is None else as_dtype(dtype)
    be = get_backend(device)
    try:
        host = np.array(data, dtype=_infer_dtype(data) if dtype is None else dtype, copy=True)
    except ValueError as e:                      # ragged nesting, unparsable strings
        raise ShapeError(f"tensor: cannot make a tensor of {type(data).__name__} data: "
                         f"{e}") from None
    if host.dtype.kind not in "biufc":
        raise DTypeError(f"tensor: data of NumPy dtype {host.dtype} ({type(data).__name__}) "
                         f"is not numbers; tensors hold bool, integer or floating values")
    return Tensor(be.asarray(host), be, requires_grad=requires_grad)


def transfer(t: Tensor, device: str) -> Tensor:
    """Copy to another device. A leaf stays a leaf (requires_grad kept); moving a tensor
    from the middle of a graph would cut it, so that is refused."""
    if t._ctx is not None and t.requires_grad:
        raise DeviceError(f"cannot move a non-leaf tensor (made by {t.grad_fn}) from {t.device} "
                          f"to {device}: move the leaves (parameters, inputs) before computing")
    target = get_backend(device)
    host = t._backend.to_numpy(t._data)
    return Tensor(target.asarray(host), target, requires_grad=t.requires_grad)


def resolve_shape(shape: tuple, size: int, old: tuple) -> tuple:
    """Fill in one -1 of a reshape target (every entry an int >= -1: 2.5 is not 2)."""
    for d in shape:
        if not _is_int(d):
            raise ArgumentTypeError(f"reshape: sizes must be ints, got {d!r} in {shape}")
        if d < -1:
            raise ShapeError(f"reshape: sizes must be >= 0 (or one -1), got {shape}")
    if shape.count(-1) > 1:
        raise ShapeError(f"reshape: only one -1 allowed, got {shape}")
    if -1 in shape:
        known = 1
        for d in shape:
            if d != -1:
                known *= d
        if known == 0 or size % known:
            raise ShapeError(f"reshape: cannot reshape a tensor of shape {old} ({size} elements) "
                             f"into shape {shape}")
        shape = tuple(size // known if d == -1 else d for d in shape)
    return tuple(int(d) for d in shape)


def parse_index(index: Any, x: Tensor) -> tuple[tuple, list]:
    """A user index -> (static spec, index tensors), see ops.movement."""
    if not isinstance(index, tuple):
        index = (index,)
    spec: list[tuple] = []
    tensors: list[Tensor] = []
    for item in index:
        if item is None:
            spec.append(("none",))
        elif item is Ellipsis:
            spec.append(("ellipsis",))
        elif isinstance(item, slice):
            parts = [None if v is None else int(v) for v in (item.start, item.stop, item.step)]
            spec.append(("slice", *parts))
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            spec.append(("int", int(item)))
        else:
            t = item if isinstance(item, Tensor) else tensor(np.asarray(item), device=x.device)
            if np.dtype(t.dtype) == np.dtype(bool):
                # A boolean mask selects a data-dependent number of elements: resolve it now.
                for nz in np.nonzero(t.numpy()):
                    spec.append(("tensor", len(tensors)))
                    tensors.append(tensor(nz, device=x.device))
                continue
            if np.dtype(t.dtype).kind not in "iu":
                raise DTypeError(f"getitem: index tensors must be integer or bool, got {t.dtype}")
            spec.append(("tensor", len(tensors)))
            tensors.append(t)
    return tuple(spec), tensors

