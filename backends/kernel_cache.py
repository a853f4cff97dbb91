"""A private on-disk cache of compiled kernels: only libraries this user wrote are loaded.

Why: loading a shared library runs its code, and a kernel's file name is the public
hash of its source. A cache directory another user can write to (a predictable path
in /tmp, a shared or world-writable folder) would let that user plant a library
under a kernel's name and run code as whoever uses the engine.

The rule, checked through file descriptors so nothing changes between check and use:
- The directory is opened once and the descriptor (whatever a symbolic link on the
  way pointed to) must be a directory owned by this user and not writable by group or
  others. No other non-root user can then create, rename or replace anything in it,
  so a file checked inside it stays the file that was checked until it is loaded.
- A library is opened inside it with O_NOFOLLOW and must be a regular file owned by
  this user, not writable by group or others.
- Every write and load goes through the directory's descriptor (`dir_fd=`, and
  dlopen of /proc/self/fd/<dir>/<name> where /proc exists), so a writable parent
  directory cannot swap the directory between the check and the load either.
- Libraries are compiled in a fresh private scratch directory, then copied into the
  cache under a temporary name and renamed into place: another process sees the whole
  file or none.
A directory or file that fails a check is never loaded from: the process warns once,
naming the path and the reason, and uses a fresh private temporary directory instead.
"""
from __future__ import annotations

import atexit
import errno
import os
import secrets
import shutil
import stat
import tempfile
import threading
import warnings
from typing import Callable

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC     # no wait on a FIFO
_CREATE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FOREIGN_WRITE = stat.S_IWGRP | stat.S_IWOTH
_PROC_FD = os.path.isdir("/proc/self/fd")


class UntrustedCache(OSError):
    """A cache directory or file another user could have written (an OSError, so
    callers that fall back to NumPy when a library cannot be loaded do so here too)."""


def default_path() -> str:
    """$ENGINE_KERNEL_CACHE, else $XDG_CACHE_HOME/engine/kernels (an absolute
    XDG_CACHE_HOME only, as the XDG spec says), else ~/.cache/engine/kernels."""
    override = os.environ.get("ENGINE_KERNEL_CACHE")
    if override:
        return override
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "engine", "kernels")


def _check(st: os.stat_result, path: str, directory: bool) -> None:
    """Raise UntrustedCache unless `st` is a directory/regular file that only this user can write."""
    if not (stat.S_ISDIR if directory else stat.S_ISREG)(st.st_mode):
        raise UntrustedCache(f"{path} is not a {'directory' if directory else 'regular file'}")
    if st.st_uid != os.getuid():
        raise UntrustedCache(f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})")
    if st.st_mode & _FOREIGN_WRITE:
        raise UntrustedCache(f"{path} is writable by group or others "
                             f"(mode {stat.S_IMODE(st.st_mode):04o})")


def _open(name: str, flags: int, path: str, dir_fd: int | None = None) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:                 # the last component is a symbolic link
            raise UntrustedCache(f"{path} is a symbolic link") from None
        raise


class Directory:
    """A checked cache directory, held open by descriptor for the life of the process
    (library names loaded through /proc/self/fd/<fd>/ must never point elsewhere)."""

    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.lexists(path):
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:                # made meanwhile; checked below like any other
                pass
        fd = _open(path, _OPEN_DIR, path)
        try:
            _check(os.fstat(fd), path, directory=True)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def find(self, name: str) -> str | None:
        """The path to load library `name` from, None if absent; UntrustedCache if
        present but not a regular file that only this user can write."""
        path = os.path.join(self.path, name)
        try:
            fd = _open(name, _OPEN_FILE, path, self.fd)
        except FileNotFoundError:
            return None
        try:
            _check(os.fstat(fd), path, directory=False)
        finally:
            os.close(fd)
        return f"/proc/self/fd/{self.fd}/{name}" if _PROC_FD else path

    def store(self, name: str, data: bytes) -> None:
        """Write `data` as `name`: a temporary file of our own, renamed into place."""
        tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, _CREATE_FILE, 0o600, dir_fd=self.fd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=self.fd)
            except OSError:
                pass
            raise


_active: Directory | None = None
_warned = False
_choosing = threading.Lock()              # one directory per process, one warning


def _private_fallback(reason: str) -> Directory:
    """A fresh private temporary directory for this process (removed at exit); warns once."""
    global _warned
    path = tempfile.mkdtemp(prefix="engine-kernels-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    if not _warned:
        _warned = True
        warnings.warn(f"engine: not loading compiled kernels from the cache: {reason}; "
                      f"this process compiles its kernels into the private directory {path} "
                      f"instead", RuntimeWarning, stacklevel=4)
    return Directory(path)


def active() -> Directory:
    """The cache directory in use (opened and checked on first use)."""
    global _active
    with _choosing:
        if _active is None:
            _active = _open_default()
    return _active


def _open_default() -> Directory:
    path = default_path()
    try:
        return Directory(path)
    except UntrustedCache as e:
        return _private_fallback(str(e))
    except OSError as e:
        return _private_fallback(f"cannot open {path} ({e.strerror})")


def library(name: str, compile_to: Callable[[str], None]) -> str:
    """The path to dlopen for library `name`: the cached file when it passes the checks,
    else one compiled now by `compile_to(output_path)` and stored in the cache."""
    global _active
    cache = active()
    try:
        found = cache.find(name)
    except UntrustedCache as e:
        with _choosing:
            if _active is cache:
                _active = _private_fallback(str(e))
            cache = _active
        found = None
    if found is not None:
        return found
    with tempfile.TemporaryDirectory(prefix="engine-build-") as scratch:
        out = os.path.join(scratch, name)
        compile_to(out)
        with open(out, "rb") as f:
            data = f.read()
    cache.store(name, data)
    found = cache.find(name)
    if found is None:
        raise OSError(f"compiled kernel {name} vanished from {cache.path}")
    return found
