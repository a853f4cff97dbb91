"""The op spec: one declaration per primitive, and the registry that lists them.

An `Op` is called like a function. The call goes to the active interpreter
(eager, tracing, ...), which the engine installs with `set_dispatcher`; this is
JAX's `bind`. VJPs are written by calling ops, so the backward pass is itself a
graph of ops: it can be differentiated again, traced and run symbolically.
"""
from __future__ import annotations

from typing import Any, Callable

REGISTRY: dict[str, "Op"] = {}

# The autocast classes an op may declare (None: run in the inputs' dtypes).
AUTOCAST_CLASSES = (None, "lower")


def _no_dispatcher(op: "Op", args: tuple, params: dict) -> Any:
    raise RuntimeError(f"{op.name}: no interpreter is installed; `import engine` first")


_dispatch: list[Callable[["Op", tuple, dict], Any]] = [_no_dispatcher]


def set_dispatcher(fn: Callable[["Op", tuple, dict], Any]) -> None:
    """Install the function every op call goes through (done once by `engine`)."""
    _dispatch[0] = fn


def _never_offered(op: "Op", args: tuple, params: dict) -> bool:
    return False


_offers: list[Callable[["Op", tuple, dict], bool]] = [_never_offered]


def set_offers(fn: Callable[["Op", tuple, dict], bool]) -> None:
    """Install the function `offers` asks (done once by `engine`)."""
    _offers[0] = fn


def offers(op: "Op", args: tuple, params: dict) -> bool:
    """Does the backend of `args` run the optional op `op` on these inputs? A composite
    asks before calling a fused op that only some backends have a kernel for (the fused
    attention), and computes the same value from primitives where the answer is no."""
    return _offers[0](op, args, params)


class Op:
    """A primitive operation.

    forward(backend, *raw_inputs, **params) -> raw output
    vjp(g, out, *inputs, **params) -> one gradient (or None) per input, in ops
    infer(*inputs, **params) -> (shape, dtype) from inputs' .shape/.dtype only
    sample(rng) -> list of (inputs, params) to test with (NumPy arrays / scalars)
    reference(*numpy_inputs, **params) -> the NumPy value the op stands for
    saves: positions of the inputs whose values the VJP reads (-1: the output);
           None means all. Autograd keeps only these values alive for backward and
           checks only these for in-place changes: any other non-leaf input reaches
           the VJP as a data-less edge (shape, dtype, ndim, device only; reading its
           value raises), and so may the output unless -1 is listed.

    Traits: what the engine, the compiler and the backends read instead of the op's name.
    (Elementwise ops need none for identities: engine/compiler/identities.py derives
    x*1 = x and the like from their sympy expressions.)
    autocast: "lower" runs the op in the low-precision dtype inside `eg.autocast` (its
           float inputs are cast); None keeps its inputs' dtypes.
    no_op_when(params, in_shape, out_shape) -> bool: the op returns its first input
           unchanged when this holds (the compiler drops it, but only where the output
           also has the input's shape and dtype).
    compose(inner, outer) -> params: op(op(x, **inner), **outer) == op(x, **params), so
           the compiler folds a chain of the op into one node.
    permutation(params) -> axes: output axis i is input axis axes[i] (a transpose).
    keeps_matrices: when the last two axes keep their sizes, every trailing matrix of the
           output is one of the input's (reshape, broadcast_to): a zero band survives.
    contraction: the op is `a @ b` with NumPy's matmul rules (BLAS may write it into a
           buffer; the compiler may compute it block by block).
    reduction: the monoid a reduction folds with over `axis` ("sum", "max"), or None.
    may_alias: the output may be the input array itself although the op is no view
           (astype to the dtype it has), so buffers must not be reused under it.
    method: the array method computing the op from its one parameter (`x.reshape(shape)`),
           which generated code calls inline on backends whose arrays have NumPy's methods.
    """

    __slots__ = ("name", "kind", "forward", "vjp", "infer", "view", "random",
                 "sample", "reference", "doc", "saves", "autocast", "no_op_when", "compose",
                 "permutation", "keeps_matrices", "contraction", "reduction", "may_alias",
                 "method", "_impls", "__dict__")

    def __init__(self, name: str, *, kind: str, forward: Callable, infer: Callable,
                 vjp: Callable | None = None, view: bool = False, random: bool = False,
                 sample: Callable | None = None, reference: Callable | None = None,
                 saves: tuple[int, ...] | None = None, doc: str = "",
                 autocast: str | None = None, no_op_when: Callable | None = None,
                 compose: Callable | None = None, permutation: Callable | None = None,
                 keeps_matrices: bool = False, contraction: bool = False,
                 reduction: str | None = None, may_alias: bool = False,
                 method: str | None = None) -> None:
        if autocast not in AUTOCAST_CLASSES:
            raise ValueError(f"op {name!r}: autocast must be one of {AUTOCAST_CLASSES}, got {autocast!r}")
        self.name = name
        self.kind = kind
        self.forward = forward
        self.vjp = vjp
        self.infer = infer
        self.view = view
        self.random = random
        self.sample = sample
        self.reference = reference
        self.doc = doc
        self.saves = saves
        self.autocast = autocast
        self.no_op_when = no_op_when
        self.compose = compose
        self.permutation = permutation
        self.keeps_matrices = keeps_matrices
        self.contraction = contraction
        self.reduction = reduction
        self.may_alias = may_alias
        self.method = method
        self._impls: dict[int, Callable] = {}

    @property
    def differentiable(self) -> bool:
        return self.vjp is not None

    def __call__(self, *args: Any, **params: Any) -> Any:
        return _dispatch[0](self, args, params)

    def __repr__(self) -> str:
        return f"<op {self.name} ({self.kind})>"


def register(op: Op) -> Op:
    """Add `op` to the registry; names are unique."""
    if op.name in REGISTRY:
        raise ValueError(f"op {op.name!r} is registered twice")
    REGISTRY[op.name] = op
    return op
