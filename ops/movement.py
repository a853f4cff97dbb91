"""Movement and selection ops: reshape, transpose, concatenate, pad, indexing, cast,
stop_gradient. Each VJP is written with ops of this module (`broadcast_to`, whose VJP
is a sum, lives with `sum` in ops/reduce.py)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import DTypeError, ShapeError
from .shapes import broadcast_shapes, prod
from .spec import Op, register


def _dt(x: Any) -> np.dtype:
    return np.dtype(x.dtype)


# -- traits the compiler reads (ops/spec.py) ---------------------------------------------------

def same_shape(params: dict, in_shape: tuple, out_shape: tuple) -> bool:
    """No-op test of reshape-like ops: nothing changes when the shape does not."""
    return tuple(in_shape) == tuple(out_shape)


def _always(params: dict, in_shape: tuple, out_shape: tuple) -> bool:
    return True


def outer_params(inner: dict, outer: dict) -> dict:
    """Compose rule of ops whose result depends only on the outer call (reshape of a reshape)."""
    return dict(outer)


def _identity_axes(params: dict, in_shape: tuple, out_shape: tuple) -> bool:
    return tuple(params["axes"]) == tuple(range(len(params["axes"])))


def _compose_axes(inner: dict, outer: dict) -> dict:
    """transpose(transpose(x, a), b) == transpose(x, a[b])."""
    return {"axes": tuple(inner["axes"][i] for i in outer["axes"])}


# -- reshape / transpose -----------------------------------------------------

def _infer_reshape(x: Any, shape: tuple) -> tuple:
    if prod(shape) != prod(x.shape) or any(d < 0 for d in shape):
        raise ShapeError(f"reshape: cannot reshape a tensor of shape {tuple(x.shape)} "
                         f"({prod(x.shape)} elements) into shape {shape}")
    return shape, _dt(x)


reshape = register(Op(
    "reshape", kind="movement", view=True, saves=(),
    no_op_when=same_shape, compose=outer_params, keeps_matrices=True, method="reshape",
    forward=lambda be, x, shape: be.reshape(x, shape),
    infer=_infer_reshape,
    vjp=lambda g, out, inputs, needs, shape: (reshape(g, shape=tuple(inputs[0].shape)),),
    sample=lambda rng: [([rng.standard_normal((2, 3, 4))], dict(shape=(6, 4))),
                        ([rng.standard_normal((6,))], dict(shape=(1, 2, 3, 1))),
                        ([rng.standard_normal(())], dict(shape=(1, 1)))],
    reference=lambda x, shape: np.reshape(x, shape)))


def _infer_transpose(x: Any, axes: tuple) -> tuple:
    if sorted(axes) != list(range(x.ndim)):
        raise ShapeError(f"transpose: axes {axes} are not a permutation of the "
                         f"{x.ndim} axes of a tensor of shape {tuple(x.shape)}")
    return tuple(x.shape[a] for a in axes), _dt(x)


def _inverse_permutation(axes: tuple) -> tuple:
    inv = [0] * len(axes)
    for i, a in enumerate(axes):
        inv[a] = i
    return tuple(inv)


transpose = register(Op(
    "transpose", kind="movement", view=True, saves=(),
    no_op_when=_identity_axes, compose=_compose_axes, permutation=lambda params: tuple(params["axes"]),
    method="transpose",
    forward=lambda be, x, axes: be.transpose(x, axes),
    infer=_infer_transpose,
    vjp=lambda g, out, inputs, needs, axes: (transpose(g, axes=_inverse_permutation(axes)),),
    sample=lambda rng: [([rng.standard_normal((2, 3, 4))], dict(axes=(2, 0, 1))),
                        ([rng.standard_normal((3, 5))], dict(axes=(1, 0)))],
    reference=lambda x, axes: np.transpose(x, axes)))


# -- concatenate / pad ---------------------------------------------------------------------

def _infer_concatenate(*xs: Any, axis: int) -> tuple:
    if not xs:
        raise ShapeError("concatenate: needs at least one tensor")
    first = tuple(xs[0].shape)
    if not 0 <= axis < len(first):
        raise ShapeError(f"concatenate: axis {axis} out of range for shape {first}")
    for x in xs[1:]:
        s = tuple(x.shape)
        if len(s) != len(first) or any(a != b for i, (a, b) in enumerate(zip(s, first)) if i != axis):
            raise ShapeError(f"concatenate: shapes {[tuple(x.shape) for x in xs]} differ "
                             f"outside axis {axis}")
    shape = list(first)
    shape[axis] = sum(x.shape[axis] for x in xs)
    return tuple(shape), np.result_type(*(_dt(x) for x in xs))


def _slice_along(g: Any, axis: int, start: int, stop: int) -> Any:
    spec = tuple(("slice", None, None, None) for _ in range(axis)) + (("slice", start, stop, None),)
    return getitem(g, index=spec)


def _concatenate_vjp(g: Any, out: Any, inputs: tuple, needs: tuple, axis: int) -> tuple:
    grads, start = [], 0
    for x, need in zip(inputs, needs):
        stop = start + x.shape[axis]
        grads.append(_slice_along(g, axis, start, stop) if need else None)
        start = stop
    return tuple(grads)


concatenate = register(Op(
    "concatenate", kind="movement", saves=(),
    forward=lambda be, *xs, axis: be.concatenate(xs, axis),
    infer=_infer_concatenate, vjp=_concatenate_vjp,
    sample=lambda rng: [([rng.standard_normal((2, 3)), rng.standard_normal((4, 3))], dict(axis=0)),
                        ([rng.standard_normal((2, 1)), rng.standard_normal((2, 3)),
                          rng.standard_normal((2, 2))], dict(axis=1))],
    reference=lambda *xs, axis: np.concatenate(xs, axis=axis)))


def _infer_pad(x: Any, pad_width: tuple, value: Any) -> tuple:
    if len(pad_width) != x.ndim or any(len(p) != 2 or min(p) < 0 for p in pad_width):
        raise ShapeError(f"pad: pad_width {pad_width} must give (before, after) >= 0 for each "
                         f"of the {x.ndim} axes of shape {tuple(x.shape)}")
    return tuple(d + a + b for d, (a, b) in zip(x.shape, pad_width)), _dt(x)


def _pad_vjp(g: Any, out: Any, inputs: tuple, needs: tuple, pad_width: tuple, value: Any) -> tuple:
    spec = tuple(("slice", a, a + d, None) for d, (a, _) in zip(inputs[0].shape, pad_width))
    return (getitem(g, index=spec),)


pad = register(Op(
    "pad", kind="movement", saves=(),
    forward=lambda be, x, pad_width, value: be.pad(x, pad_width, value),
    infer=_infer_pad, vjp=_pad_vjp,
    sample=lambda rng: [([rng.standard_normal((2, 3))], dict(pad_width=((1, 0), (2, 1)), value=0.0)),
                        ([rng.standard_normal((3,))], dict(pad_width=((0, 2),), value=-1.0))],
    reference=lambda x, pad_width, value: np.pad(x, pad_width, constant_values=value)))


# -- indexing ---------------------------------------------------------------------------------
# An index is a static tuple of items: ("int", i), ("slice", start, stop, step), ("none",),
# ("ellipsis",) or ("tensor", k) for the k-th index tensor passed as an extra input.

def index_tuple(spec: tuple, arrays: tuple) -> tuple:
    """The Python index that `spec` stands for, with the index arrays filled in."""
    out = []
    for item in spec:
        kind = item[0]
        if kind == "slice":
            out.append(slice(item[1], item[2], item[3]))
        elif kind == "int":
            out.append(item[1])
        elif kind == "none":
            out.append(None)
        elif kind == "ellipsis":
            out.append(Ellipsis)
        else:
            out.append(arrays[item[1]])
    return tuple(out)


def is_advanced(spec: tuple) -> bool:
    return any(item[0] == "tensor" for item in spec)


def _index_shape(op: str, shape: tuple, spec: tuple, idx: tuple) -> tuple:
    """Result shape of indexing, computed by NumPy on a zero-stride stand-in array."""
    for i in idx:
        if np.dtype(i.dtype).kind not in "iu":
            raise DTypeError(f"{op}: index tensors must be integer, got {i.dtype}")
    dummy = np.broadcast_to(np.zeros((), np.int8), shape)
    fake = tuple(np.zeros(tuple(i.shape), np.int64) for i in idx)
    try:
        return dummy[index_tuple(spec, fake)].shape
    except (IndexError, ValueError, TypeError) as e:
        raise ShapeError(f"{op}: index {spec} does not fit shape {shape}: {e}") from None


def _getitem_vjp(g: Any, out: Any, inputs: tuple, needs: tuple, index: tuple) -> tuple:
    x, idx = inputs[0], inputs[1:]
    return (index_add(g, *idx, index=index, shape=tuple(x.shape)),) + (None,) * len(idx)


def _getitem_forward(be: Any, x: Any, *idx: Any, index: tuple) -> Any:
    return be.getitem(x, index_tuple(index, idx))


getitem = register(Op(
    "getitem", kind="index", view=True,
    forward=_getitem_forward,
    infer=lambda x, *idx, index: (_index_shape("getitem", tuple(x.shape), index, idx), _dt(x)),
    vjp=_getitem_vjp,
    sample=lambda rng: [
        ([rng.standard_normal((4, 5))], dict(index=(("int", 1), ("slice", 1, None, 2)))),
        ([rng.standard_normal((3, 4))], dict(index=(("none",), ("ellipsis",), ("slice", None, None, -1)))),
        ([rng.standard_normal((5, 3)), np.array([0, 2, 2, 4])], dict(index=(("tensor", 0),))),
        ([rng.standard_normal((2, 4, 3)), np.array([[0, 1], [3, 0]]), np.array([[2], [1]])],
         dict(index=(("slice", None, None, None), ("tensor", 0), ("tensor", 1))))],
    reference=lambda x, *idx, index: x[index_tuple(index, idx)]))


def _index_add_forward(be: Any, v: Any, *idx: Any, index: tuple, shape: tuple) -> Any:
    return be.index_add(shape, index_tuple(index, idx), v, is_advanced(index))


def _infer_index_add(v: Any, *idx: Any, index: tuple, shape: tuple) -> tuple:
    target = _index_shape("index_add", shape, index, idx)
    try:
        broadcast_shapes("index_add", tuple(v.shape), target)
    except ShapeError:
        raise ShapeError(f"index_add: values of shape {tuple(v.shape)} do not fit the "
                         f"selection of shape {target}") from None
    return shape, _dt(v)


def _index_add_reference(v: Any, *idx: Any, index: tuple, shape: tuple) -> Any:
    out = np.zeros(shape, v.dtype)
    np.add.at(out, index_tuple(index, idx), v)
    return out


index_add = register(Op(
    "index_add", kind="index",
    forward=_index_add_forward, infer=_infer_index_add,
    vjp=lambda g, out, inputs, needs, index, shape:
        (getitem(g, *inputs[1:], index=index),) + (None,) * (len(inputs) - 1),
    sample=lambda rng: [
        ([rng.standard_normal((2, 3)), np.array([1, 1])], dict(index=(("tensor", 0),), shape=(4, 3))),
        ([rng.standard_normal((2,))], dict(index=(("int", 1), ("slice", 0, 2, None)), shape=(3, 2)))],
    reference=_index_add_reference,
    doc="zeros(shape) with v added at index; repeated indices accumulate (scatter-add)"))


# -- cast / stop_gradient ------------------------------------------------------------

def _cast_vjp(g: Any, out: Any, inputs: tuple, needs: tuple, dtype: Any) -> tuple:
    x = inputs[0]
    return (cast(g, dtype=_dt(x)) if _dt(x).kind == "f" else None,)


cast = register(Op(
    "cast", kind="elementwise_cast", saves=(), may_alias=True,
    no_op_when=_always,                # when the dtype is kept (the compiler checks it)
    forward=lambda be, x, dtype: be.astype(x, dtype),
    infer=lambda x, dtype: (tuple(x.shape), np.dtype(dtype)),
    vjp=_cast_vjp,
    sample=lambda rng: [([rng.standard_normal((3, 2))], dict(dtype=np.dtype(np.float64))),
                        ([rng.integers(0, 5, (3,))], dict(dtype=np.dtype(np.float64)))],
    reference=lambda x, dtype: x.astype(dtype)))

stop_gradient = register(Op(
    "stop_gradient", kind="movement", view=True, no_op_when=_always,
    forward=lambda be, x: x,
    infer=lambda x: (tuple(x.shape), _dt(x)),
    vjp=None,
    sample=lambda rng: [([rng.standard_normal((2, 3))], {})],
    reference=lambda x: x,
    doc="identity whose output is a constant for autodiff"))
