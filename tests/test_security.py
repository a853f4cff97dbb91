"""The engine runs no code but its own.

Kernel cache: a library planted under the exact name of a kernel the engine builds
(in a cache directory someone else owns or can write, or as a file that is not a
private regular file of ours) must never be loaded: its constructor would write a
marker file. The engine runs in a fresh subprocess each time, so no library loaded
earlier in this process hides anything.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

import engine as eg
import nn
import ops
from backends import cbuild, cparallel, host_kernels, rowprint
from engine.compiler.codegen import _comment, literal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cc = pytest.mark.skipif(not cbuild.available(), reason="no C compiler: nothing is loaded")
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="making a file another user's needs root")

# Runs in the subprocess: softmax (the NumPy backend's C row kernels) and a jit-fused
# elementwise chain (a C kernel of the jit), both checked against NumPy; reports the
# engine's warnings and the kernel libraries mapped into the process.
_WORKLOAD = r"""
import json, os, warnings
import numpy as np
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import engine as eg
    from backends import kernel_cache
    x = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    got = eg.softmax(eg.tensor(x), axis=-1).numpy()
    e = np.exp(x - x.max(-1, keepdims=True))
    softmax_err = float(np.abs(got - e / e.sum(-1, keepdims=True)).max())
    f = eg.jit(lambda a: ((a * 2.0 + 1.0).abs().sqrt() - a) * a)
    jit_err = float(np.abs(f(eg.tensor(x)).numpy() - (np.sqrt(np.abs(x * 2 + 1)) - x) * x).max())
    c_kernels = f.stats()[-1]["c_kernels"]
with open("/proc/self/maps") as m:
    mapped = sorted({line.split()[-1] for line in m if "/k" in line and line.rstrip().endswith(".so")})
print(json.dumps(dict(softmax_err=softmax_err, jit_err=jit_err, c_kernels=c_kernels, mapped=mapped,
                      cache=kernel_cache.active().path,
                      warnings=[str(w.message) for w in caught if "engine" in str(w.message)])))
"""


def _run_engine(env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ENGINE_KERNEL_CACHE", "XDG_CACHE_HOME")}
    env.update(env_extra, PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", _WORKLOAD], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    if res.returncode != 0:
        return dict(failed=res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def _expected_names() -> list[str]:
    """Names of libraries the engine builds first: the thread pool, the libmvec probe,
    then the host kernels (with or without libmvec, whichever the probe decides)."""
    from ops.fused import SOFTMAX
    kernels = cparallel.DECLARATION + host_kernels.c_source()
    softmax = cparallel.DECLARATION + rowprint.C_HEADER + rowprint.c_rows_source(SOFTMAX, np.float32)
    return [cbuild.library_name(softmax, vector=True), cbuild.library_name(softmax, vector=False),
            cbuild.library_name(cparallel.pool_source()), cbuild.library_name(cparallel._SERIAL_SOURCE),
            cbuild.library_name(cbuild.PROBE_SOURCE, vector=True),
            cbuild.library_name(kernels, vector=True), cbuild.library_name(kernels, vector=False)]


def _planted_library(directory: str, marker: str) -> str:
    """A shared library whose constructor writes `marker` when it is loaded."""
    src = os.path.join(directory, "planted.c")
    with open(src, "w") as f:
        f.write('#include <stdio.h>\n'
                '__attribute__((constructor)) static void planted(void) {\n'
                f'  FILE* f = fopen({json.dumps(marker)}, "w"); if (f) {{ fputs("ran", f); fclose(f); }}\n'
                '}\n')
    out = os.path.join(directory, "planted.so")
    subprocess.run([cbuild._compiler, "-shared", "-fPIC", src, "-o", out], check=True)
    return out


def _plant(cache: str, lib: str, how: str = "copy") -> list[str]:
    """Put `lib` in `cache` under every expected name (a copy, or a symbolic link)."""
    paths = []
    for name in _expected_names():
        path = os.path.join(cache, name)
        if how == "link":
            os.symlink(lib, path)
        else:
            shutil.copyfile(lib, path)
            os.chmod(path, 0o600)
        paths.append(path)
    return paths


def _nobody() -> tuple[int, int]:
    pw = pwd.getpwnam("nobody")
    return pw.pw_uid, pw.pw_gid


def _assert_refused(result: dict, marker: str, cache: str, reason: str) -> None:
    assert not os.path.exists(marker), "a planted library was loaded: its constructor ran"
    assert "failed" not in result, result.get("failed")
    assert result["softmax_err"] < 1e-6 and result["jit_err"] < 1e-5, result
    assert not any(p.startswith(os.path.realpath(cache)) for p in result["mapped"]), result["mapped"]
    assert result["cache"] != cache                         # a private temporary directory instead
    assert len(result["warnings"]) == 1, result["warnings"]  # once, naming the path and the reason
    assert cache in result["warnings"][0] and reason in result["warnings"][0], result["warnings"]


def _setup(tmp_path) -> tuple[str, str, str]:
    """(cache directory (0700, ours), planted library, marker path)."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    os.chmod(cache, 0o700)
    lib = _planted_library(str(tmp_path), str(tmp_path / "marker"))
    return str(cache), lib, str(tmp_path / "marker")


