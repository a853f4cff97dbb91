"""Row programs: per-row reductions plus elementwise sympy, declared once.

softmax, log_softmax, logsumexp, layer_norm, rms_norm and the per-row losses are
each a short list of steps over one row: a reduction of the row (`max`, `sum`,
`mean` of an expression) gives a row scalar, a `pick` the row expression's value at
the column a per-row integer input names (a target class), a `map` step an
expression of the row values and earlier row scalars. The output is a row (softmax)
or a row scalar (logsumexp, a loss). The same declaration is what runs everywhere:

- `evaluate` runs it step by step on any backend's primitives (NumPy and CuPy when
  no kernel applies, and the symbolic backend, so `verify_gradients` proves this
  very program);
- `backends.rowprint` prints it as the host C row kernel and the CUDA kernel (a
  backend offers them through `run_rows`).

So the kernels that run are the printed form of the program that is proved.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Sequence

import numpy as np
import sympy

from .elementwise import ElementwiseOp, ge, logical_and, lt
from .errors import DTypeError, ShapeError
from .spec import Op, register

REDUCTIONS = ("max", "sum", "mean")
KINDS = REDUCTIONS + ("pick", "map")


def symbols(names: str) -> tuple[sympy.Symbol, ...]:
    """Extended-real sympy symbols for a row program's inputs and steps (a row's max
    may be -inf, so `Eq(m, -oo)` must not simplify away)."""
    return sympy.symbols(names, extended_real=True, seq=True)


def nonzero_or(v: sympy.Expr, replacement: Any) -> sympy.Expr:
    """`v`, or `replacement` where `v` is 0 (an empty masked row's sum)."""
    return sympy.Piecewise((replacement, sympy.Eq(v, 0)), (v, True))


def finite_or(v: sympy.Expr, replacement: Any) -> sympy.Expr:
    """`v`, or `replacement` where `v` is -inf (the max of an all -inf row)."""
    return sympy.Piecewise((replacement, sympy.Eq(v, -sympy.oo)), (v, True))


@dataclass(frozen=True)
class Step:
    """`name = how(expr)`: a reduction over the row (max / sum / mean), a map, or a
    pick: the row expression `expr` at the column given by the index input `at` (NaN
    where that column is outside the row, so an unmasked bad index is never silent)."""
    name: sympy.Symbol
    how: str
    expr: sympy.Expr
    at: sympy.Symbol | None = None


@dataclass
class RowProgram:
    """Steps over one row. `rows` are inputs with the row's shape, `cols` vectors of
    the row's length (a layer norm's weight), `scalars` float inputs with one value
    per row (a cotangent) and `indices` integer ones (a target class), both of the
    rows' shape without the row axis; `params` scalar op parameters (eps); `column`,
    if given, the symbol a map reads as the column's index (0..n-1), and `length` the
    row's length n. Inputs come in
    that order: rows, cols, scalars, indices. The
    last step is the output: a row, or one value per row when it does not vary along
    the row (`reduces`). `axis`: the op parameter naming the row axis (None: the
    last axis)."""
    name: str
    rows: tuple
    steps: tuple
    cols: tuple = ()
    params: tuple = ()
    axis: str | None = None
    indices: tuple = ()
    scalars: tuple = ()
    column: sympy.Symbol | None = None
    length: sympy.Symbol | None = None
    _maps: dict = field(default_factory=dict, repr=False)
    _impls: dict = field(default_factory=dict, repr=False)     # backends' compiled kernels

    def __post_init__(self) -> None:
        known = set(self.rows) | set(self.cols) | set(self.params) | set(self.indices) | set(self.scalars)
        known |= {v for v in (self.column, self.length) if v is not None}
        for st in self.steps:
            if st.how not in KINDS:
                raise ValueError(f"row program {self.name}: step {st.name} has unknown kind "
                                 f"{st.how!r} (expected one of {KINDS})")
            unknown = sympy.sympify(st.expr).free_symbols - known
            if unknown:
                raise ValueError(f"row program {self.name}: step {st.name} reads {sorted(map(str, unknown))} "
                                 f"before they are defined")
            if st.how == "max" and not self.is_row(st.expr):
                raise ValueError(f"row program {self.name}: max reduces a row value by name, "
                                 f"got {st.expr}")
            if (st.how == "pick") != (st.at is not None) or (st.at is not None and st.at not in self.indices):
                raise ValueError(f"row program {self.name}: step {st.name} ({st.how}) needs `at` exactly "
                                 f"when it picks, naming one of the index inputs {self.indices}; got {st.at}")
            if st.how == "pick" and not self.is_row(st.expr):
                raise ValueError(f"row program {self.name}: pick takes a row expression, got {st.expr}")
            known.add(st.name)

    @property
    def out(self) -> Step:
        return self.steps[-1]

    @cached_property
    def reduces(self) -> bool:
        """Is the output one value per row (logsumexp, a loss) rather than a row?
        (Read on every eager call: worked out once.)"""
        return self.out.how != "map" or not self.is_row(self.out.expr)

    def is_row(self, expr: Any) -> bool:
        """Does `expr` vary along the row (reads a row/column input or a row step)?"""
        return not sympy.sympify(expr).free_symbols.isdisjoint(self._row_set)

    def row_symbols(self) -> set:
        """The inputs and map steps that vary along the row."""
        return set(self._row_set)

    @cached_property
    def param_names(self) -> tuple:
        """The params' names, in order: the keys of the op's parameters."""
        return tuple(str(p) for p in self.params)

    @cached_property
    def _row_set(self) -> frozenset:
        full = set(self.rows) | set(self.cols) | ({self.column} if self.column is not None else set())
        for st in self.steps:
            if st.how == "map" and sympy.sympify(st.expr).free_symbols & full:
                full.add(st.name)
        return frozenset(full)

    def inlined(self, expr: Any) -> sympy.Expr:
        """`expr` with every map step substituted (reductions stay row scalars)."""
        maps = {st.name: st.expr for st in self.steps if st.how == "map"}
        e = sympy.sympify(expr)
        for _ in range(len(self.steps)):
            nxt = e.xreplace(maps)
            if nxt == e:
                break
            e = nxt
        return e

    def map_op(self, st: Step) -> tuple[ElementwiseOp, tuple]:
        """The map step as an (unregistered) elementwise op over its free symbols."""
        found = self._maps.get(st.name)
        if found is None:
            args = tuple(sorted(sympy.sympify(st.expr).free_symbols, key=str))
            op = ElementwiseOp(f"{self.name}_{st.name}", sympy.sympify(st.expr), args,
                               differentiable=False, float_result=True)
            found = self._maps[st.name] = (op, args)
        return found


def evaluate(program: RowProgram, be: Any, arrays: Sequence[Any], params: dict) -> Any:
    """Run `program` step by step with backend `be`'s primitives: reductions with
    `be.max` / `be.sum` over the row axis (kept), maps as elementwise ops, picks as
    advanced indexing. A reducing program's output has the row axis removed."""
    n_rows, n_floats = len(program.rows), len(program.rows) + len(program.cols)
    n_scalars = len(program.scalars)
    x = arrays[0]
    axis = params[program.axis] if program.axis else x.ndim - 1
    kept = tuple(1 if d == axis else s for d, s in enumerate(x.shape))
    env: dict = dict(zip(program.rows, arrays[:n_rows]))
    env.update(zip(program.cols, arrays[n_rows:n_floats]))
    env.update({s: be.reshape(a, kept) for s, a in zip(program.scalars, arrays[n_floats:n_floats + n_scalars])})
    env.update({s: params[str(s)] for s in program.params})
    # Index inputs as the row scalars they are (float64, so a class index compares
    # exactly); picks read the integer values. The column index likewise.
    index = {s: be.reshape(a, kept) for s, a in zip(program.indices, arrays[n_floats + n_scalars:])}
    env.update({s: be.astype(a, np.dtype(np.float64)) for s, a in index.items()})
    n = float(x.shape[axis])
    if program.length is not None:
        env[program.length] = n
    if program.column is not None:
        columns = be.arange(0, int(n), 1, np.dtype(np.float64))
        env[program.column] = be.reshape(columns, tuple(int(n) if d == axis else 1 for d in range(len(kept))))
    for st in program.steps:
        if st.how == "map":
            op, args = program.map_op(st)
            env[st.name] = op.forward(be, *(env[a] for a in args))
            continue
        expr = sympy.sympify(st.expr)
        if expr in env:
            value = env[expr]
        else:
            op, args = program.map_op(Step(st.name, "map", expr))
            value = op.forward(be, *(env[a] for a in args))
        if st.how == "pick":
            env[st.name] = _pick(be, value, index[st.at], axis, int(n))
        elif st.how == "max":
            env[st.name] = be.max(value, (axis,), True)
        else:
            total = be.sum(value, (axis,), True)
            env[st.name] = total if st.how == "sum" else _MEAN.forward(be, total, n)
    out = env[program.out.name]
    dtype = np.result_type(*(a.dtype for a in arrays[:n_floats]))
    if not program.reduces:
        return out if out.dtype == dtype else be.astype(out, dtype)
    out = out if out.dtype == dtype else be.astype(out, dtype)
    return be.reshape(out, kept[:axis] + kept[axis + 1:])


def _pick(be: Any, value: Any, at: Any, axis: int, n: int) -> Any:
    """value[..., at, ...] along `axis` (`at` with that axis kept, size 1); NaN where
    `at` is outside [0, n)."""
    inside = logical_and.forward(be, ge.forward(be, at, 0), lt.forward(be, at, n))
    safe = be.where(inside, at, 0)
    shape = tuple(at.shape)
    value = be.broadcast_to(value, shape[:axis] + (n,) + shape[axis + 1:])
    index = []
    for d, size in enumerate(shape):
        if d == axis:
            index.append(safe)
        else:
            r = be.arange(0, size, 1, np.dtype(np.int64))
            index.append(be.reshape(r, tuple(size if e == d else 1 for e in range(len(shape)))))
    return be.where(inside, be.getitem(value, tuple(index)), float("nan"))


_A, _B = symbols("a b")
_MEAN = ElementwiseOp("rows_mean", _A / _B, (_A, _B), differentiable=False, float_result=True)


class RowOp(Op):
    """An op whose forward is a row program: a backend runs it as one kernel when it
    offers `run_rows(program, arrays, params)` (returning None where it declines),
    else the program runs step by step on the backend's primitives."""

    __slots__ = ()

    def __init__(self, name: str, program: RowProgram, *, vjp: Callable | None, infer: Callable,
                 saves: tuple | None, sample: Callable, reference: Callable, doc: str = "") -> None:
        super().__init__(name, kind="rows", forward=self._forward, infer=infer, vjp=vjp,
                         saves=saves, sample=sample, reference=reference, doc=doc)
        self.rows = program

    def _forward(self, be: Any, *arrays: Any, **params: Any) -> Any:
        kernel = getattr(be, "run_rows", None)
        out = None if kernel is None else kernel(self.rows, arrays, params)
        out = out if out is not None else evaluate(self.rows, be, arrays, params)
        if self.rows.reduces and params.get("keepdims"):
            x = arrays[0]
            axis = params[self.rows.axis] if self.rows.axis else x.ndim - 1
            out = be.reshape(out, tuple(1 if d == axis else s for d, s in enumerate(x.shape)))
        return out

    @property
    def zero_at_neg_inf(self) -> bool:
        """Is the output exactly 0 where a single-input program's input is -inf (and
        the row's reductions finite)? True for softmax: masked entries stay zero."""
        prog = self.rows
        if len(prog.rows) != 1 or prog.cols or prog.scalars or prog.indices or prog.reduces:
            return False
        return prog.inlined(prog.out.expr).xreplace({prog.rows[0]: -sympy.oo}) == 0


def rows_op(name: str, program: RowProgram, **kw: Any) -> RowOp:
    """Declare and register a row-program op."""
    return register(RowOp(name, program, **kw))


def infer_axis(name: str, x: Any, axis: int) -> tuple:
    """Shape rule of a one-input row op over `axis`: same shape, floating only."""
    if not 0 <= axis < x.ndim:
        raise ShapeError(f"{name}: axis {axis} out of range for shape {tuple(x.shape)}")
    if np.dtype(x.dtype).kind != "f":
        raise DTypeError(f"{name}: needs a floating tensor, got {x.dtype}")
    return tuple(x.shape), np.dtype(x.dtype)


def infer_last_axis(name: str, x: Any, **cols: Any) -> tuple:
    """Shape rule of a row op over the last axis with per-column vectors `cols`."""
    d = x.shape[-1] if x.ndim else None
    for label, p in cols.items():
        if tuple(p.shape) != (d,):
            raise ShapeError(f"{name}: {label} of shape {tuple(p.shape)} does not match the "
                             f"last axis of x with shape {tuple(x.shape)} (expected ({d},))")
    if np.dtype(x.dtype).kind != "f":
        raise DTypeError(f"{name}: needs a floating tensor, got {x.dtype}")
    return tuple(x.shape), np.result_type(np.dtype(x.dtype), *(np.dtype(p.dtype) for p in cols.values()))
