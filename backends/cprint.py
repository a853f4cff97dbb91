"""sympy -> C / CUDA source for elementwise specs.

One printer serves every place that turns a spec's sympy expression into C: the
CuPy backend's `ElementwiseKernel`s, standalone `.cu` files that CI compiles with
`nvcc` (no GPU needed), C that the system compiler can build for CPU checks, and
the jit's fused kernels. It subclasses sympy's C99 printer and fixes what matters
for kernels:

- float32 code stays float32: literals get an `f` suffix (`0.5f`), math functions
  the `f` suffix (`expf`, `erff`), and constant sub-expressions such as
  `sqrt(2/pi)` are folded into one literal, so no double-precision `M_PI`,
  `M_SQRT2` or `1.0/2.0` slips in (float16 is computed in float32);
- small integer powers are expanded (`x**3 -> (x*x*x)`), never `pow(x, 3)`;
- Heaviside, sign, Max/Min, Piecewise and the logic/relational functions become
  one-line C with NumPy's NaN semantics (maximum/minimum propagate NaN);
- non-finite constants are spelled legally (`INFINITY`, `(-INFINITY)`, `NAN`; the
  CUDA preamble defines them where the compiler's headers do not);
- integer and bool dtypes print integer C (no float literals, no division).
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import sympy
from sympy.codegen.ast import float32 as _sym_float32
from sympy.codegen.ast import float64 as _sym_float64
from sympy.codegen.ast import real as _sym_real
from sympy.printing.c import C99CodePrinter
from sympy.printing.precedence import PRECEDENCE

# Integer powers up to this exponent are written as repeated multiplication.
MAX_EXPANDED_POWER = 6

_INT_CTYPES = {
    np.dtype(np.int8): "signed char", np.dtype(np.int16): "short", np.dtype(np.int32): "int",
    np.dtype(np.int64): "long long", np.dtype(np.uint8): "unsigned char",
    np.dtype(np.uint16): "unsigned short", np.dtype(np.uint32): "unsigned int",
    np.dtype(np.uint64): "unsigned long long",
}

# Defines the non-finite constants where NVRTC has no <math.h>; harmless under nvcc.
CUDA_PREAMBLE = """\
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif
"""


# The symbol elementwise specs use for their own output in stable gradients (sympy
# symbols are equal by name and assumptions, so this is ops.elementwise.OUT without
# importing upwards).
OUT = sympy.Symbol("out", real=True)


class CPrintError(ValueError):
    """An expression (or a part of it) has no C form for the requested dtype."""


def _kind(dtype: Any) -> str:
    """'f' (computed in float), 'd' (double), 'i' (integer) or 'b' (bool)."""
    dt = np.dtype(dtype)
    if dt.kind == "f":
        if dt.itemsize <= 4:
            return "f"
        if dt.itemsize == 8:
            return "d"
    elif dt.kind in "iu" and dt in _INT_CTYPES:
        return "i"
    elif dt.kind == "b":
        return "b"
    raise CPrintError(f"no C kernels for dtype {dt}")


def compute_ctype(dtype: Any) -> str:
    """The C type an element of `dtype` is computed in (float16 is computed in float)."""
    dt = np.dtype(dtype)
    k = _kind(dt)
    return {"f": "float", "d": "double", "b": "bool"}.get(k) or _INT_CTYPES[dt]


def storage_ctype(dtype: Any, target: str) -> str:
    """The C type an element of `dtype` is stored as: target "cupy" (CuPy's device
    types), "cuda" (nvcc with cuda_fp16.h) or "c" (the system C compiler)."""
    dt = np.dtype(dtype)
    if dt == np.float16:
        return {"cupy": "float16", "cuda": "__half", "c": "_Float16"}[target]
    return compute_ctype(dt)


class Constant(sympy.Symbol):
    """A scalar constant of a fused kernel, kept opaque to sympy and printed as its value.

    sympy simplifies as it builds (0*x -> 0, x - x -> 0), which IEEE arithmetic does not
    (0*inf and inf - inf are NaN): a constant substituted as a number could change what a
    kernel computes. As a symbol it stays where the spec put it; `numeric` substitutes
    the values where an analysis wants them."""

    def __new__(cls, value: Any) -> "Constant":
        v = float(value) if isinstance(value, float) else int(value)
        tag = v.hex() if isinstance(v, float) else str(v)
        return super().__new__(cls, f"const[{type(v).__name__}:{tag}]", real=True)

    @property
    def value(self) -> float | int:
        kind, tag = self.name[len("const["):-1].split(":", 1)
        return float.fromhex(tag) if kind == "float" else int(tag)


class Operand(sympy.Function):
    """One argument of one step of a fused kernel, kept opaque to sympy: Operand(e, k)
    with a tag k unique in the expression, printed as e.

    Substituting one step's value into the next lets sympy combine terms across steps
    ((x + 1) - x -> 1, x - x -> 0), which eager evaluation, step by step in IEEE
    arithmetic, does not do (inf - inf is NaN; (1e20 + 1) - 1e20 is 0). Each operand
    distinct and opaque, the printed kernel computes each step as its spec says, in the
    order eager does. A number as `e` is just that number, so analyses that substitute
    values (the band pass, through `numeric`) still see through it."""

    nargs = 2
    is_real = True

    @classmethod
    def eval(cls, e: sympy.Expr, tag: sympy.Expr) -> sympy.Expr | None:
        return e if e.is_number else None


def numeric(expr: sympy.Expr) -> sympy.Expr:
    """`expr` with every `Constant` replaced by its value (sympy then simplifies)."""
    return expr.xreplace({c: sympy.sympify(c.value) for c in expr.atoms(Constant)})


class _KernelPrinter(C99CodePrinter):
    """sympy's C99 printer with kernel-friendly numbers, powers and kinks."""

    def __init__(self, names: Mapping[sympy.Symbol, str], kind: str) -> None:
        super().__init__(settings={
            "type_aliases": {_sym_real: _sym_float32 if kind == "f" else _sym_float64},
            "strict": True})
        self._names = dict(names)
        self._k = kind
        self._floating = kind in "fd"

    # -- numbers -----------------------------------------------------------------------
    def literal(self, value: Any) -> str:
        """A numeric sympy value (or Python number) as a C literal of this kind."""
        v = sympy.sympify(value)
        if v is sympy.nan or v is sympy.zoo:
            if not self._floating:
                raise CPrintError(f"{v} has no integer C form")
            return "NAN"
        if v is sympy.oo or v is sympy.S.NegativeInfinity:
            if not self._floating:
                raise CPrintError(f"{v} has no integer C form")
            return "INFINITY" if v is sympy.oo else "(-INFINITY)"
        if not self._floating:
            if v.is_Integer:
                return str(int(v)) if int(v) >= 0 else f"({int(v)})"
            if v in (sympy.true, sympy.false):
                return "true" if v is sympy.true else "false"
            raise CPrintError(f"the non-integer constant {v} has no {self._k!r}-kind C form")
        n = sympy.N(v, 30)
        if not n.is_real:
            raise CPrintError(f"complex constant {v} in a real kernel")
        f = float(n)
        if self._k == "f":
            with np.errstate(over="ignore"):
                f32 = np.float32(f)
            if not np.isfinite(f32):
                return "INFINITY" if f > 0 else "(-INFINITY)"
            text = str(f32)
        else:
            if not np.isfinite(f):
                return "INFINITY" if f > 0 else "(-INFINITY)"
            text = repr(f)
        if "e" not in text and "." not in text:
            text += ".0"
        if self._k == "f":
            text += "f"
        return f"({text})" if text.startswith("-") else text

    def _print(self, expr: Any, **kwargs: Any) -> str:
        if isinstance(expr, sympy.Expr) and expr.is_number:
            return self.literal(expr)
        if (not self._floating and isinstance(expr, sympy.Function)
                and not isinstance(expr, (sympy.Abs, sympy.sign, sympy.Heaviside, sympy.Max,
                                          sympy.Min, sympy.Piecewise))):
            raise CPrintError(f"{expr.func.__name__} has no {self._k!r}-kind C form")
        return super()._print(expr, **kwargs)

    def _print_Operand(self, expr: Operand) -> str:
        return self._wrap(self._print(expr.args[0]))

    def _print_Symbol(self, expr: sympy.Symbol) -> str:
        if isinstance(expr, Constant):
            return self.literal(expr.value)
        try:
            return self._names[expr]
        except KeyError:
            raise CPrintError(f"symbol {expr} has no C name (known: "
                              f"{sorted(map(str, self._names))})") from None

    # -- arithmetic --------------------------------------------------------------------
    def _factor(self, e: sympy.Expr) -> str:
        return self.parenthesize(e, PRECEDENCE["Mul"], strict=False)

    def _print_Add(self, expr: sympy.Add, order: Any = None) -> str:
        terms = self._as_ordered_terms(expr, order=order)
        # added terms first, then the subtracted ones: x - m - log(s) runs as (x - m) - log(s)
        terms = sorted(terms, key=lambda t: (not t.is_number and t.could_extract_minus_sign()))
        symbolic = [t for t in terms if not t.is_number]
        const = sympy.Add(*[t for t in terms if t.is_number])
        if const != 0:
            symbolic.append(const)
        out = ""
        for t in symbolic:
            negative = bool(t.is_extended_negative) if t.is_number else t.could_extract_minus_sign()
            s = self.parenthesize(-t if negative else t, PRECEDENCE["Add"], strict=True)
            if not out:
                out = f"-{s}" if negative else s
            else:
                out += f" - {s}" if negative else f" + {s}"
        return out

    def _print_Mul(self, expr: sympy.Mul) -> str:
        factors = sympy.Mul.make_args(expr)
        coeff = sympy.Mul(*[f for f in factors if f.is_number])
        rest = [f for f in factors if not f.is_number]
        if not rest:
            return self.literal(coeff)
        sign = ""
        if coeff.is_extended_negative:
            sign, coeff = "-", -coeff
        num, den = [], []
        for f in rest:
            b, e = f.as_base_exp()
            if f.is_Pow and e.is_number and e.is_extended_negative:
                den.append(b if e == -1 else sympy.Pow(b, -e))
            else:
                num.append(f)
        if den and not self._floating:
            raise CPrintError(f"division in {expr} has no {self._k!r}-kind C form")
        parts = [self._factor(f) for f in num]
        if coeff != 1:
            parts.insert(0, self.literal(coeff))
        s = "*".join(parts) if parts else self.literal(1)
        if den:
            d = "*".join(self._factor(f) for f in den)
            s = f"{s}/({d})" if len(den) > 1 else f"{s}/{d}"
        return sign + s

    def _print_Pow(self, expr: sympy.Pow, rational: bool = False) -> str:
        b, e = expr.base, expr.exp
        if isinstance(e, Constant) and float(e.value).is_integer():
            e = sympy.Integer(int(e.value))        # x**2.0 printed as x*x, as before
        elif isinstance(e, Constant) and e.value in (0.5, -0.5):
            e = sympy.Rational(int(e.value * 2), 2)
        one = self.literal(1)
        if e.is_Integer:
            n = int(e)
            if n == 0:
                return one
            if n < 0:
                if not self._floating:
                    raise CPrintError(f"negative power {expr} has no {self._k!r}-kind C form")
                # the divisor parenthesized: 1/(x + y), never 1.0/x + y
                return f"({one}/{self.parenthesize(sympy.Pow(b, -n), PRECEDENCE['Mul'], strict=True)})"
            if n == 1:
                return self._print(b)
            if n <= MAX_EXPANDED_POWER:
                base = self.parenthesize(b, PRECEDENCE["Mul"], strict=False)
                return "(" + "*".join([base] * n) + ")"
        if not self._floating:
            raise CPrintError(f"power {expr} has no {self._k!r}-kind C form")
        if e == sympy.S.Half:
            return f"{self._fn('sqrt')}({self._print(b)})"
        if e == -sympy.S.Half:
            return f"({one}/{self._fn('sqrt')}({self._print(b)}))"
        return f"{self._fn('pow')}({self._print(b)}, {self._print(e)})"

    def _fn(self, name: str) -> str:
        return name + "f" if self._k == "f" else name

    # -- kinks and selections (NumPy semantics: NaN propagates) --------------------------
    def _print_Abs(self, expr: sympy.Abs) -> str:
        a = self._print(expr.args[0])
        if self._floating:
            return f"{self._fn('fabs')}({a})"
        return f"({a} < 0 ? -{self._wrap(a)} : {a})" if self._k == "i" else a

    def _print_sign(self, expr: sympy.sign) -> str:
        a = self._wrap(self._print(expr.args[0]))
        if self._floating:
            z, p, m = self.literal(0), self.literal(1), self.literal(-1)
            return f"({a} > {z} ? {p} : ({a} < {z} ? {m} : {a}))"
        return f"(({a} > 0) - ({a} < 0))" if self._k == "i" else a

    def _print_Heaviside(self, expr: sympy.Heaviside) -> str:
        a = self._wrap(self._print(expr.args[0]))
        h0 = self._print(expr.args[1]) if len(expr.args) > 1 else self.literal(sympy.S.Half)
        z, p = self.literal(0), self.literal(1)
        if self._floating:      # NaN falls through every test and is returned as is
            if len(expr.args) > 1 and expr.args[1] == 0:       # relu's kink: two tests, not three
                return f"({a} > {z} ? {p} : ({a} <= {z} ? {z} : {a}))"
            return f"({a} < {z} ? {z} : ({a} > {z} ? {p} : ({a} == {z} ? {h0} : {a})))"
        return f"({a} < 0 ? 0 : ({a} > 0 ? 1 : {h0}))"

    def _minmax(self, expr: sympy.Expr, op: str) -> str:
        args = sorted(expr.args, key=lambda a: a.is_number)        # constants last
        acc = self._wrap(self._print(args[0]))
        acc_is_number = args[0].is_number
        for arg in args[1:]:
            b = self._wrap(self._print(arg))
            nan = f" || {acc} != {acc}" if self._floating and not acc_is_number else ""
            acc = f"(({acc} {op} {b}{nan}) ? {acc} : {b})"
            acc_is_number = False
        return acc

    def _print_Max(self, expr: sympy.Max) -> str:
        return self._minmax(expr, ">")

    def _print_Min(self, expr: sympy.Min) -> str:
        return self._minmax(expr, "<")

    def _print_Piecewise(self, expr: sympy.Piecewise) -> str:
        last_expr, last_cond = expr.args[-1]
        if last_cond is sympy.true:
            out = self._print(last_expr)
            pairs = expr.args[:-1]
        else:
            if not self._floating:
                raise CPrintError(f"{expr} is undefined somewhere; no integer C form")
            out = "NAN"
            pairs = expr.args
        for e, c in reversed(pairs):
            out = f"({self._print(c)} ? {self._print(e)} : {out})"
        return out

    # -- logic ---------------------------------------------------------------------------
    def _print_Relational(self, expr: sympy.core.relational.Relational) -> str:
        return f"({self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)})"

    def _print_And(self, expr: sympy.And) -> str:
        return "(" + " && ".join(self._wrap(self._print(a)) for a in expr.args) + ")"

    def _print_Or(self, expr: sympy.Or) -> str:
        return "(" + " || ".join(self._wrap(self._print(a)) for a in expr.args) + ")"

    def _print_Not(self, expr: sympy.Not) -> str:
        return f"(!{self._wrap(self._print(expr.args[0]))})"

    @staticmethod
    def _wrap(s: str) -> str:
        """`s` as an operand: names, literals, calls and parenthesised groups as they
        are, anything else in parentheses."""
        if _ATOM.match(s):
            return s
        head = _CALL_HEAD.match(s)
        if head and _one_group(s[head.end() - 1:]):
            return s
        return f"({s})"


