"""The symbolic backend: NumPy object arrays of sympy expressions.

Running the engine's eager interpreter on this backend executes the very forward
and backward code the engine runs on NumPy, but every value is an exact sympy
expression. `engine.symbolic` uses it to prove gradients against `sympy.diff`.

Conventions, chosen so the proofs stay exact and simplifiable:
- Arrays are `SymArray`s: an object array plus a nominal NumPy dtype (float64 for
  symbolic values by default), because the engine decides differentiability and
  result types from `dtype`.
- Elementwise ops evaluate their spec's sympy expression (`spec.expr`) element by
  element; no numeric lambdify is involved.
- Python float constants that reach an op (1/sqrt(d), eps, 1/n) are read as the
  simplest exact number within a few ulps (nsimplify, with pi allowed), otherwise as
  their exact binary value: `1/math.sqrt(2)` becomes `sqrt(2)/2`, `1e-5` is `1/100000`.
  Float *arrays* (data) always become their exact binary values.
- No fused kernels (softmax, layer_norm, ...) are offered, so fused ops run their
  decomposition into primitives here, and their hand-written VJPs get checked.
- Comparisons are decided when sympy can decide them (symbols are real, so
  `Max(x, y) == -oo` is False); `where` with a decided condition picks a branch and
  builds a `Piecewise` otherwise.
- Random draws come from a NumPy generator and are converted exactly (a float sample
  becomes the rational it is), so dropout masks and initialisations stay usable.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import numpy as np
import sympy

from .base import Backend

_F64 = np.dtype(np.float64)
_I64 = np.dtype(np.int64)


class SymArray:
    """An object array of sympy expressions with a nominal dtype.

    Why a wrapper: the engine reads `.dtype` to decide whether a tensor may require
    gradients and what an op returns; an object array's own dtype says neither.
    """

    __slots__ = ("data", "dtype")
    is_abstract = False

    def __init__(self, data: np.ndarray, dtype: Any = _F64) -> None:
        if not isinstance(data, np.ndarray) or data.dtype != object:
            raise TypeError(f"SymArray needs a NumPy object array, got {type(data).__name__}")
        self.data = data
        self.dtype = np.dtype(dtype)

    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.data if dtype is None else self.data.astype(dtype)

    def __repr__(self) -> str:
        return f"SymArray({self.data.tolist()!r}, dtype={self.dtype})"


# -- scalars ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def _exact_float(f: float) -> sympy.Expr:
    """The exact number a float literal stands for (see the module docstring)."""
    if math.isnan(f):
        return sympy.nan
    if math.isinf(f):
        return sympy.oo if f > 0 else -sympy.oo
    if f.is_integer():
        return sympy.Integer(int(f))
    tol = 4 * math.ulp(f)
    try:
        guess = sympy.nsimplify(f, [sympy.pi])
        if guess.is_number and guess.is_real and abs(float(guess) - f) <= tol:
            return guess
    except (ValueError, TypeError, ArithmeticError):   # nsimplify found nothing usable
        pass
    return sympy.Rational(f)


def to_sympy(v: Any) -> sympy.Basic:
    """A host scalar (bool, int, float, sympy object) as an exact sympy object."""
    if isinstance(v, sympy.Basic):
        return v
    if isinstance(v, (bool, np.bool_)):
        return sympy.true if v else sympy.false
    if isinstance(v, (int, np.integer)):
        return sympy.Integer(int(v))
    if isinstance(v, (float, np.floating)):
        return _exact_float(float(v))
    return sympy.sympify(v)


def _extremum(cls: type, *args: Any) -> sympy.Expr:
    """Max/Min of `args` with only the cheap, exact reductions: numbers are compared
    (evaluated normally), the identity (-oo for Max, oo for Min) and repeats are
    dropped, the absorbing infinity wins. Why: sympy's own Max compares every pair of
    symbolic arguments through the assumptions system, which takes minutes on the
    large expressions of a whole Transformer layer; an unevaluated Max has the same
    value and derivative."""
    identity = -sympy.oo if cls is sympy.Max else sympy.oo
    vals: list = []
    for a in args:
        a = sympy.sympify(a)
        if a == -identity:
            return a
        if a != identity and a not in vals:
            vals.append(a)
    if not vals:
        return identity
    if len(vals) == 1:
        return vals[0]
    numbers = [a for a in vals if a.is_number]
    others = [a for a in vals if not a.is_number]
    if len(numbers) > 1:
        numbers = [cls(*numbers)]
    if not others:
        return numbers[0]
    return cls(*(others + numbers), evaluate=False)


_CHEAP = {sympy.Max: functools.partial(_extremum, sympy.Max),
          sympy.Min: functools.partial(_extremum, sympy.Min)}


def _substitute(expr: sympy.Basic, values: dict) -> sympy.Basic:
    """`expr` with its symbols replaced by `values`, rebuilding Max/Min with
    `_extremum` (everything else as xreplace would)."""
    if expr in values:
        return values[expr]
    if not expr.args:
        return expr
    args = [_substitute(a, values) for a in expr.args]
    return _CHEAP.get(expr.func, expr.func)(*args)


def _decide(b: Any) -> Any:
    """A sympy truth value, decided to true/false when sympy can tell."""
    b = to_sympy(b)
    if b is sympy.true or b is sympy.false:
        return b
    if isinstance(b, sympy.core.relational.Relational):
        diff = sympy.expand(b.lhs - b.rhs)
        if isinstance(b, sympy.Eq) and diff.is_zero is not None:
            return sympy.true if diff.is_zero else sympy.false
        if isinstance(b, sympy.Ne) and diff.is_zero is not None:
            return sympy.false if diff.is_zero else sympy.true
    return b


def _object(shape: tuple, fill: Any) -> np.ndarray:
    out = np.empty(shape, dtype=object)
    out.fill(fill)
    return out


def _as_object(v: Any) -> np.ndarray:
    """An element or an object array -> an object array (0-d for an element)."""
    if isinstance(v, np.ndarray):
        return v if v.dtype == object else _convert(v)
    out = np.empty((), dtype=object)
    out[()] = v
    return out


def _convert(arr: np.ndarray) -> np.ndarray:
    """A NumPy array of any dtype -> an object array of exact sympy objects. Floats in
    data become the rationals they are (only scalar constants are recognised as
    simple numbers, see `to_sympy`)."""
    out = np.empty(arr.shape, dtype=object)
    flat_in, flat_out = arr.reshape(-1), out.reshape(-1)
    binary = arr.dtype.kind == "f"
    for i in range(flat_in.size):
        v = flat_in[i]
        flat_out[i] = _binary_exact(float(v)) if binary else to_sympy(v)
    return out


def _binary_exact(f: float) -> sympy.Expr:
    """A float as the exact rational it is (infinities and nan as sympy's)."""
    if math.isfinite(f):
        return sympy.Rational(f)
    return _exact_float(f)


def _truth_to_number(b: Any) -> sympy.Expr:
    b = _decide(b)
    if b is sympy.true:
        return sympy.Integer(1)
    if b is sympy.false:
        return sympy.Integer(0)
    if isinstance(b, sympy.Expr):          # already a number (a bool cast twice)
        return b
    return sympy.Piecewise((1, b), (0, True))


def _to_int(e: Any) -> sympy.Integer:
    e = _truth_to_number(e) if isinstance(e, sympy.logic.boolalg.Boolean) else e
    if not e.is_number:
        raise TypeError(f"symbolic backend: cannot cast the symbolic value {e} to an integer")
    return sympy.Integer(int(e))         # truncates toward zero, as NumPy does


def _select(c: Any, a: Any, b: Any) -> Any:
    c = _decide(c)
    if c is sympy.true:
        return a
    if c is sympy.false:
        return b
    return sympy.Piecewise((a, c), (b, True))


_select_u = np.frompyfunc(_select, 3, 1)
_to_number_u = np.frompyfunc(_truth_to_number, 1, 1)
_to_int_u = np.frompyfunc(_to_int, 1, 1)
_decide_u = np.frompyfunc(_decide, 1, 1)
_nonzero_u = np.frompyfunc(lambda e: _decide(sympy.Ne(e, 0)), 1, 1)


def _unwrap(x: Any) -> np.ndarray:
    """A SymArray -> its object array; a host scalar -> a 0-d object array holding it
    exactly (so NumPy never converts a sympy number on its own)."""
    return x.data if isinstance(x, SymArray) else _as_object(to_sympy(x))


def _nominal_of(x: Any) -> Any:
    """What NumPy's type promotion should see: the nominal dtype or the Python scalar."""
    return x.dtype if isinstance(x, SymArray) else x


def _result_type(*xs: Any) -> np.dtype:
    vals = [np.empty(0, x.dtype) if isinstance(x, SymArray) else x for x in xs]
    return np.result_type(*vals)


def _index(index: tuple) -> tuple:
    """An index tuple with SymArray index arrays turned into NumPy integer arrays."""
    out = []
    for item in index:
        if isinstance(item, SymArray):
            out.append(item.data.astype(np.int64))
        elif isinstance(item, np.ndarray) and item.dtype == object:
            out.append(item.astype(np.int64))
        else:
            out.append(item)
    return tuple(out)


def _reduce(data: np.ndarray, axis: tuple | None, keepdims: bool,
            combine: Callable[..., Any]) -> np.ndarray:
    """Apply `combine(*elements)` over `axis` (one sympy call per output element, so
    sums come out as one flat Add rather than a nest of binary additions)."""
    nd = data.ndim
    axes = tuple(range(nd)) if axis is None else tuple(axis)
    kept = [i for i in range(nd) if i not in axes]
    moved = np.transpose(data, kept + list(axes))
    kept_shape = tuple(data.shape[i] for i in kept)
    flat = moved.reshape(kept_shape + (-1,))
    out = np.empty(kept_shape, dtype=object)
    for idx in np.ndindex(*kept_shape):
        out[idx] = combine(*flat[idx])
    if keepdims:
        out = out.reshape(tuple(1 if i in axes else d for i, d in enumerate(data.shape)))
    return out


def _binary_rationals(samples: np.ndarray, dtype: Any) -> SymArray:
    """Float samples as the exact rationals they are (no guessing of simple forms)."""
    return SymArray(_convert(samples.astype(np.float64)), dtype)


class SymbolicBackend(Backend):
    """Exact evaluation of the engine's ops on arrays of sympy expressions."""

    name = "symbolic"

    # -- creation and conversion ------------------------------------------------
    def asarray(self, data: Any, dtype: Any = None) -> SymArray:
        if isinstance(data, SymArray):
            return data if dtype is None else self.astype(data, dtype)
        arr = data if isinstance(data, np.ndarray) else np.asarray(data)
        if arr.dtype == object:
            arr = _convert(arr)
            out = SymArray(arr, _F64)
            return out if dtype is None else self.astype(out, dtype)
        if dtype is not None:
            arr = arr.astype(dtype)
        return SymArray(_convert(arr), arr.dtype)

    def to_numpy(self, x: SymArray) -> np.ndarray:
        return x.data

    def full(self, shape: tuple, value: Any, dtype: Any) -> SymArray:
        dtype = np.dtype(dtype)
        v = to_sympy(value)
        if dtype.kind == "b":
            v = _decide(v if isinstance(v, sympy.logic.boolalg.Boolean) else sympy.Ne(v, 0))
        elif isinstance(v, sympy.logic.boolalg.Boolean):
            v = _truth_to_number(v)
        return SymArray(_object(tuple(shape), v), dtype)

    def arange(self, start: Any, stop: Any, step: Any, dtype: Any) -> SymArray:
        return self.asarray(np.arange(start, stop, step, dtype=dtype))

    def astype(self, x: SymArray, dtype: Any) -> SymArray:
        dtype = np.dtype(dtype)
        if dtype == x.dtype:
            return x
        src = x.dtype.kind
        if dtype.kind == "b":
            data = _decide_u(x.data) if src == "b" else _nonzero_u(x.data)
        elif dtype.kind in "iu":
            data = _to_int_u(x.data)
        elif src == "b":
            data = _to_number_u(x.data)
        else:
            data = x.data                  # exact values: float32/float64 differ only nominally
        return SymArray(_as_object(data), dtype)

    def copy(self, x: SymArray) -> SymArray:
        return SymArray(x.data.copy(), x.dtype)

    # -- elementwise -----------------------------------------------------------
    def elementwise_fn(self, spec: Any) -> Callable[..., SymArray]:
        """Evaluate `spec.expr` element by element, with the spec's symbols replaced."""
        symbols, expr = tuple(spec.symbols), spec.expr
        boolean = spec.result == "bool"

        def one(*vals: Any) -> Any:
            out = _substitute(expr, dict(zip(symbols, vals)))
            return _decide(out) if boolean else out

        ufunc = np.frompyfunc(one, len(symbols), 1)
        logical = spec.domain == "bool"

        def arg(a: Any) -> np.ndarray:
            is_bool = isinstance(a, SymArray) and a.dtype.kind == "b"
            if not logical and is_bool:                 # a condition in arithmetic: 0 or 1
                return _as_object(_to_number_u(a.data))
            if not logical or is_bool:
                return _unwrap(a)
            if isinstance(a, SymArray):                 # NumPy: nonzero numbers are True
                return _as_object(_nonzero_u(a.data))
            return _unwrap(bool(a))

        def run(*args: Any) -> SymArray:
            dtype = spec.result_dtype(*(_nominal_of(a) for a in args))
            return SymArray(_as_object(ufunc(*(arg(a) for a in args))), dtype)

        return run

    # -- reductions and linear algebra -----------------------------------------
    def sum(self, x: SymArray, axis: tuple | None, keepdims: bool) -> SymArray:
        data = _to_number_u(x.data) if x.dtype.kind == "b" else x.data
        dtype = _I64 if x.dtype.kind in "biu" else x.dtype
        return SymArray(_as_object(_reduce(_as_object(data), axis, keepdims, sympy.Add)), dtype)

    def max(self, x: SymArray, axis: tuple | None, keepdims: bool) -> SymArray:
        if x.size == 0:
            raise ValueError("symbolic max: zero-size array to reduction operation max")
        return SymArray(_reduce(x.data, axis, keepdims, _CHEAP[sympy.Max]), x.dtype)

    def matmul(self, a: SymArray, b: SymArray) -> SymArray:
        """NumPy's matmul rules, each output element one flat sum of products."""
        A, B = a.data, b.data
        if A.ndim == 0 or B.ndim == 0:
            raise ValueError("matmul: operands must have at least 1 dimension")
        A2 = A[None, :] if A.ndim == 1 else A
        B2 = B[:, None] if B.ndim == 1 else B
        if A2.shape[-1] != B2.shape[-2]:
            raise ValueError(f"matmul: shapes {A.shape} and {B.shape} do not align")
        prods = A2[..., :, :, None] * B2[..., None, :, :]        # (..., m, k, n)
        out = _reduce(prods, (prods.ndim - 2,), False, sympy.Add)
        if A.ndim == 1:
            out = out.reshape(out.shape[:-2] + out.shape[-1:])
        if B.ndim == 1:
            out = out.reshape(out.shape[:-1])
        return SymArray(_as_object(out), _result_type(a, b))

    # -- movement ---------------------------------------------------------------
    def reshape(self, x: SymArray, shape: tuple) -> SymArray:
        return SymArray(np.reshape(x.data, shape), x.dtype)

    def transpose(self, x: SymArray, axes: tuple) -> SymArray:
        return SymArray(np.transpose(x.data, axes), x.dtype)

    def broadcast_to(self, x: SymArray, shape: tuple) -> SymArray:
        return SymArray(np.broadcast_to(x.data, shape), x.dtype)

    def concatenate(self, xs: Sequence[SymArray], axis: int) -> SymArray:
        dtype = _result_type(*xs)
        parts = [self.astype(x, dtype).data for x in xs]
        return SymArray(np.concatenate(parts, axis=axis), dtype)

    def pad(self, x: SymArray, pad_width: tuple, value: Any) -> SymArray:
        shape = tuple(d + a + b for d, (a, b) in zip(x.shape, pad_width))
        out = _object(shape, to_sympy(value))
        out[tuple(slice(a, a + d) for d, (a, _) in zip(x.shape, pad_width))] = x.data
        return SymArray(out, x.dtype)

    def where(self, cond: Any, a: Any, b: Any) -> SymArray:
        dtype = _result_type(a, b)
        return SymArray(_as_object(_select_u(_unwrap(cond), _unwrap(a), _unwrap(b))), dtype)

    # -- indexing ---------------------------------------------------------------
    def getitem(self, x: SymArray, index: tuple) -> SymArray:
        return SymArray(_as_object(x.data[_index(index)]), x.dtype)

    def index_add(self, shape: tuple, index: tuple, values: SymArray, advanced: bool) -> SymArray:
        out = _object(tuple(shape), sympy.Integer(0))
        idx = _index(index)
        if advanced:
            np.add.at(out, idx, values.data)
        else:
            out[idx] = values.data
        return SymArray(out, values.dtype)

    def setitem(self, x: SymArray, index: tuple, value: Any) -> None:
        x.data[_index(index)] = _unwrap(value)

    # -- random -----------------------------------------------------------------
    def random(self, draw: Any, shape: tuple, dtype: Any, p: float = 0.0) -> SymArray:
        """The engine's Philox draw in float64, as the exact binary rationals it is."""
        n = math.prod(shape)
        wide = dtype if draw.thresholded else np.float64      # 0/1 values are exact in any dtype
        values = draw.host(self.claim_counters(n), n, self.rng_key, wide, p=p).reshape(shape)
        return self.asarray(values) if draw.thresholded else _binary_rationals(values, dtype)
