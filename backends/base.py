"""The array-level contract every device implements.

A Backend knows raw arrays of one device and nothing about tensors or gradients.
The ops in `ops/` call only these methods, so a new device (CuPy, sympy object
arrays) plugs in by implementing this class; ops and engine stay unchanged.
Raw arrays must expose `.shape`, `.dtype` and `.ndim`. Dtypes are NumPy dtypes.
Axis arguments arrive normalised: a tuple of non-negative ints, or None for all.
"""
from __future__ import annotations

import threading

from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence


_COUNTER_LOCK = threading.Lock()


class BackendUnavailable(RuntimeError):
    """The device exists in principle but cannot start here (missing library or hardware)."""


class Backend(ABC):
    """Primitives on raw arrays of one device."""

    name: str = "abstract"   # the device name users write: "cpu", "cuda", "symbolic"
    # Raw arrays have NumPy's `.reshape(shape)` / `.transpose(axes)` (views, same results
    # as this backend's reshape/transpose), so generated code may call them inline.
    array_methods: bool = False

    # -- creation and conversion ------------------------------------------------
    @abstractmethod
    def asarray(self, data: Any, dtype: Any = None) -> Any:
        """Host data (lists, NumPy arrays, scalars) -> an array of this device."""

    @abstractmethod
    def to_numpy(self, x: Any) -> Any:
        """An array of this device -> a NumPy array (a copy only if needed)."""

    @abstractmethod
    def full(self, shape: tuple, value: Any, dtype: Any) -> Any:
        """A new array filled with `value`."""

    @abstractmethod
    def arange(self, start: Any, stop: Any, step: Any, dtype: Any) -> Any:
        """Evenly spaced values in [start, stop)."""

    @abstractmethod
    def astype(self, x: Any, dtype: Any) -> Any:
        """`x` as `dtype`; returns `x` itself when it already has that dtype."""

    @abstractmethod
    def copy(self, x: Any) -> Any:
        """A fresh, writable copy."""

    # -- elementwise -----------------------------------------------------------
    @abstractmethod
    def elementwise_fn(self, spec: Any) -> Callable[..., Any]:
        """The callable computing an elementwise op spec on this device.

        Called once per spec (the result is cached on the spec). Arguments are
        arrays of this device or Python scalars, broadcast NumPy-style.
        """

    # -- reductions and linear algebra -----------------------------------------
    @abstractmethod
    def sum(self, x: Any, axis: tuple | None, keepdims: bool) -> Any:
        """Sum over `axis`."""

    @abstractmethod
    def max(self, x: Any, axis: tuple | None, keepdims: bool) -> Any:
        """Maximum over `axis`."""

    @abstractmethod
    def matmul(self, a: Any, b: Any) -> Any:
        """Matrix product with NumPy's batching and 1-D rules."""

    # -- movement ---------------------------------------------------------------
    @abstractmethod
    def reshape(self, x: Any, shape: tuple) -> Any:
        """`x` with a new shape of the same size."""

    @abstractmethod
    def transpose(self, x: Any, axes: tuple) -> Any:
        """`x` with its axes permuted."""

    @abstractmethod
    def broadcast_to(self, x: Any, shape: tuple) -> Any:
        """`x` broadcast (read-only) to `shape`."""

    @abstractmethod
    def concatenate(self, xs: Sequence[Any], axis: int) -> Any:
        """Join arrays along an existing axis."""

    @abstractmethod
    def pad(self, x: Any, pad_width: tuple, value: Any) -> Any:
        """Constant padding: `pad_width` is ((before, after),) per axis."""

    @abstractmethod
    def where(self, cond: Any, a: Any, b: Any) -> Any:
        """Elementwise select, broadcasting all three."""

    # -- indexing ---------------------------------------------------------------
    @abstractmethod
    def getitem(self, x: Any, index: tuple) -> Any:
        """NumPy indexing: ints, slices, None, Ellipsis and integer arrays."""

    @abstractmethod
    def index_add(self, shape: tuple, index: tuple, values: Any, advanced: bool) -> Any:
        """zeros(shape) with `values` added at `index` (repeated indices accumulate)."""

    @abstractmethod
    def setitem(self, x: Any, index: tuple, value: Any) -> None:
        """In-place `x[index] = value`."""

    # -- optional fused ops ----------------------------------------------------------
    def offers(self, op: Any, args: tuple, params: dict) -> bool:
        """Does this backend run the optional op `op` (ops.spec.offers: the fused
        attention) on these inputs (tensors: shape, dtype) and params? None do by default,
        and a composite then computes the same value from primitives."""
        return False

    # -- random -----------------------------------------------------------------
    # The device's Philox stream (ops/random.py): a 64-bit key as two 32-bit words and
    # the counter of the next element; every draw takes the next `size` counters.
    rng_key: tuple[int, int] = (0, 0)
    rng_counter: int = 0

    def seed(self, seed: int) -> None:
        """Restart this device's stream: key words from `seed` (mod 2^64), counter 0."""
        s = int(seed) & 0xFFFFFFFFFFFFFFFF
        self.rng_key, self.rng_counter = (s & 0xFFFFFFFF, s >> 32), 0

    def claim_counters(self, n: int) -> int:
        """Reserve the next `n` counters of the stream; returns the first."""
        with _COUNTER_LOCK:                 # two threads never get the same counters
            start = self.rng_counter
            if start + n > 1 << 64:
                raise OverflowError(f"{self.name}: the random stream's 2^64 counters are used up; "
                                    f"reseed with engine.manual_seed")
            self.rng_counter = start + n
        return start

    @abstractmethod
    def random(self, draw: Any, shape: tuple, dtype: Any, p: float = 0.0) -> Any:
        """Values of `draw` (an ops.random.PhiloxDraw: uniform, normal or bernoulli with
        probability `p`) for the next prod(shape) counters, in row-major order."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} device={self.name!r}>"