_ATOM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$|^[0-9.]+(e[-+]?[0-9]+)?f?$")
_CALL_HEAD = re.compile(r"^[A-Za-z_0-9]*\(")


def _one_group(s: str) -> bool:
    """True when `s` is one parenthesised group: its first '(' closes at its end."""
    depth = 0
    for i, ch in enumerate(s):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return i == len(s) - 1
    return False


def c_expression(expr: sympy.Expr, names: Mapping[sympy.Symbol, str], dtype: Any) -> str:
    """`expr` as one C expression computed in `dtype`'s compute type (see module doc).

    `names` maps each free symbol to the C identifier holding its value. Raises
    CPrintError when the expression has no C form for the dtype (e.g. a non-integer
    power in integer code).
    """
    return _KernelPrinter(names, _kind(dtype)).doprint(sympy.sympify(expr))


# -- kernels -------------------------------------------------------------------------------

def expression_kernel_source(expr: sympy.Expr, symbols: Sequence[sympy.Symbol], dtype: Any,
                             result: str = "same",
                             in_dtypes: Sequence[Any] | None = None) -> tuple[str, str, str]:
    """(in_params, out_params, body) of a `cupy.ElementwiseKernel` computing `expr`.

    Inputs are `in0, in1, ...` (one per symbol, of `dtype`, or of `in_dtypes` where
    given: a `where` condition is bool), the output `out0` (`dtype`, or bool when
    `result == "bool"`). float16 inputs are read into float locals first, so the
    arithmetic is float32 and the store rounds once.
    """
    dt = np.dtype(dtype)
    _kind(dt)
    out_dt = np.dtype(bool) if result == "bool" else dt
    lines = []
    if dt == np.float16:
        used = sympy.sympify(expr).free_symbols
        names = {s: f"h{i}" for i, s in enumerate(symbols)}
        lines += [f"const float h{i} = (float)in{i};" for i, s in enumerate(symbols) if s in used]
    else:
        names = {s: f"in{i}" for i, s in enumerate(symbols)}
    lines.append(f"out0 = {c_expression(expr, names, dt)};")
    in_dts = [np.dtype(d) for d in in_dtypes] if in_dtypes is not None else [dt] * len(symbols)
    in_params = ", ".join(f"{d.name} in{i}" for i, d in enumerate(in_dts))
    return in_params, f"{out_dt.name} out0", " ".join(lines)