@needs_cc
@pytest.mark.parametrize("case", ["foreign_dir", "foreign_file"])
@needs_root
def test_libraries_another_user_owns_are_never_loaded(tmp_path, case):
    cache, lib, marker = _setup(tmp_path)
    uid, gid = _nobody()
    for path in _plant(cache, lib):
        if case == "foreign_file":
            os.chown(path, uid, gid)
    if case == "foreign_dir":
        os.chown(cache, uid, gid)
    result = _run_engine({"ENGINE_KERNEL_CACHE": cache})
    _assert_refused(result, marker, cache, f"owned by uid {uid}")


@needs_cc
@pytest.mark.parametrize("case", ["world_writable_dir", "group_writable_dir", "world_writable_file"])
def test_libraries_others_can_write_are_never_loaded(tmp_path, case):
    cache, lib, marker = _setup(tmp_path)
    planted = _plant(cache, lib)
    if case == "world_writable_dir":
        os.chmod(cache, 0o1777)                 # even with the sticky bit: others add files
    elif case == "group_writable_dir":
        os.chmod(cache, 0o770)
    else:
        for path in planted:
            os.chmod(path, 0o666)
    result = _run_engine({"ENGINE_KERNEL_CACHE": cache})
    _assert_refused(result, marker, cache, "writable by group or others")


@needs_cc
def test_symbolic_links_in_the_cache_are_never_followed(tmp_path):
    cache, lib, marker = _setup(tmp_path)
    _plant(cache, lib, how="link")
    result = _run_engine({"ENGINE_KERNEL_CACHE": cache})
    _assert_refused(result, marker, cache, "symbolic link")


@needs_cc
@needs_root
def test_a_cache_path_linking_to_another_users_directory_is_refused(tmp_path):
    cache, lib, marker = _setup(tmp_path)
    _plant(cache, lib)
    os.chown(cache, *_nobody())
    link = str(tmp_path / "link")
    os.symlink(cache, link)
    result = _run_engine({"ENGINE_KERNEL_CACHE": link})
    _assert_refused(result, marker, link, "owned by uid")


@needs_cc
def test_private_cache_is_created_and_reused_by_the_next_process(tmp_path):
    """The default cache: $XDG_CACHE_HOME/engine/kernels, mode 0700, files only we can
    write; a second process loads the libraries the first one built, without a warning
    and without rebuilding them."""
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    first = _run_engine(env)
    assert "failed" not in first, first.get("failed")
    cache = str(tmp_path / "engine" / "kernels")
    assert first["cache"] == cache and first["warnings"] == []
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    built = {e.name: e.inode() for e in os.scandir(cache)}
    assert built and all(n.startswith("k") and n.endswith(".so") for n in built), built   # no leftovers
    for e in os.scandir(cache):
        st = e.stat(follow_symlinks=False)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022
    assert first["c_kernels"] >= 1 and first["softmax_err"] < 1e-6 and first["jit_err"] < 1e-5

    second = _run_engine(env)
    assert "failed" not in second, second.get("failed")
    assert second["warnings"] == [] and second["cache"] == cache
    assert {e.name: e.inode() for e in os.scandir(cache)} == built       # nothing rebuilt
    assert {os.path.basename(p) for p in second["mapped"]} == set(built)
    assert all(p.startswith(cache) for p in second["mapped"]), second["mapped"]
    assert second["softmax_err"] < 1e-6 and second["jit_err"] < 1e-5


