"""Helpers that look at a module from outside: run it with other parameter values."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

from engine import Tensor

from .module import Module, StateDictError


@contextlib.contextmanager
def swapped_parameters(module: Module, values: Mapping[str, Tensor]) -> Iterator[Module]:
    """Within the block, the named parameters of `module` are the given tensors (which may
    be any Tensors, e.g. float64 copies that gradcheck perturbs); restored afterwards."""
    owners = {}
    for mname, m in module.named_modules():
        for pname in m._parameters:
            owners[f"{mname}.{pname}" if mname else pname] = (m, pname)
    unknown = [k for k in values if k not in owners]
    if unknown:
        raise StateDictError(f"swapped_parameters: {type(module).__name__} has no parameters "
                             f"{unknown}")
    saved = []
    try:
        for name, t in values.items():
            m, pname = owners[name]
            saved.append((m, pname, m._parameters[pname]))
            m._parameters[pname] = t
            object.__setattr__(m, pname, t)
        yield module
    finally:
        for m, pname, old in reversed(saved):
            m._parameters[pname] = old
            object.__setattr__(m, pname, old)


def functional_call(module: Module, values: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> Any:
    """module(*args, **kwargs) computed with the parameters in `values` (as
    torch.func.functional_call): the way to differentiate a model with respect to
    tensors that are not its Parameters."""
    with swapped_parameters(module, values):
        return module(*args, **kwargs)