def elementwise_kernel_source(spec: Any, dtype: Any) -> tuple[str, str, str]:
    """(in_params, out_params, body) for the forward of elementwise op `spec` in
    `dtype`, printed from its numerically stable form `spec.impl_expr`."""
    return expression_kernel_source(spec.impl_expr, spec.symbols, dtype, spec.result)


def derivative_kernel_source(spec: Any, i: int, dtype: Any) -> tuple[str, str, str]:
    """(in_params, out_params, body) of d out / d input i of `spec`: inputs are the op's
    inputs followed by its output (the `out` symbol the stable gradients use)."""
    return expression_kernel_source(spec.grads[i], tuple(spec.symbols) + (OUT,), dtype)


def kernel_name(spec_name: str, dtype: Any, suffix: str = "") -> str:
    """A C identifier for the kernel of op `spec_name` in `dtype` (CPrintError when the
    op's name could not be part of one: it would be C text, not a name)."""
    name = f"engine_{spec_name}{suffix}_{np.dtype(dtype).name}"
    if not name.isidentifier() or not name.isascii():
        raise CPrintError(f"op name {spec_name!r} cannot name a C kernel: not an identifier")
    return name


def parse_params(params: str) -> list[tuple[np.dtype, str]]:
    """'float32 in0, bool out0' -> [(dtype('float32'), 'in0'), (dtype('bool'), 'out0')]."""
    out = []
    for p in filter(None, (q.strip() for q in params.split(","))):
        t, name = p.split()
        out.append((np.dtype(t), name))
    return out


