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

import pytest

from backends import cbuild, host_kernels

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
    """Names of libraries the engine builds first: the libmvec probe, then the row
    kernels (with or without libmvec, whichever the probe decides)."""
    return [cbuild.library_name(cbuild.PROBE_SOURCE, vector=True),
            cbuild.library_name(host_kernels.c_source(), vector=True),
            cbuild.library_name(host_kernels.c_source(), vector=False)]


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
