"""Array backends: one per device. `get_backend("cpu")` returns the NumPy backend.

Backends register a factory by device name; a factory runs on first use, so an
optional backend (CuPy) costs nothing until asked for and can explain what is
missing when it cannot start. That is why CuPy's module is the one imported inside
its factory; the NumPy and symbolic backends need only required libraries.
"""
from __future__ import annotations

from typing import Callable

from .base import Backend, BackendUnavailable
from .numpy_backend import NumpyBackend
from .symbolic import SymbolicBackend

_factories: dict[str, Callable[[], Backend]] = {}
_instances: dict[str, Backend] = {}


def register_backend(name: str, factory: Callable[[str], Backend]) -> None:
    """Make `factory(device)` the way to build the backend for device `name`; it
    receives the full device string ("cuda:1"), so one registration serves every
    index of a device family."""
    _factories[name] = factory
    _instances.pop(name, None)


def get_backend(device: str) -> Backend:
    """The backend for `device` ("cpu", "cuda", "cuda:0", ...), built on first use."""
    be = _instances.get(device)
    if be is not None:
        return be
    family = device.split(":", 1)[0]
    if family not in _factories:
        raise ValueError(
            f"unknown device {device!r}; known devices: {sorted(_factories)}")
    be = _instances[device] = _factories[family](device)
    return be


def loaded_backends() -> list[Backend]:
    """Backends already started (used to seed every live random generator)."""
    return list(_instances.values())


def _numpy_factory(device: str) -> Backend:
    return NumpyBackend()


def _symbolic_factory(device: str) -> Backend:
    return SymbolicBackend()


def _cupy_factory(device: str) -> Backend:
    from .cupy_backend import create_backend     # imports CuPy: optional, so only when asked
    return create_backend(device)


register_backend("cpu", _numpy_factory)
register_backend("cuda", _cupy_factory)
register_backend("symbolic", _symbolic_factory)

__all__ = ["Backend", "BackendUnavailable", "get_backend", "register_backend", "loaded_backends"]
