"""Containers: Sequential, ModuleList and ModuleDict (registration by index or key)."""
from __future__ import annotations

from engine.errors import ArgumentTypeError

from typing import Any, Iterable, Iterator, Mapping

from .module import Module


def _check_module(owner: str, m: Any) -> "Module":
    if not isinstance(m, Module):
        raise ArgumentTypeError(f"{owner}: expected nn.Module entries, got {type(m).__name__}")
    return m


class Sequential(Module):
    """Modules applied one after the other: `Sequential(a, b)(x) == b(a(x))`."""

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], Mapping):
            for name, m in modules[0].items():
                self.add_module(str(name), _check_module("Sequential", m))
        else:
            for i, m in enumerate(modules):
                self.add_module(str(i), _check_module("Sequential", m))

    def forward(self, x: Any) -> Any:
        for m in self._modules.values():
            x = m(x)
        return x

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __getitem__(self, i: int | slice) -> Any:
        mods = list(self._modules.values())
        return Sequential(*mods[i]) if isinstance(i, slice) else mods[i]


class ModuleList(Module):
    """A list of modules whose parameters are registered (names '0', '1', ...)."""

    def __init__(self, modules: Iterable[Module] | None = None) -> None:
        super().__init__()
        if modules is not None:
            self.extend(modules)

    def _items(self) -> list:
        return list(self._modules.values())

    def _reindex(self, mods: list) -> None:
        for k in list(self._modules):
            object.__delattr__(self, k)
        self._modules.clear()
        for i, m in enumerate(mods):
            self.add_module(str(i), m)

    def append(self, m: Module) -> "ModuleList":
        self.add_module(str(len(self._modules)), _check_module("ModuleList.append", m))
        return self

    def extend(self, modules: Iterable[Module]) -> "ModuleList":
        for m in modules:
            self.append(m)
        return self

    def insert(self, index: int, m: Module) -> None:
        mods = self._items()
        mods.insert(index, _check_module("ModuleList.insert", m))
        self._reindex(mods)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._items())

    def __getitem__(self, i: int | slice) -> Any:
        mods = self._items()
        return ModuleList(mods[i]) if isinstance(i, slice) else mods[i]

    def __setitem__(self, i: int, m: Module) -> None:
        key = str(range(len(self))[i])
        self.add_module(key, _check_module("ModuleList.__setitem__", m))


class ModuleDict(Module):
    """A dict of modules registered under their keys."""

    def __init__(self, modules: Mapping[str, Module] | None = None) -> None:
        super().__init__()
        for k, m in (modules or {}).items():
            self[k] = m

    def __setitem__(self, key: str, m: Module) -> None:
        self.add_module(str(key), _check_module("ModuleDict", m))

    def __getitem__(self, key: str) -> Module:
        return self._modules[key]

    def __contains__(self, key: object) -> bool:
        return key in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def keys(self) -> Any:
        return self._modules.keys()

    def values(self) -> Any:
        return self._modules.values()

    def items(self) -> Any:
        return self._modules.items()


__all__ = ["Sequential", "ModuleList", "ModuleDict"]
