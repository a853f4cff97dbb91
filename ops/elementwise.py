"""Elementwise ops, each declared by a sympy expression.

From the expression come the forward (a backend lambdifies it, or uses a native
function the tests prove equal), the derivative (`sympy.diff`, or a stable form
written with `out` that the tests prove equal to it), the C source of fused
kernels, and the symbolic evaluation. Broadcasting is undone in one place:
`ElementwiseOp._vjp` sums each input's gradient back to the input's shape with
`sum_to` (ops/reduce.py, which the elementwise ops therefore sit above).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import mpmath
import numpy as np
import sympy
from sympy.codegen.cfunctions import log1p

from . import numpy_impls, sympy_ops
from .errors import DTypeError
from .reduce import sum_to
from .shapes import broadcast_shapes, shape_of
from .spec import Op, register

X, Y = sympy.symbols("x y", real=True)
P, Q = sympy.symbols("p q")          # truth values, for the logical ops
OUT = sympy.Symbol("out", real=True)
_FLOAT32 = np.dtype(np.float32)


def _is_scalar(v: Any) -> bool:
    return sympy_ops._is_number(v)


class ElementwiseOp(Op):
    """An op defined pointwise by a sympy expression of its inputs."""

    __slots__ = ()

    def __init__(self, name: str, expr: sympy.Expr, symbols: Sequence[sympy.Symbol], *,
                 grads: Sequence[sympy.Expr] | None = None, differentiable: bool = True,
                 float_result: bool = False, result: str = "same",
                 impl_expr: sympy.Expr | None = None, domain: str = "real",
                 numpy: Callable | None = None, cost: int | None = None,
                 condition: int | None = None, vjp: Callable | None = None, doc: str = "") -> None:
        super().__init__(name, kind="elementwise", forward=self._forward, infer=self._infer,
                         vjp=(vjp or self._vjp) if differentiable else None, doc=doc)
        self.condition = condition                 # the input that must be bool (a select's)
        self.expr = expr
        self.symbols = tuple(symbols)
        self.nin = len(symbols)
        self.float_result = float_result
        self.result = result                       # "same" or "bool"
        self.impl_expr = impl_expr if impl_expr is not None else expr
        self.domain = domain
        # The NumPy function computing exactly `expr` (a ufunc, or one with out=), if any:
        # backends use it instead of a lambdified expression (CuPy: the ufunc of that name).
        self.numpy = numpy
        # Whole-array NumPy calls its forward costs: a fused kernel replacing a few pays.
        self.cost = cost if cost is not None else (
            1 if isinstance(numpy, np.ufunc) else max(1, int(sympy.count_ops(self.impl_expr))))
        self.c_math = _c_math(self.impl_expr)
        self.derived_grads = tuple(sympy.diff(expr, s) for s in self.symbols)
        self.grads = tuple(grads) if grads is not None else self.derived_grads
        used = set().union(*(g.free_symbols for g in self.grads)) if self.grads else set()
        self.saves = tuple(i for i, s in enumerate(self.symbols) if s in used) + \
            ((-1,) if OUT in used else ())
        self._grad_fns: tuple[Callable, ...] | None = None
        self.sample = functools.partial(_sample_elementwise, self)
        self.reference = _mpmath_reference(self)

    # -- forward -------------------------------------------------------------------
    def impl(self, backend: Any) -> Callable[..., Any]:
        """This op's callable on `backend`, built once."""
        fn = self._impls.get(id(backend))
        if fn is None:
            fn = self._impls[id(backend)] = backend.elementwise_fn(self)
        return fn

    def _forward(self, backend: Any, *args: Any) -> Any:
        if self.condition is not None:
            self._infer(*args)          # NumPy would silently accept a non-bool condition
        if self.float_result:
            args = tuple(a if _is_scalar(a) or a.dtype.kind in "fc" else backend.astype(a, _FLOAT32)
                         for a in args)
        return self.impl(backend)(*args)

    # -- rules -----------------------------------------------------------------------
    def _infer(self, *args: Any) -> tuple[tuple, Any]:
        if len(args) != self.nin:
            raise TypeError(f"{self.name}: expected {self.nin} inputs, got {len(args)}")
        if self.condition is not None and np.dtype(args[self.condition].dtype) != np.dtype(bool):
            raise DTypeError(f"{self.name}: condition must be bool, got {args[self.condition].dtype} "
                             f"(compare it first, e.g. mask > 0)")
        shape = broadcast_shapes(self.name, *(shape_of(a) for a in args))
        return shape, self.result_dtype(*(a if _is_scalar(a) else a.dtype for a in args))

    def result_dtype(self, *dtypes: Any) -> np.dtype:
        """The output dtype for input dtypes (Python scalars stand for themselves)."""
        # Cached by scalar type as well as value: 1 == 1.0 == True would share an entry.
        return self._result_dtype(*((type(d), d) if _is_scalar(d) else d for d in dtypes))

    @functools.lru_cache(maxsize=None)
    def _result_dtype(self, *keys: Any) -> np.dtype:
        dtypes = [k[1] if type(k) is tuple else k for k in keys]
        if self.result == "bool":
            return np.dtype(bool)
        vals = []
        for d in dtypes:
            if _is_scalar(d):
                vals.append(d)
            else:
                d = np.dtype(d)
                if self.float_result and d.kind not in "fc":
                    d = _FLOAT32
                vals.append(np.empty(0, d))
        dt = np.result_type(*vals)
        if self.float_result and dt.kind not in "fc":
            dt = _FLOAT32
        return dt

    # -- gradient ----------------------------------------------------------------------
    def grad_fns(self) -> tuple[Callable, ...]:
        """One function of (*inputs, out) per input: the partial derivative, in ops."""
        if self._grad_fns is None:
            syms = self.symbols + (OUT,)
            self._grad_fns = tuple(sympy_ops.build(g, syms) for g in self.grads)
        return self._grad_fns

    def _vjp(self, g: Any, out: Any, inputs: tuple, needs: tuple) -> tuple:
        fns = self.grad_fns()
        grads = []
        for i, x in enumerate(inputs):
            if not needs[i]:
                grads.append(None)
                continue
            d = fns[i](*inputs, out)
            if _is_scalar(d) and d == 0:
                grads.append(None)
                continue
            grads.append(sum_to(sympy_ops.call("mul", g, d), x.shape))
        return tuple(grads)