@needs_cc
def test_processes_building_the_same_kernels_at_once_share_the_cache(tmp_path):
    """Two processes filling one fresh cache at the same time: each library is renamed
    into place whole, both compute the right results, no temporary file is left."""
    env = {k: v for k, v in os.environ.items() if k not in ("ENGINE_KERNEL_CACHE",)}
    env.update(XDG_CACHE_HOME=str(tmp_path), PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", _WORKLOAD], env=env, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["warnings"] == [] and result["softmax_err"] < 1e-6 and result["jit_err"] < 1e-5
    names = os.listdir(tmp_path / "engine" / "kernels")
    assert names and all(n.startswith("k") and n.endswith(".so") for n in names), names


def test_library_names_depend_on_the_machine(monkeypatch):
    """-march=native builds are machine-specific: a cache in a home directory shared by
    machines with other instruction sets must not hand them each other's libraries."""
    here = cbuild.library_name("void f(void) {}")
    monkeypatch.setattr(cbuild, "_TARGET", cbuild._target() + " avx512f")
    assert cbuild.library_name("void f(void) {}") != here
    monkeypatch.setattr(cbuild, "_TARGET", cbuild._target())
    assert cbuild.library_name("void f(void) {}") == here


# -- generated code: user values are objects in its namespace, never text in its source ---------

def _command(marker) -> str:
    """Python that creates `marker` if it is ever run as code."""
    return f"__import__('os').system('touch {marker}')"


def _hostile_names(marker) -> list[str]:
    cmd = _command(marker)
    return [cmd, f"a'\n{cmd}\n#", f'b"\n{cmd}\n#', "c\r" + cmd, f"d'); {cmd}; ('", "e\\"]


class _Hostile(nn.Module):
    """Sub-modules, a ModuleDict and a parameter registered under names that are code."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        rng = np.random.default_rng(0)
        self.heads = nn.ModuleDict({n: nn.Linear(4, 3) for n in names})
        for n in names:
            setattr(self, n, nn.Linear(3, 3))
            self.register_parameter(n + "_scale", nn.Parameter(eg.tensor(rng.standard_normal(3))))
        self.names = names

    def forward(self, x):
        out = 0.0
        for n in self.names:
            out = out + getattr(self, n)(self.heads[n](x)) * getattr(self, n + "_scale")
        return out


def _assert_clean(compiled, marker) -> None:
    assert not os.path.exists(marker), "a user string was run as code"
    entry = compiled._entry()
    for text in [entry.generated.source, *entry.generated.kernel_sources]:
        assert "system" not in text and "__import__" not in text, text


def test_hostile_module_parameter_and_dict_key_names_never_reach_generated_code(tmp_path):
    marker = str(tmp_path / "marker")
    names = _hostile_names(marker)
    x = eg.tensor(np.random.default_rng(1).standard_normal((5, 4)), dtype=eg.float32)

    initial = _Hostile(names).state_dict()

    def run(compiled: bool) -> tuple[list, list]:
        model = _Hostile(names)
        model.load_state_dict(initial)
        opt = nn.optim.SGD(model.parameters(), lr=0.1)

        def step(x, tag):                      # `tag`: a static string argument that is code
            opt.zero_grad()
            loss = (model(x) ** 2).mean()
            loss.backward()
            opt.step()
            return loss
        fn = eg.jit(step, static_argnums=(1,)) if compiled else step
        losses = [fn(x, _command(marker)).item() for _ in range(3)]
        if compiled:
            _assert_clean(fn, marker)
        return losses, [p.numpy().copy() for p in model.parameters()]

    (eager_losses, eager_params), (jit_losses, jit_params) = run(False), run(True)
    np.testing.assert_allclose(jit_losses, eager_losses, rtol=1e-5)
    for a, b in zip(jit_params, eager_params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not os.path.exists(marker)


def test_constants_whose_repr_is_code_are_passed_as_objects(tmp_path):
    """A number subclass prints whatever it likes: its text never becomes code, in the
    generated Python (ufunc chains, shapes, axes) or in the C kernels."""
    marker = str(tmp_path / "marker")
    cmd = _command(marker)

    class LyingFloat(float):
        def __repr__(self):
            return cmd
        __str__ = __repr__

    class LyingInt(int):
        def __repr__(self):
            return cmd
        __str__ = __repr__

    x = eg.tensor(np.random.default_rng(2).standard_normal((6, 8)), dtype=eg.float32)
    two, one, n = LyingFloat(2.0), LyingFloat(1.0), LyingInt(3)
    functions = [
        lambda a: a * two,                                               # one ufunc
        lambda a: ((a * two + one).abs().sqrt() - a) * a,               # a fused group (C or ufuncs)
        lambda a: (a.reshape((LyingInt(8), LyingInt(6))) * n).permute((LyingInt(1), LyingInt(0))),
        lambda a: (a * two).sum(axis=LyingInt(1)) + float("inf") * 0 + one,
    ]
    for fn in functions:
        compiled = eg.jit(fn)
        np.testing.assert_allclose(compiled(x).numpy(), fn(x).numpy(), rtol=1e-6, equal_nan=True)
        _assert_clean(compiled, marker)
    assert not os.path.exists(marker)


def test_string_values_are_rejected_or_never_run(tmp_path):
    """Strings where numbers or options belong fail (an option by name, as in eager
    mode; a string operand as data NumPy has no loop for), and are never run as code."""
    marker = str(tmp_path / "marker")
    x = eg.tensor(np.ones((3, 4)), dtype=eg.float32)
    with pytest.raises(ValueError, match="approximate"):
        eg.jit(lambda a: eg.gelu(a, approximate=_command(marker)))(x)
    for fn in (lambda a: a * _command(marker),
               lambda a: ops.REGISTRY["mul"](a, np.str_(_command(marker))).abs().sqrt() * a):
        with pytest.raises(Exception, match="did not contain a loop|must be tensors|is not numbers"):
            fn(x)
        with pytest.raises(Exception, match="did not contain a loop|must be tensors|is not numbers"):
            eg.jit(fn)(x)
    assert not os.path.exists(marker)


def test_generated_code_helpers_keep_text_out_of_code():
    ns: dict = {}
    assert literal((2, 3.5, True, None), ns) == "(2, 3.5, True, None)" and ns == {}
    for value in ["x'); import os; ('", float("nan"), np.float32(1.0), (1, "s"), np.dtype("f4")]:
        name = literal(value, ns)
        assert name.isidentifier() and ns[name] is value
    assert "\n" not in _comment("sqrt\nimport os") and "\r" not in _comment("a\rb")


class _RunsOnUnpickle:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_are_read_without_pickle(tmp_path):
    """A checkpoint holding a pickled object (which would run a command when
    unpickled) is refused with a CheckpointError; the command never runs."""
    marker = str(tmp_path / "marker")
    model = nn.Linear(2, 2)
    path = str(tmp_path / "ckpt.npz")
    nn.save(path, model)
    with np.load(path) as z:
        entries = {k: z[k] for k in z.files}
    entries["model/weight"] = np.array([_RunsOnUnpickle(marker)], dtype=object)
    np.savez(path, **entries)
    with pytest.raises(Exception) as refused:
        nn.load(path, model)
    assert not os.path.exists(marker), "unpickling a checkpoint ran a command"
    assert isinstance(refused.value, nn.CheckpointError) and "cannot read" in str(refused.value)


def test_kernel_names_are_identifiers():
    from backends.cprint import CPrintError, kernel_name
    assert kernel_name("softmax", "float32") == "engine_softmax_float32"
    with pytest.raises(CPrintError, match="identifier"):
        kernel_name("x(){}; void y", "float32")
