"""The compiler and backends read ops' traits, not their names.

Identities come from the ops' sympy expressions (checked on IEEE probes), movement
rules from `no_op_when` / `compose` / `permutation`, autocast from the `autocast`
field; the name-test count in engine/compiler and backends stays 0.
"""
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest
import sympy

import engine as eg
import ops
from engine.compiler import Program, Value, dce, identities, simplify
from engine.compiler.ir import Node
from engine.compiler.codegen import generate
from engine.state import get_backend

R = ops.REGISTRY
ROOT = pathlib.Path(__file__).resolve().parents[1]


# -- the name-test count ----------------------------------------------------------------------

def _count_command() -> str:
    """The counting command exactly as docs/design.md gives it."""
    text = (ROOT / "docs" / "design.md").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("grep -rnE")]
    assert len(lines) == 1, "docs/design.md should give the name-test count command once"
    return lines[0]


def _count(cwd: pathlib.Path) -> int:
    if shutil.which("grep") is None or shutil.which("wc") is None:
        pytest.skip("needs grep and wc")
    res = subprocess.run(["bash", "-c", _count_command()], cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip())


def test_compiler_and_backends_test_no_op_names():
    assert _count(ROOT) == 0


def test_the_count_command_catches_name_tests(tmp_path):
    offending = ['if op.name == "matmul":', 'ok = getattr(n.op, "name", "") == "sum"',
                 'ok = getattr(n.op, "name") in ("add", "sub")', 'if name in ("reshape", "cast"):',
                 'param = _INLINE_METHODS[n.op.name]', 'if n.op.name.startswith("fused"):',
                 'if draw.name != "bernoulli":', 'fn = _NATIVE.get(key)']
    harmless = ['be = get_backend(backend.name)', 'key = (spec.name, dtype)', 'x = type(a).__name__']
    (tmp_path / "engine" / "compiler").mkdir(parents=True)
    (tmp_path / "backends").mkdir()
    (tmp_path / "engine" / "compiler" / "a.py").write_text("\n".join(offending[:4] + harmless) + "\n")
    (tmp_path / "backends" / "b.py").write_text("\n".join(offending[4:] + harmless) + "\n")
    assert _count(tmp_path) == len(offending)


# -- identities derived from the expressions ---------------------------------------------------------

def _prog(nodes, inputs, outputs, constants=None):
    return Program(inputs=inputs, captures=[], constants=constants or {}, nodes=nodes, outputs=outputs)


def _run(program, *arrays):
    return generate(program, get_backend("cpu"))(list(arrays), [])


def _op_names(f) -> list:
    return [n.op.name for n in f.ir.nodes]


@pytest.mark.parametrize("expr", [lambda x: x * 1, lambda x: 1 * x, lambda x: x + 0, lambda x: 0 + x,
                                  lambda x: x - 0, lambda x: x / 1, lambda x: -(-x), lambda x: x ** 1,
                                  lambda x: eg.maximum(x, -np.inf)])
def test_traced_identities_produce_no_node(expr):
    f = eg.jit(lambda x: expr(x).exp())
    x = eg.tensor(np.array([[-1.5, 0.0, 2.0], [np.inf, -np.inf, 3.0]]))
    np.testing.assert_array_equal(f(x).numpy(), np.exp(x.numpy()))
    assert _op_names(f) == ["exp"]


def test_a_cast_is_never_dropped():
    x = eg.tensor(np.array([1, 2, 3], dtype=np.int32))
    f = eg.jit(lambda x: x * 1.0)
    y = f(x)
    assert y.dtype == np.float64 and _op_names(f) == ["mul"]
    np.testing.assert_array_equal(y.numpy(), [1.0, 2.0, 3.0])
    a, out = Value((3,), np.int32), Value((3,), np.float64)
    p = _prog([Node(R["mul"], (a, 1.0), {}, out)], [a], [out])
    assert len(dce(simplify(p)).nodes) == 1


def test_a_broadcast_is_never_dropped():
    x, zeros, out = Value((3,), np.float64), Value((2, 3), np.float64), Value((2, 3), np.float64)
    p = _prog([Node(R["add"], (zeros, x), {}, out)], [x], [out], {zeros: np.zeros((2, 3))})
    q = dce(simplify(p))
    assert [n.op.name for n in q.nodes] == ["add"]
    assert _run(q, np.arange(3.0))[0].shape == (2, 3)
    # the same constant without a broadcast: 0 + x is x
    z3, out3 = Value((3,), np.float64), Value((3,), np.float64)
    p3 = _prog([Node(R["add"], (z3, x), {}, out3)], [x], [out3], {z3: np.zeros(3)})
    assert dce(simplify(p3)).outputs == [x]
    # where(c, x, x) is x, but not when the condition broadcasts it
    c, w = Value((2, 3), np.bool_), Value((2, 3), np.float64)
    pw = _prog([Node(R["where"], (c, x, x), {}, w)], [c, x], [w])
    assert [n.op.name for n in dce(simplify(pw)).nodes] == ["where"]