# Functions whose C form vectorises only through glibc's vector math library (libmvec;
# their C names are backends.cbuild's _VECTOR_FUNCTIONS, which a test keeps in step).
_VECTOR_MATH = (sympy.exp, sympy.log, log1p, sympy.tanh, sympy.erf)
# Functions the kernel printer writes as plain vectorisable C (compares, selects, fabs).
_PLAIN = (sympy.Abs, sympy.sign, sympy.Heaviside, sympy.Max, sympy.Min, sympy.Piecewise)


def _c_math(expr: sympy.Expr) -> str | None:
    """How a C loop over `expr` vectorises: "plain" (arithmetic, sqrt, selects), "vector"
    (needs libmvec's exp/log/log1p/tanh/erf), or None (a call GCC will not vectorise without
    -ffast-math, such as pow with a variable exponent)."""
    needs = "plain"
    for f in sympy.preorder_traversal(expr):
        if isinstance(f, _VECTOR_MATH):
            needs = "vector"
        elif isinstance(f, sympy.Function) and not isinstance(f, _PLAIN):
            return None
        elif isinstance(f, sympy.Pow) and not (f.exp.is_Integer or f.exp in (sympy.S.Half, -sympy.S.Half)):
            return None
    return needs


def _sig(x: sympy.Expr) -> sympy.Expr:
    """sigmoid in its overflow-free tanh form, for stable derivatives."""
    return (1 + sympy.tanh(x / 2)) / 2


# -- test sampling ------------------------------------------------------------------------

