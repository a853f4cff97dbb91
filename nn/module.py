"""Module: a tree of parameters, buffers and submodules, as in PyTorch.

Assigning a Parameter or a Module to an attribute registers it (in insertion
order, which fixes the order of `named_parameters()` and of a checkpoint). The
value also stays in the instance `__dict__`, so reading `self.linear` in a
forward pass is a plain attribute lookup, not a `__getattr__` fallback.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

import engine as eg
from ops.dtypes import as_dtype
from engine import Tensor
from engine.creation import transfer
from engine.errors import ArgumentTypeError, DTypeError, EngineError, ShapeError
from engine.state import get_backend
from engine.validate import check_tensors, validate_init

from .parameter import Parameter


class StateDictError(EngineError, KeyError):
    """A state dict whose names do not match the module's (missing or unexpected keys)."""

    def __str__(self) -> str:          # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class IncompatibleKeys(NamedTuple):
    missing_keys: list
    unexpected_keys: list


def _swap_tensor_data(t: Tensor, new: Tensor) -> None:
    """Point `t` at `new`'s data and device, keeping the object (optimizers hold it)."""
    t._data = new._data
    t._backend = new._backend
    t._version[0] += 1


class Module:
    """Base class of every layer and model. Subclasses define `forward`."""

    training: bool

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every subclass's constructor checks its arguments (engine.validate.RULES)."""
        super().__init_subclass__(**kwargs)
        validate_init(cls)

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # -- registration ------------------------------------------------------------------
    def _registries(self) -> tuple[dict, dict, dict]:
        try:
            return self.__dict__["_parameters"], self.__dict__["_buffers"], self.__dict__["_modules"]
        except KeyError:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                                 f"before assigning parameters or submodules") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, (Parameter, Module)) or name in self.__dict__.get("_parameters", ()) \
                or name in self.__dict__.get("_modules", ()) or name in self.__dict__.get("_buffers", ()):
            params, bufs, mods = self._registries()
            if isinstance(value, (Parameter, Module)):
                target = params if isinstance(value, Parameter) else mods
                for reg in (params, bufs, mods):
                    if reg is not target:
                        reg.pop(name, None)
                target[name] = value            # a reassignment keeps its place in the order
            elif name in params:
                if value is not None:
                    raise ArgumentTypeError(f"{type(self).__name__}.{name} is a parameter: assign an "
                                            f"nn.Parameter or None, not {type(value).__name__}")
                params[name] = None
            elif name in mods:
                if value is not None:
                    raise ArgumentTypeError(f"{type(self).__name__}.{name} is a submodule: assign an "
                                            f"nn.Module or None, not {type(value).__name__}")
                mods[name] = None
            else:  # a buffer
                if value is not None and not isinstance(value, Tensor):
                    raise ArgumentTypeError(f"{type(self).__name__}.{name} is a buffer: assign a "
                                            f"Tensor or None, not {type(value).__name__}")
                bufs[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        for reg in self._registries():
            reg.pop(name, None)
        self.__dict__["_non_persistent"].discard(name)
        object.__delattr__(self, name)

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Register `param` (or None: a declared but absent parameter, e.g. bias=False)."""
        if param is not None and not isinstance(param, Parameter):
            raise ArgumentTypeError(f"register_parameter({name!r}): expected an nn.Parameter or None, "
                                    f"got {type(param).__name__}")
        self._registries()[0][name] = param
        object.__setattr__(self, name, param)

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        """State that is not learned; persistent buffers are part of state_dict()."""
        if tensor is not None and not isinstance(tensor, Tensor):
            raise ArgumentTypeError(f"register_buffer({name!r}): expected a Tensor or None, "
                                    f"got {type(tensor).__name__}")
        self._registries()[1][name] = tensor
        if persistent:
            self.__dict__["_non_persistent"].discard(name)
        else:
            self.__dict__["_non_persistent"].add(name)
        object.__setattr__(self, name, tensor)

    def add_module(self, name: str, module: "Module | None") -> None:
        if module is not None and not isinstance(module, Module):
            raise ArgumentTypeError(f"add_module({name!r}): expected an nn.Module, got {type(module).__name__}")
        self._registries()[2][name] = module
        object.__setattr__(self, name, module)

    # -- calling ---------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = getattr(self, "forward", None)
        if forward is None:
            raise ArgumentTypeError(f"{type(self).__name__} defines no forward(); subclasses of "
                                    f"nn.Module implement forward(self, ...)")
        # Arguments that forward annotates as Tensor must be Tensors (as in PyTorch: a list
        # or NumPy array is refused with the argument's name, not an AttributeError inside).
        check_tensors(getattr(forward, "__func__", forward), type(self).__name__, args, kwargs,
                      offset=1 if hasattr(forward, "__func__") else 0)
        return forward(*args, **kwargs)

    # -- traversal ----------------------------------------------------------------------------
    def named_modules(self, prefix: str = "", memo: set | None = None) -> Iterator[tuple[str, "Module"]]:
        """(name, module) for this module and every descendant, each once."""
        memo = set() if memo is None else memo
        if id(self) in memo:
            return
        memo.add(id(self))
        yield prefix, self
        for name, m in self._modules.items():
            if m is not None:
                yield from m.named_modules(f"{prefix}.{name}" if prefix else name, memo)

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        for name, m in self._modules.items():
            if m is not None:
                yield name, m

    def children(self) -> Iterator["Module"]:
        for _, m in self.named_children():
            yield m

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, parameter) in registration order; a shared parameter appears once."""
        seen: set[int] = set()
        mods = self.named_modules(prefix) if recurse else iter([(prefix, self)])
        for mname, m in mods:
            for name, p in m._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{mname}.{name}" if mname else name), p

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Tensor]]:
        seen: set[int] = set()
        mods = self.named_modules(prefix) if recurse else iter([(prefix, self)])
        for mname, m in mods:
            for name, b in m._buffers.items():
                if b is None or id(b) in seen:
                    continue
                seen.add(id(b))
                yield (f"{mname}.{name}" if mname else name), b

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    def num_parameters(self) -> int:
        """How many scalars the model learns (shared parameters counted once)."""
        return sum(p.size for p in self.parameters())

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, Tensor]":
        """Parameters and persistent buffers by dotted name (tensors share memory with the
        module; copy them before changing the module if you need a snapshot)."""
        out: OrderedDict[str, Tensor] = OrderedDict()
        for mname, m in self.named_modules():
            pre = f"{mname}." if mname else ""
            for name, p in m._parameters.items():
                if p is not None and pre + name not in out:
                    out[pre + name] = p.detach()
            for name, b in m._buffers.items():
                if b is not None and name not in m._non_persistent:
                    out[pre + name] = b.detach()
        return out

    def _state_targets(self) -> "OrderedDict[str, Tensor]":
        out: OrderedDict[str, Tensor] = OrderedDict()
        for mname, m in self.named_modules():
            pre = f"{mname}." if mname else ""
            for name, p in m._parameters.items():
                if p is not None:
                    out.setdefault(pre + name, p)
            for name, b in m._buffers.items():
                if b is not None and name not in m._non_persistent:
                    out.setdefault(pre + name, b)
        return out

    def load_state_dict(self, state_dict: Any, strict: bool = True) -> IncompatibleKeys:
        """Copy values into the existing parameters (their identity is kept, so an
        optimizer built before loading still updates them).

        Values may be Tensors or anything NumPy can read; they are cast to the
        parameter's dtype. Raises StateDictError for missing/unexpected names (when
        `strict`) and ShapeError for a shape mismatch, naming the entry. Nothing is
        changed unless every entry fits.
        """
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise ArgumentTypeError(f"{type(self).__name__}.load_state_dict: expected a mapping of names "
                            f"to arrays, got {type(state_dict).__name__}")
        targets = self._state_targets()
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict if k not in targets]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing keys {missing}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected}")
            raise StateDictError(f"{type(self).__name__}.load_state_dict: " + "; ".join(parts))
        staged = []
        for name, t in targets.items():
            if name not in state_dict:
                continue
            value = state_dict[name]
            arr = value.numpy() if isinstance(value, Tensor) else np.asarray(value)
            if tuple(arr.shape) != tuple(t.shape):
                raise ShapeError(f"{type(self).__name__}.load_state_dict: {name!r} has shape "
                                 f"{tuple(arr.shape)} in the state dict but {tuple(t.shape)} in "
                                 f"the module")
            if np.dtype(t.dtype).kind in "fc" and arr.dtype.kind not in "fciub":
                raise DTypeError(f"{type(self).__name__}.load_state_dict: {name!r} has dtype "
                                 f"{arr.dtype}, expected a number dtype like {t.dtype}")
            staged.append((t, arr))
        with eg.no_grad():
            for t, arr in staged:
                t[...] = eg.tensor(arr.astype(t.dtype, copy=False), device=t.device)
        return IncompatibleKeys(missing, unexpected)

    # -- modes and gradients ----------------------------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        """Training mode (dropout active) for this module and all descendants."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))    # jit guards see the flag
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) the .grad of every parameter."""
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad = eg.zeros_like(p.grad)

    def requires_grad_(self, requires_grad: bool = True) -> "Module":
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    # -- devices and dtypes ------------------------------------------------------------------------
    def to(self, device: Any = None, dtype: Any = None) -> "Module":
        """Move parameters and buffers to `device` and/or cast floating ones to `dtype`,
        in place: the Parameter objects stay the same, so optimizers keep working.
        `m.to("cpu")`, `m.to(eg.float64)`, `m.to("cuda", eg.float32)`."""
        if device is not None and not isinstance(device, str):
            device, dtype = None, device
        if device is not None:
            get_backend(device)        # unknown or unavailable device -> a clear error now
        for t in list(self.parameters()) + list(self.buffers()):
            self._convert(t, device, dtype)
            if t.grad is not None:
                self._convert(t.grad, device, dtype)
        return self

    @staticmethod
    def _convert(t: Tensor, device: str | None, dtype: Any) -> None:
        new = t.detach()
        if dtype is not None and np.dtype(t.dtype).kind == "f" and as_dtype(dtype) != t.dtype:
            if as_dtype(dtype).kind != "f":
                raise DTypeError(f"Module.to: parameters can only be cast to a floating dtype, "
                                 f"got {np.dtype(dtype)}")
            new = new.to(dtype=dtype)
        if device is not None and device != t.device:
            new = transfer(new, device)
        if new._data is not t._data:
            _swap_tensor_data(t, new)

    def double(self) -> "Module":
        return self.to(dtype=np.float64)

    def float(self) -> "Module":
        return self.to(dtype=np.float32)

    def apply(self, fn: Callable[["Module"], Any]) -> "Module":
        """Call fn on every submodule (children first) and then on self, as torch does."""
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    # -- copying and printing ------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict) -> "Module":
        """Deep copy; tensors copy their data and stay on their devices (Tensor.__deepcopy__)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            object.__setattr__(new, k, copy.deepcopy(v, memo))
        return new

    def extra_repr(self) -> str:
        """One line of settings shown in repr (overridden by layers)."""
        return ""

    def __repr__(self) -> str:
        extra = self.extra_repr()
        lines = []
        for name, m in self._modules.items():
            body = repr(m).replace("\n", "\n  ")
            lines.append(f"({name}): {body}")
        if not lines:
            return f"{type(self).__name__}({extra})"
        head = f"{type(self).__name__}(" + (f"{extra}\n  " if extra else "\n  ")
        return head + "\n  ".join(lines) + "\n)"