def _flat_kernel(name: str, in_params: str, out_params: str, body: str, target: str) -> str:
    """One function applying `body` to flat arrays: a grid-stride CUDA kernel
    (target "cuda") or a plain C loop (target "c")."""
    ins, outs = parse_params(in_params), parse_params(out_params)
    args = [f"const {storage_ctype(d, target)}* __restrict__ {n}_p" for d, n in ins]
    args += [f"{storage_ctype(d, target)}* __restrict__ {n}_p" for d, n in outs]
    loads = " ".join(f"const {storage_ctype(d, target)} {n} = {n}_p[i]; (void){n};" for d, n in ins)
    decls = " ".join(f"{storage_ctype(d, target)} {n};" for d, n in outs)
    stores = " ".join(f"{n}_p[i] = {n};" for _, n in outs)
    inner = f"    {loads}\n    {decls}\n    {{ {body} }}\n    {stores}\n"
    if target == "cuda":
        return (f'extern "C" __global__ void {name}({", ".join(args)}, long long n) {{\n'
                f"  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;\n"
                f"       i += (long long)blockDim.x * gridDim.x) {{\n{inner}  }}\n}}\n")
    c_args = ", ".join(["long long n"] + [a.replace("__restrict__", "restrict") for a in args])
    return f"void {name}({c_args}) {{\n  for (long long i = 0; i < n; ++i) {{\n{inner}  }}\n}}\n"