def test_identities_that_fail_in_floating_point_are_rejected():
    """sympy says lerp(a, b, 0) = a and exp(log(x)) = x; IEEE arithmetic does not."""
    a, b, out = Value((2,), np.float64), Value((2,), np.float64), Value((2,), np.float64)
    p = _prog([Node(R["lerp"], (a, b, 0.0), {}, out)], [a, b], [out])
    assert [n.op.name for n in dce(simplify(p)).nodes] == ["lerp"]
    g = eg.jit(lambda x: x.log().exp())
    g(eg.tensor(np.array([3.0])))
    assert _op_names(g) == ["fused[log,exp]"]


def test_a_constant_the_identity_hinges_on_is_probed():
    """where(t != -100, t, 0) equals t except at t = -100 (found by probing the constant)."""
    t, valid, out = Value((4,), np.int64), Value((4,), np.bool_), Value((4,), np.int64)
    p = _prog([Node(R["ne"], (t, -100), {}, valid), Node(R["where"], (valid, t, 0), {}, out)], [t], [out])
    q = dce(simplify(p))
    assert [n.op.name for n in q.nodes] == ["ne", "where"]
    np.testing.assert_array_equal(_run(q, np.array([3, -100, 0, 1]))[0], [3, 0, 0, 1])
    # each defence alone rejects it: sympy (the comparison read as 0/1) and the probes
    leaves = []
    args = identities._args(p.nodes[1], leaves, {}, {valid: p.nodes[0]})
    assert identities._equal_on_probes(R["where"], args, (np.dtype(np.int64),)) == []
    leaf = sympy.Symbol("leaf0", real=True)
    assert identities._expression(R["where"], args, [leaf]) != leaf


# -- movement traits ---------------------------------------------------------------------------------

def test_transpose_chains_compose_in_order():
    x = Value((2, 3, 4), np.float64)
    a, b = Value((3, 2, 4), np.float64), Value((3, 4, 2), np.float64)
    p = _prog([Node(R["transpose"], (x,), {"axes": (1, 0, 2)}, a),
               Node(R["transpose"], (a,), {"axes": (0, 2, 1)}, b)], [x], [b])
    q = dce(simplify(p))
    assert len(q.nodes) == 1 and q.nodes[0].inputs == (x,)
    arr = np.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(_run(q, arr)[0], arr.transpose(1, 0, 2).transpose(0, 2, 1))


def test_identity_movement_is_dropped_but_a_square_transpose_is_not():
    x = Value((3, 3), np.float64)
    t, r, s = Value((3, 3), np.float64), Value((3, 3), np.float64), Value((3, 3), np.float64)
    p = _prog([Node(R["transpose"], (x,), {"axes": (1, 0)}, t),
               Node(R["reshape"], (t,), {"shape": (3, 3)}, r),
               Node(R["stop_gradient"], (r,), {}, s)], [x], [s])
    q = dce(simplify(p))
    assert [n.op.name for n in q.nodes] == ["transpose"]
    arr = np.arange(9.0).reshape(3, 3)
    np.testing.assert_array_equal(_run(q, arr)[0], arr.T)


# -- autocast as a field -------------------------------------------------------------------------------

def test_autocast_class_is_read_from_the_op(monkeypatch):
    assert R["matmul"].autocast == "lower"
    assert all(op.autocast in ops.spec.AUTOCAST_CLASSES for op in R.values())
    x = eg.tensor(np.ones((2, 2), np.float32))
    with eg.autocast(np.float16):
        assert (x @ x).dtype == np.float16 and (x + x).dtype == np.float32
        monkeypatch.setattr(R["add"], "autocast", "lower")
        assert (x + x).dtype == np.float16


def test_an_unknown_autocast_class_is_refused():
    with pytest.raises(ValueError, match=re.escape("op 'probe': autocast must be one of")):
        ops.Op("probe", kind="elementwise", forward=lambda be, x: x, infer=lambda x: (x.shape, x.dtype),
               autocast="half")


def test_zero_bands_follow_reshape_broadcast_and_transpose_traits():
    from engine.compiler.bands import _zero_band
    src = Value((2, 64, 64), np.float64)
    zeros = {src: ("U", 0)}

    def band(op, params, shape):
        return _zero_band(Node(R[op], (src,), params, Value(shape, np.float64)), {}, zeros)
    assert band("reshape", {"shape": (1, 2, 64, 64)}, (1, 2, 64, 64)) == ("U", 0)
    assert band("broadcast_to", {"shape": (3, 2, 64, 64)}, (3, 2, 64, 64)) == ("U", 0)
    assert band("reshape", {"shape": (2, 32, 128)}, (2, 32, 128)) is None     # rows regrouped
    assert band("transpose", {"axes": (0, 2, 1)}, (2, 64, 64)) == ("L", 0)
    assert band("transpose", {"axes": (1, 0, 2)}, (64, 2, 64)) is None
