"""The op spec: one declaration per primitive, and the registry that lists them.

An `Op` is called like a function. The call goes to the active interpreter
(eager, tracing, ...), which the engine installs with `set_dispatcher`; this is
JAX's `bind`. VJPs are written by calling ops, so the backward pass is itself a
graph of ops: it can be differentiated again, traced and run symbolically.
"""
from __future__ import annotations

from typing import Any, Callable

REGISTRY: dict[str, "Op"] = {}


def _no_dispatcher(op: "Op", args: tuple, params: dict) -> Any:
    raise RuntimeError(f"{op.name}: no interpreter is installed; `import engine` first")


_dispatch: list[Callable[["Op", tuple, dict], Any]] = [_no_dispatcher]


def set_dispatcher(fn: Callable[["Op", tuple, dict], Any]) -> None:
    """Install the function every op call goes through (done once by `engine`)."""
    _dispatch[0] = fn


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
    """

    __slots__ = ("name", "kind", "forward", "vjp", "infer", "view", "random",
                 "sample", "reference", "doc", "saves", "_impls", "__dict__")

    def __init__(self, name: str, *, kind: str, forward: Callable, infer: Callable,
                 vjp: Callable | None = None, view: bool = False, random: bool = False,
                 sample: Callable | None = None, reference: Callable | None = None,
                 saves: tuple[int, ...] | None = None, doc: str = "") -> None:
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