def _draw(domain: Any, rng: np.random.Generator, shape: tuple, position: int) -> np.ndarray:
    if isinstance(domain, tuple):         # one domain per input
        domain = domain[position]
    if domain == "bool":
        return rng.random(shape) < 0.5
    if domain == "positive":
        return rng.uniform(0.5, 2.0, shape)
    if domain == "nonzero":          # away from a kink at 0
        return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.2, 2.0, shape)
    if domain == "separated":        # two inputs never within 0.2 of each other
        return (rng.standard_normal(shape) + 3.0 * position) if position else rng.standard_normal(shape)
    return rng.standard_normal(shape)


_SHAPE_CASES = [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((3, 1), (1, 4)), ((1,), (2, 3)),
                ((), (2, 2)), ((5,), ())]


def _sample_elementwise(op: ElementwiseOp, rng: np.random.Generator) -> list:
    cases = []
    if op.nin > 2:
        for shapes in ([(3, 4)] * op.nin, [(2, 3)] * 3 + [()] * (op.nin - 3),
                       [(4,)] + [(3, 4)] * (op.nin - 1)):
            cases.append(([_draw(op.domain, rng, s, i) for i, s in enumerate(shapes)], {}))
        return cases
    for shapes in _SHAPE_CASES:
        args = [_draw(op.domain, rng, s, i) for i, s in enumerate(shapes[:op.nin])]
        cases.append((args, {}))
    if op.nin == 2 and op.name not in ("heaviside",):
        cases.append(([_draw(op.domain, rng, (2, 3), 0), 1.5], {}))    # tensor op Python scalar
    return cases


# Digits the reference works with: the textbook expressions cancel (log(1 + exp(-40)) is
# 0 at float64's 16 digits). 1 + v, v down to float64's least subnormal 4.9e-324, keeps
# v's 17 digits at 341.
_REFERENCE_DIGITS = 350


def _mpmath_reference(op: ElementwiseOp) -> Callable[..., np.ndarray]:
    """An independent evaluation of the expression (mpmath, element by element, at
    `_REFERENCE_DIGITS` digits so that the reference does not cancel where the op must not)."""
    fn = sympy.lambdify(op.symbols, op.expr, modules="mpmath")

    def one(*a: Any) -> Any:
        with mpmath.workdps(_REFERENCE_DIGITS):
            v = fn(*a)
            return float(v) if op.result != "bool" else bool(v)

    def ref(*args: Any) -> np.ndarray:
        out = np.vectorize(one, otypes=[object])(*args)
        return np.asarray(out.tolist(), dtype=bool if op.result == "bool" else np.float64)
    return ref


# -- declarations ---------------------------------------------------------------------------

def elementwise(name: str, fn: Callable[..., sympy.Expr], *, grads: Callable | None = None,
                logical: bool = False, **kw: Any) -> ElementwiseOp:
    """Declare and register an elementwise op from a sympy-building function.

    Unary and binary ops use the symbols x, y (p, q for logical ops); wider ops get
    one real symbol per argument, named as the function's parameters.
    """
    n = fn.__code__.co_argcount
    if n <= 2:
        symbols = ((P, Q) if logical else (X, Y))[:n]
    else:
        symbols = tuple(sympy.Symbol(a, real=True) for a in fn.__code__.co_varnames[:n])
    expr = fn(*symbols)
    g = grads(*symbols, OUT) if grads is not None else None
    impl = kw.pop("impl", None)
    return register(ElementwiseOp(name, expr, symbols, grads=g,
                                  impl_expr=impl(*symbols) if impl else None, **kw))


add = elementwise("add", lambda a, b: a + b, numpy=np.add)
sub = elementwise("sub", lambda a, b: a - b, numpy=np.subtract)
mul = elementwise("mul", lambda a, b: a * b, numpy=np.multiply)
div = elementwise("div", lambda a, b: a / b, grads=lambda a, b, out: (1 / b, -out / b),
                  float_result=True, domain="positive", numpy=np.true_divide)
