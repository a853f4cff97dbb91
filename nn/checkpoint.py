"""Checkpoints: model (and optimizer) state in one .npz file, no pickle.

Layout of the archive (every entry a plain array; `np.load(path, allow_pickle=False)`
reads it):
- "model/<name>"               one array per state_dict entry, in module order;
- "optim/<index>/<name>"       optimizer state tensors (index as in state_dict());
- "__meta__"                   a JSON string: format tag, parameter names and shapes
                               in order, optimizer hyper-parameters and scalar state,
                               the random generators' state (see _rng_entry), and the
                               user's **meta.

The file is written to a temporary file in the same directory, flushed to disk and
renamed over the target with os.replace (nn/files.py), so a crash leaves either the
old file or the new one, never half of one, and no temporary file. A file that is
missing pieces, truncated, corrupt or not a checkpoint at all raises CheckpointError
naming the path and the cause.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib
from typing import Any

import numpy as np

import engine as eg
from engine import Tensor
from engine.errors import ArgumentTypeError, EngineError

from .files import atomic_write
from .module import Module

FORMAT = "engine-nn-checkpoint"
VERSION = 1


class CheckpointError(EngineError, ValueError):
    """A checkpoint that cannot be read, or does not fit the model or optimizer it is
    loaded into."""


def _host(t: Any) -> np.ndarray:
    return np.array(t.numpy() if isinstance(t, Tensor) else t, copy=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"nn.save: meta value of type {type(o).__name__} is not JSON-serialisable")


def _optimizer_entries(optimizer: Any) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    arrays, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, v in state.items():
            if isinstance(v, (Tensor, np.ndarray)):
                arrays[f"optim/{idx}/{name}"] = _host(v)
            else:
                scalars.setdefault(str(idx), {})[name] = v
    return arrays, {"class": type(optimizer).__name__, "param_groups": sd["param_groups"],
                    "scalar_state": scalars}


def save(path: str | os.PathLike, model: Module, optimizer: Any = None, **meta: Any) -> None:
    """Write model (and optimizer) state and JSON-serialisable `meta` to `path` atomically.

    The exact path is used (no ".npz" is appended).
    """
    path = os.fspath(path)
    if not isinstance(model, Module):
        raise ArgumentTypeError(f"nn.save: model must be an nn.Module, got {type(model).__name__}")
    state = model.state_dict()
    arrays = {f"model/{k}": _host(v) for k, v in state.items()}
    header: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "model_class": type(model).__name__,
        "params": [[k, list(v.shape), str(v.dtype)] for k, v in state.items()],
        "meta": meta, **_rng_entry()}
    if optimizer is not None:
        opt_arrays, header["optimizer"] = _optimizer_entries(optimizer)
        arrays.update(opt_arrays)
    arrays["__meta__"] = np.array(json.dumps(header, default=_json_default))
    atomic_write(path, lambda f: np.savez(f, **arrays))


_ZIP_MAGIC = b"PK\x03\x04"
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def _read(path: str) -> tuple[dict, dict]:
    """(header, arrays) of a checkpoint, or CheckpointError saying why the file is not one."""
    with open(path, "rb") as f:                 # a missing file stays FileNotFoundError
        magic = f.read(4)
    if magic != _ZIP_MAGIC:
        raise CheckpointError(f"nn.load: {path!r} is not a checkpoint: nn.save writes a .npz "
                              f"(zip) archive, this file starts with {magic!r}"
                              + (" (it is empty)" if not magic else ""))
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except _UNREADABLE as e:
        if "allow_pickle" in str(e):
            raise CheckpointError(f"nn.load: cannot read {path!r}: it holds pickled Python objects, "
                                  f"which nn.save never writes and which could run code when "
                                  f"loaded, so they are refused") from e
        raise CheckpointError(f"nn.load: {path!r} is truncated or corrupt: "
                              f"{type(e).__name__}: {e}") from e
    if "__meta__" not in arrays:
        raise CheckpointError(f"nn.load: {path!r} has no '__meta__' entry: not written by nn.save")
    try:
        header = json.loads(str(arrays.pop("__meta__")))
    except ValueError as e:
        raise CheckpointError(f"nn.load: {path!r} has a corrupt '__meta__' entry: {e}") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"nn.load: {path!r} is not an {FORMAT} file")
    if not isinstance(header.get("params"), list):
        raise CheckpointError(f"nn.load: {path!r} has a '__meta__' entry without its parameter "
                              f"list: not written by nn.save")
    return header, arrays


def _check_model(path: str, header: dict, model: Module) -> None:
    """Name the first parameter where checkpoint and model disagree."""
    mine = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    saved = [(k, list(s)) for k, s, _ in header["params"]]
    for i in range(max(len(mine), len(saved))):
        m = mine[i] if i < len(mine) else None
        s = saved[i] if i < len(saved) else None
        if m == s:
            continue
        where = f"checkpoint {path!r} (saved from {header.get('model_class')}) does not fit " \
                f"{type(model).__name__}"
        if m is None:
            raise CheckpointError(f"{where}: the checkpoint has an extra parameter {s[0]!r} "
                                  f"{tuple(s[1])} (entry {i})")
        if s is None:
            raise CheckpointError(f"{where}: parameter {m[0]!r} {tuple(m[1])} is missing from "
                                  f"the checkpoint (entry {i})")
        if m[0] != s[0]:
            raise CheckpointError(f"{where}: entry {i} is {s[0]!r} {tuple(s[1])} in the "
                                  f"checkpoint but {m[0]!r} {tuple(m[1])} in the model")
        raise CheckpointError(f"{where}: parameter {m[0]!r} has shape {tuple(s[1])} in the "
                              f"checkpoint but {tuple(m[1])} in the model")


def _optimizer_state(path: str, header: dict, arrays: dict, optimizer: Any) -> dict:
    info = header.get("optimizer")
    if info is None:
        raise CheckpointError(f"nn.load: {path!r} holds no optimizer state")
    if info["class"] != type(optimizer).__name__:
        raise CheckpointError(f"nn.load: {path!r} holds {info['class']} state, not "
                              f"{type(optimizer).__name__}")
    state: dict[int, dict] = {}
    for key, arr in arrays.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = arr
    for idx, scalars in info["scalar_state"].items():
        state.setdefault(int(idx), {}).update(scalars)
    return {"state": state, "param_groups": info["param_groups"]}


def load(path: str | os.PathLike, model: Module, optimizer: Any = None, rng: bool = True) -> dict:
    """Load a checkpoint written by `save` into `model` (and `optimizer`), in place, and
    (with `rng`) the random generators' state, so dropout continues where it stopped.

    Returns the user's meta dict. Raises CheckpointError naming the first mismatched
    parameter when the checkpoint was saved from another architecture; nothing is
    changed in that case.
    """
    path = os.fspath(path)
    if not isinstance(model, Module):
        raise ArgumentTypeError(f"nn.load: model must be an nn.Module, got {type(model).__name__}")
    header, arrays = _read(path)
    _check_model(path, header, model)
    opt_state = _optimizer_state(path, header, arrays, optimizer) if optimizer is not None else None
    model.load_state_dict({k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")})
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    if rng:
        _restore_rng(header)
    return header.get("meta", {})


# -- random state: what makes a resumed run draw the same dropout masks -----------------------
def _rng_entry() -> dict:
    """The header entry holding every started device's generator key and counter."""
    return {"rng": eg.get_rng_state()}


def _restore_rng(header: dict) -> None:
    """Continue the random streams saved by `save` (checkpoints from before they were
    saved leave the generators as they are)."""
    if "rng" in header:
        eg.set_rng_state(header["rng"])