def cuda_translation_unit(kernels: Iterable[tuple[str, str, str, str]]) -> str:
    """A complete `.cu` file: one `__global__` kernel over flat arrays per
    (name, in_params, out_params, body), for `nvcc -c` (float16 as `__half`)."""
    parts = ["#include <cuda_fp16.h>\n", CUDA_PREAMBLE]
    parts += [_flat_kernel(*k, target="cuda") for k in kernels]
    return "\n".join(parts)


def c_translation_unit(kernels: Iterable[tuple[str, str, str, str]]) -> str:
    """A complete C99 file for the system compiler: `void name(long long n, const T*
    in0_p, ..., T* out0_p)` per kernel (float16 as `_Float16`)."""
    parts = ["#include <math.h>\n#include <stdbool.h>\n"]
    parts += [_flat_kernel(*k, target="c") for k in kernels]
    return "\n".join(parts)


def elementwise_cuda_source(spec: Any, dtype: Any) -> str:
    """A standalone `.cu` translation unit with the forward kernel of `spec` in `dtype`."""
    return cuda_translation_unit([(kernel_name(spec.name, dtype),
                                   *elementwise_kernel_source(spec, dtype))])


__all__ = ["CPrintError", "CUDA_PREAMBLE", "c_expression", "compute_ctype", "storage_ctype",
           "expression_kernel_source", "elementwise_kernel_source", "derivative_kernel_source",
           "kernel_name", "parse_params", "cuda_translation_unit", "c_translation_unit",
           "elementwise_cuda_source"]