neg = elementwise("neg", lambda x: -x, numpy=np.negative)
# At a = 0 the textbook partials are 0 * inf = NaN; PyTorch's (pow_backward_self and
# _exponent) are 0 there: d/da where b = 0 (a**0 is constant), d/db where a = 0 <= b
# (0**b is constant for b > 0). Equal to sympy.diff on the positive domain.
pow = elementwise("pow", lambda a, b: a ** b,
                  grads=lambda a, b, out: (sympy.Piecewise((0, sympy.Eq(b, 0)), (b * a ** (b - 1), True)),
                                           sympy.Piecewise((0, sympy.Eq(a, 0) & (b >= 0)),
                                                           (out * sympy.log(a), True))),
                  domain="positive", numpy=np.power)
exp = elementwise("exp", lambda x: sympy.exp(x), grads=lambda x, out: (out,), float_result=True, numpy=np.exp)
log = elementwise("log", lambda x: sympy.log(x), float_result=True, domain="positive", numpy=np.log)
sqrt = elementwise("sqrt", lambda x: sympy.sqrt(x), grads=lambda x, out: (1 / (2 * out),),
                   float_result=True, domain="positive", numpy=np.sqrt)
rsqrt = elementwise("rsqrt", lambda x: 1 / sympy.sqrt(x), grads=lambda x, out: (-out ** 3 / 2,), cost=2,
                    float_result=True, domain="positive", numpy=numpy_impls.rsqrt)
abs = elementwise("abs", lambda x: sympy.Abs(x), domain="nonzero", numpy=np.abs)
tanh = elementwise("tanh", lambda x: sympy.tanh(x), grads=lambda x, out: (1 - out ** 2,),
                   float_result=True, numpy=np.tanh)
sigmoid = elementwise("sigmoid", lambda x: 1 / (1 + sympy.exp(-x)),
                      grads=lambda x, out: (out * (1 - out),),
                      impl=lambda x: (1 + sympy.tanh(x / 2)) / 2,    # never overflows
                      float_result=True)
# relu'(x) = [x > 0] = [relu(x) > 0] (relu'(0) = 0): stated on the output, which the
# next layer's matmul keeps anyway, so backward holds no copy of the input.
relu = elementwise("relu", lambda x: sympy.Max(x, 0),
                   grads=lambda x, out: (sympy.Heaviside(out, 0),),
                   domain="nonzero", numpy=numpy_impls.relu)
gelu = elementwise("gelu", lambda x: x * (1 + sympy.erf(x / sympy.sqrt(2))) / 2,
                   float_result=True)
gelu_tanh = elementwise(
    "gelu_tanh",
    lambda x: x * (1 + sympy.tanh(sympy.sqrt(2 / sympy.pi) * (x + sympy.Rational(44715, 10**6) * x ** 3))) / 2,
    float_result=True)
silu = elementwise("silu", lambda x: x / (1 + sympy.exp(-x)),
                   grads=lambda x, out: (_sig(x) * (1 + x * (1 - _sig(x))),),
                   impl=lambda x: x * (1 + sympy.tanh(x / 2)) / 2,      # never overflows
                   float_result=True, doc="x * sigmoid(x) (swish)")
# log(1 + exp(x)) declared in its overflow-free form (equal for every real x).
softplus = elementwise("softplus", lambda x: sympy.Max(x, 0) + sympy.log(1 + sympy.exp(-sympy.Abs(x))),
                       # sigmoid(x); not 1 - exp(-out), which cancels in float32 (x = -8: 2e-4 off)
                       grads=lambda x, out: (1 / (1 + sympy.exp(-x)),),
                       # log1p: 1 + exp(x) rounds to 1 below x = -17 in float32 (-37 in
                       # float64), so log(1 + ...) gave softplus(-20) = 0, not 2.06e-9
                       impl=lambda x: sympy.Max(x, 0) + log1p(sympy.exp(-sympy.Abs(x))),
                       float_result=True, domain="nonzero", doc="log(1 + exp(x)) without overflow")
