"""Argument checks for every public constructor and entry point.

Each check takes (name, value, where) and returns the value normalised (an int, a
float) or raises ArgumentTypeError / ArgumentError naming the argument, the callee
and what was expected. `validated(fn)` applies them from fn's signature: a rule per
argument *name* (RULES: every `dropout` is a probability, every `d_model` a positive
int, whoever takes it), else one per annotation (`int`, `float`, `Tensor`). So a new
layer or option is checked by naming its arguments as the others are, with no code
of its own; what spans several arguments (embed_dim divisible by num_heads) stays in
the constructor.
"""
from __future__ import annotations

import functools
import inspect
import math
import typing
from typing import Any, Callable

import numpy as np

from ops.errors import ArgumentError, ArgumentTypeError

from .tensor import Tensor

Check = Callable[[str, Any, str], Any]


def _kind(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def integer(name: str, value: Any, where: str, minimum: int | None = None) -> int:
    """An int (NumPy ints too; never a bool or a float such as 2.5 or 2.0)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{where}: {name} must be an integer, got {_kind(value)}")
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{where}: {name} must be an integer >= {minimum}, got {value}")
    return int(value)


def positive_int(name: str, value: Any, where: str) -> int:
    return integer(name, value, where, minimum=1)


def nonnegative_int(name: str, value: Any, where: str) -> int:
    return integer(name, value, where, minimum=0)


def _span(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g} and finite"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g} and finite"
    return "a finite number"


def real(name: str, value: Any, where: str, low: float | None = None, high: float | None = None,
         low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (int or float, not bool) in [low, high] (ends open as asked)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                      np.floating)):
        raise ArgumentTypeError(f"{where}: {name} must be a real number, got {_kind(value)}")
    v = float(value)
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if not math.isfinite(v) or too_low or too_high:
        raise ArgumentError(f"{where}: {name} must be {_span(low, high, low_open, high_open)}, "
                            f"got {value}")
    return v


def finite_float(name: str, value: Any, where: str) -> float:
    return real(name, value, where)


def nonnegative(name: str, value: Any, where: str) -> float:
    return real(name, value, where, low=0.0)


def positive(name: str, value: Any, where: str) -> float:
    return real(name, value, where, low=0.0, low_open=True)


def probability(name: str, value: Any, where: str, include_one: bool = False) -> float:
    """A probability in [0, 1) (a drop rate: 1 would leave nothing to rescale) or [0, 1]."""
    return real(name, value, where, low=0.0, high=1.0, high_open=not include_one)


def fraction(name: str, value: Any, where: str) -> float:
    return probability(name, value, where, include_one=True)


def one_of(choices: tuple) -> Check:
    def check(name: str, value: Any, where: str) -> Any:
        if not isinstance(value, str) or value not in choices:
            raise ArgumentError(f"{where}: {name} must be one of {choices}, got {value!r}")
        return value
    return check


def betas(name: str, value: Any, where: str) -> tuple[float, float]:
    """Two decay rates in [0, 1) (Adam's beta1, beta2)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ArgumentTypeError(f"{where}: {name} must be a pair of numbers in [0, 1), got "
                                f"{_kind(value)}")
    return tuple(probability(f"{name}[{i}]", b, where) for i, b in enumerate(value))


def learning_rate(name: str, value: Any, where: str) -> Any:
    """A finite number >= 0, or a 0-d floating Tensor holding one (schedulers write it)."""
    if isinstance(value, Tensor):
        if value.ndim != 0 or np.dtype(value.dtype).kind != "f":
            raise ArgumentTypeError(f"{where}: a tensor {name} must be 0-d and floating, got "
                                    f"shape {tuple(value.shape)} dtype {value.dtype}")
        real(name, value.item(), where, low=0.0)
        return value
    return real(name, value, where, low=0.0)


def tensor(name: str, value: Any, where: str) -> Tensor:
    if not isinstance(value, Tensor):
        hint = " (convert it with eg.tensor(...))" if isinstance(value, (list, tuple, np.ndarray,
                                                                          np.generic)) else ""
        raise ArgumentTypeError(f"{where}: {name} must be a Tensor, got "
                                f"{type(value).__name__}{hint}")
    return value


def at_least(minimum: float, strict: bool = False) -> Check:
    def check(name: str, value: Any, where: str) -> float:
        return real(name, value, where, low=minimum, low_open=strict)
    return check


# -- one rule per argument name ----------------------------------------------------------------

_POSITIVE_INTS = (
    "in_features", "out_features", "num_embeddings", "embedding_dim", "d_model", "nhead",
    "num_heads", "embed_dim", "kdim", "vdim", "dim_feedforward", "vocab_size", "src_vocab",
    "tgt_vocab", "max_len", "num_layers", "num_encoder_layers", "num_decoder_layers",
    "num_beams", "num_return", "growth_interval", "total_steps", "num_classes", "top_k", "tq",
    "tk", "max_new_tokens")
_NONNEGATIVE_INTS = ("warmup_steps", "steps", "eval_every", "checkpoint_every",
                     "print_every", "min_frequency")
_INTS = ("padding_idx", "pad_idx", "bos", "eos", "ignore_index", "seed")
_NONNEGATIVE = ("weight_decay", "momentum", "dampening", "eps", "layer_norm_eps", "init_std",
                "emb_init_std", "max_norm", "clip_value")

RULES: dict[str, Check] = {
    **{n: positive_int for n in _POSITIVE_INTS},
    **{n: nonnegative_int for n in _NONNEGATIVE_INTS},
    **{n: integer for n in _INTS},
    **{n: nonnegative for n in _NONNEGATIVE},
    "dropout": probability, "p": probability, "dropout_p": probability,
    "label_smoothing": fraction, "min_ratio": fraction, "mask_prob": fraction,
    "mask_token_prob": fraction, "random_token_prob": fraction, "mask_id": integer,
    "clip_norm": positive, "std": nonnegative, "gain": nonnegative,
    "top_p": lambda n, v, w: real(n, v, w, low=0.0, high=1.0, low_open=True),
    "temperature": positive, "init_scale": positive,
    "norm_type": lambda n, v, w: v if v == math.inf else positive(n, v, w),
    "growth_factor": at_least(1.0, strict=True),
    "backoff_factor": lambda n, v, w: real(n, v, w, low=0.0, high=1.0, low_open=True,
                                           high_open=True),
    "last_epoch": lambda n, v, w: integer(n, v, w, minimum=-1),
    "lr": learning_rate, "betas": betas,
    "reduction": one_of(("mean", "sum", "none")),
}


def _is_tensor_hint(hint: Any) -> bool:
    if isinstance(hint, str):
        return hint.replace(" ", "") in ("Tensor", "Tensor|None", "Optional[Tensor]")
    if hint is Tensor:
        return True
    args = typing.get_args(hint)
    return bool(args) and Tensor in args and all(a in (Tensor, type(None)) for a in args)


def _allows_none(hint: Any) -> bool:
    if isinstance(hint, str):
        return "None" in hint or hint.startswith("Optional[")
    return type(None) in typing.get_args(hint)


def _rule_for(name: str, hint: Any) -> Check | None:
    if name in RULES:
        return RULES[name]
    if _is_tensor_hint(hint):
        return tensor
    if hint is int or hint == "int":
        return integer
    if hint is float or hint == "float":
        return finite_float
    return None


@functools.lru_cache(maxsize=None)
def _plan(fn: Callable) -> tuple:
    """(position or None, name, None accepted, check) for each checked parameter of fn."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:                  # a name only importable for type checkers: use the text
        hints = dict(getattr(fn, "__annotations__", {}))
    plan, position = [], 0
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            position = None
            continue
        if p.kind is p.VAR_KEYWORD:
            continue
        index = position if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) else None
        if position is not None and index is not None:
            position += 1
        hint = hints.get(p.name)
        check = _rule_for(p.name, hint)
        if check is not None and p.name != "self":
            plan.append((index, p.name, p.default is None or _allows_none(hint), check))
    return tuple(plan)


_MISSING = object()


def check_arguments(fn: Callable, where: str, args: tuple, kwargs: dict) -> None:
    """Apply fn's rules to the arguments of one call (defaults are trusted; None is
    accepted where it is the default or the annotation allows it)."""
    for index, name, none_ok, check in _plan(fn):
        value = args[index] if index is not None and index < len(args) else kwargs.get(name,
                                                                                      _MISSING)
        if value is _MISSING or (value is None and none_ok):
            continue
        check(name, value, where)


def validated(fn: Callable) -> Callable:
    """Check fn's arguments by RULES and annotations before every call. On a method
    (`__init__`) the callee is named after the instance's class."""
    qual = fn.__qualname__
    is_method = "." in qual and next(iter(inspect.signature(fn).parameters), "") == "self"
    label = fn.__qualname__ if "<locals>" not in fn.__qualname__ else fn.__name__

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        where = type(args[0]).__name__ if is_method and args else label
        check_arguments(fn, where, args, kwargs)
        return fn(*args, **kwargs)
    wrapper.__validated__ = True
    return wrapper


def validate_init(cls: type) -> type:
    """Wrap the __init__ a class defines itself (for __init_subclass__ hooks)."""
    init = cls.__dict__.get("__init__")
    if init is not None and not getattr(init, "__validated__", False):
        cls.__init__ = validated(init)
    return cls


@functools.lru_cache(maxsize=None)
def tensor_positions(fn: Callable) -> tuple:
    """(position, name) of fn's parameters annotated Tensor / Tensor | None (self excluded)."""
    return tuple((i, n, none_ok) for i, n, none_ok, check in _plan(fn) if check is tensor)


def check_tensors(fn: Callable, where: str, args: tuple, kwargs: dict, offset: int = 0) -> None:
    """The cheap per-call check of Module.__call__: Tensor-annotated arguments only.
    `offset` is 1 when args omit `self`."""
    for index, name, none_ok in tensor_positions(fn):
        i = None if index is None else index - offset
        value = args[i] if i is not None and 0 <= i < len(args) else kwargs.get(name, _MISSING)
        if value is _MISSING or (value is None and none_ok) or isinstance(value, Tensor):
            continue
        tensor(name, value, where)
