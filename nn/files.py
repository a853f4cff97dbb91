"""Atomic file writes, shared by checkpoints, tokenizers and training logs.

The data goes to a temporary file in the target's directory, is flushed to disk and
renamed over the target with os.replace: a crash or an error while writing leaves
the old file (or none) and no temporary file behind, never half a file.
"""
from __future__ import annotations

import os
import tempfile
from typing import IO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = True,
                 encoding: str | None = "utf-8") -> None:
    """Call write(f) on a temporary file next to `path`, then rename it to `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)            # mkstemp's 0600 would outlive the rename
        mode = "wb" if binary else "w"
        with os.fdopen(fd, mode, **({} if binary else {"encoding": encoding, "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