erf = elementwise("erf", lambda x: sympy.erf(x), float_result=True, numpy=numpy_impls.erf)
maximum = elementwise("maximum", lambda a, b: sympy.Max(a, b),       # ties share the gradient
                      grads=lambda a, b, out: (sympy.Heaviside(a - b, sympy.S.Half),
                                               sympy.Heaviside(b - a, sympy.S.Half)),
                      domain="separated", numpy=np.maximum)
minimum = elementwise("minimum", lambda a, b: sympy.Min(a, b),
                      grads=lambda a, b, out: (sympy.Heaviside(b - a, sympy.S.Half),
                                               sympy.Heaviside(a - b, sympy.S.Half)),
                      domain="separated", numpy=np.minimum)

# Not differentiable (their outputs never require grad).
sign = elementwise("sign", lambda x: sympy.sign(x), differentiable=False, numpy=np.sign)
heaviside = elementwise("heaviside", lambda x, h: sympy.Heaviside(x, h), differentiable=False, numpy=numpy_impls.heaviside, cost=3)
eq = elementwise("eq", lambda a, b: sympy.Eq(a, b), differentiable=False, result="bool", numpy=np.equal)
ne = elementwise("ne", lambda a, b: sympy.Ne(a, b), differentiable=False, result="bool", numpy=np.not_equal)
lt = elementwise("lt", lambda a, b: a < b, differentiable=False, result="bool", numpy=np.less)
le = elementwise("le", lambda a, b: a <= b, differentiable=False, result="bool", numpy=np.less_equal)
gt = elementwise("gt", lambda a, b: a > b, differentiable=False, result="bool", numpy=np.greater)
ge = elementwise("ge", lambda a, b: a >= b, differentiable=False, result="bool", numpy=np.greater_equal)
logical_and = elementwise("logical_and", lambda a, b: sympy.And(a, b), differentiable=False,
                          result="bool", logical=True, domain="bool", numpy=np.logical_and)
logical_or = elementwise("logical_or", lambda a, b: sympy.Or(a, b), differentiable=False,
                         result="bool", logical=True, domain="bool", numpy=np.logical_or)
logical_not = elementwise("logical_not", lambda a: sympy.Not(a), differentiable=False,
                          result="bool", logical=True, domain="bool", numpy=np.logical_not)

# Optimizer updates: each a single op per parameter instead of a dozen, so an Adam
# step costs three dispatches per parameter (and one fused kernel each on a GPU).
lerp = elementwise("lerp", lambda start, end, weight: start + weight * (end - start),
                   domain=("real", "real", "positive"), numpy=numpy_impls.lerp)
ema_sq = elementwise("ema_sq", lambda avg, value, beta: beta * avg + (1 - beta) * value * value,
                     domain=("positive", "real", "positive"), numpy=numpy_impls.ema_sq)
adam_param = elementwise(
    "adam_param",
    lambda param, m, v, step_size, bc2_sqrt, decay, eps:
        param * decay - step_size * m / (sympy.sqrt(v) / bc2_sqrt + eps),
    domain=("real", "real", "positive", "positive", "positive", "positive", "positive"),
    float_result=True,
    doc="decoupled-decay Adam update: p*decay - step_size*m/(sqrt(v)/sqrt(1-b2^t) + eps)", numpy=numpy_impls.adam_param)


def _where_vjp(g: Any, out: Any, inputs: tuple, needs: tuple) -> tuple:
    """The gradient selected like the values (no multiply by a 0/1 mask)."""
    c, a, b = inputs
    ga = sum_to(where(c, g, 0.0), tuple(a.shape)) if needs[1] else None
    gb = sum_to(where(c, 0.0, g), tuple(b.shape)) if needs[2] else None
    return None, ga, gb


# A select: its condition (bool, read as 0/1) joins fused kernels like any input.
where = elementwise("where", lambda cond, a, b: sympy.Piecewise((a, sympy.Ne(cond, 0)), (b, True)),
                    domain=("bool", "real", "real"), condition=0, vjp=_where_vjp, numpy=np.where,
                    doc="a where cond else b (cond must be bool)")
