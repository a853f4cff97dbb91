"""Array backends: one per device. `get_backend("cpu")` returns the NumPy backend.

Backends register a factory by device name; a factory runs on first use, so an
optional backend (CuPy) costs nothing until asked for and can explain what is
missing when it cannot start.
"""
from __future__ import annotations

from typing import Callable

from .base import Backend

_factories: dict[str, Callable[[], Backend]] = {}
_instances: dict[str, Backend] = {}


class BackendUnavailable(RuntimeError):
    """The device exists in principle but cannot start here (missing library or hardware)."""


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Make `factory` the way to build the backend for device `name`."""
    _factories[name] = factory
    _instances.pop(name, None)


def get_backend(device: str) -> Backend:
    """The backend for `device` ("cpu", "cuda", "cuda:0", ...), built on first use."""
    be = _instances.get(device)
    if be is not None:
        return be
    name = device.split(":", 1)[0]
    if name not in _factories:
        raise ValueError(
            f"unknown device {device!r}; known devices: {sorted(_factories)}")
    be = _factories[name]()
    _instances[device] = be
    return be


def loaded_backends() -> list[Backend]:
    """Backends already started (used to seed every live random generator)."""
    return list(_instances.values())


def _numpy_factory() -> Backend:
    from .numpy_backend import NumpyBackend
    return NumpyBackend()


register_backend("cpu", _numpy_factory)

__all__ = ["Backend", "BackendUnavailable", "get_backend", "register_backend", "loaded_backends"]
