"""The Optimizer base: parameter groups, per-parameter state, state_dict.

Updates run under eg.no_grad() with in-place tensor ops (`p -= ...`), a handful of
whole-tensor ops per parameter and no Python loop over elements. The state_dict
layout is PyTorch's: {"state": {index: {...}}, "param_groups": [{..., "params":
[index, ...]}]}, indices counting parameters over all groups in order.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

import engine as eg
from engine import Tensor
from engine.errors import ArgumentError, ArgumentTypeError, GradError, ShapeError
from engine.validate import RULES, validate_init


def _as_groups(params: Any) -> list[dict]:
    if isinstance(params, Tensor):
        raise ArgumentTypeError("optimizer: params must be an iterable of tensors or of dicts, got a "
                                "single Tensor (wrap it in a list)")
    items = list(params)
    if not items:
        raise ArgumentError("optimizer: got an empty parameter list")
    if isinstance(items[0], dict):
        return [dict(g) for g in items]
    return [{"params": items}]


class Optimizer:
    """Base class: subclasses implement `_update(p, grad, state, group)`."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Constructor arguments are checked by name (engine.validate.RULES)."""
        super().__init_subclass__(**kwargs)
        validate_init(cls)

    def __init__(self, params: Iterable[Any], defaults: dict) -> None:
        self.defaults = dict(defaults)
        self.param_groups: list[dict] = []
        self.state: dict[int, dict] = {}        # keyed by id(param)
        for g in _as_groups(params):
            self.add_param_group(g)

    def add_param_group(self, group: dict) -> None:
        """Add a group: {"params": [...], hyper-parameter overrides...}."""
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for p in params:
            if not isinstance(p, Tensor):
                raise ArgumentTypeError(f"{type(self).__name__}: can only optimize Tensors, got "
                                        f"{type(p).__name__}")
            if not p.is_leaf:
                raise GradError(f"{type(self).__name__}: cannot optimize a non-leaf tensor (made "
                                f"by {p.grad_fn}, shape {tuple(p.shape)})")
            if id(p) in seen:
                raise ArgumentError(f"{type(self).__name__}: a parameter (shape {tuple(p.shape)}) "
                                    f"appears in more than one place")
            seen.add(id(p))
        unknown = set(group) - set(self.defaults) - {"params", "initial_lr"}
        if unknown:
            raise ArgumentError(f"{type(self).__name__}: unknown options {sorted(unknown)}; known: "
                                f"{sorted(self.defaults)}")
        for k, v in group.items():              # per-group overrides obey the same rules
            if k in RULES and k != "params":
                RULES[k](k, v, f"{type(self).__name__} parameter group")
        full = dict(self.defaults)
        full.update(group)
        full["params"] = params
        self.param_groups.append(full)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if set_to_none or p.grad is None:
                    p.grad = None
                else:
                    p.grad = eg.zeros_like(p.grad)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a .grad; returns closure() if given."""
        loss = None
        if closure is not None:
            with eg.enable_grad():
                loss = closure()
        with eg.no_grad():
            for group in self.param_groups:
                active = [p for p in group["params"] if p.grad is not None]
                for p in active:
                    if p.grad.shape != p.shape:
                        raise ShapeError(f"{type(self).__name__}: grad of shape "
                                         f"{tuple(p.grad.shape)} for a parameter of shape "
                                         f"{tuple(p.shape)}")
                self._update_group(group, active)
        return loss

    # -- state ---------------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """{"state": {i: {name: Tensor | number}}, "param_groups": [...]} (state tensors are
        the live state, not copies: nn.save copies them to the file; a tensor lr is
        reported as its float value)."""
        index = {id(p): i for i, p in enumerate(self._params())}
        groups, start = [], 0
        for g in self.param_groups:
            d = {k: (v.item() if isinstance(v, Tensor) else v) for k, v in g.items() if k != "params"}
            d["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(d)
        state = {index[pid]: dict(s) for pid, s in self.state.items() if pid in index and s}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyper-parameters and state; tensors are copied to each parameter's device,
        floating ones cast to its dtype."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ArgumentError(f"{type(self).__name__}.load_state_dict: {len(groups)} parameter "
                                f"groups in the state dict, {len(self.param_groups)} here")
        for i, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ArgumentError(f"{type(self).__name__}.load_state_dict: group {i} has "
                                    f"{len(saved['params'])} parameters in the state dict, "
                                    f"{len(mine['params'])} here")
        params = self._params()
        new_state: dict[int, dict] = {}
        for key, s in state_dict["state"].items():
            i = int(key)
            if not 0 <= i < len(params):
                raise ArgumentError(f"{type(self).__name__}.load_state_dict: state for parameter "
                                    f"{i}, but there are {len(params)}")
            p = params[i]
            entry = {}
            for name, v in s.items():
                if isinstance(v, (Tensor, np.ndarray)):
                    arr = v.numpy() if isinstance(v, Tensor) else v
                    if tuple(arr.shape) not in ((), tuple(p.shape)):
                        raise ShapeError(f"{type(self).__name__}.load_state_dict: state "
                                         f"{name!r} of parameter {i} has shape {arr.shape}, the "
                                         f"parameter {tuple(p.shape)}")
                    keep = name == "step" or arr.dtype.kind != "f"      # counters keep their dtype
                    dtype = arr.dtype if keep else p.dtype
                    entry[name] = eg.tensor(arr, dtype=dtype, device=p.device)
                else:
                    entry[name] = v
            new_state[id(p)] = entry
        for saved, mine in zip(groups, self.param_groups):
            for k, v in saved.items():
                if k == "params":
                    continue
                if isinstance(mine.get(k), Tensor):          # a tensor lr stays that tensor
                    with eg.no_grad():
                        mine[k][...] = float(v)
                else:
                    mine[k] = tuple(v) if isinstance(self.defaults.get(k), tuple) else v
        self.state = new_state

    def _update_group(self, group: dict, active: list[Tensor]) -> None:
        """Update the group's parameters that have a .grad (subclasses may share work)."""
        for p in active:
            self._update(p, p.grad, self.state.setdefault(id(p), {}), group)

    def _update(self, p: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        raise TypeError(f"{type(self).__name__} does not define _update(p, grad, state, group)")

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for k in sorted(g):
                if k != "params":
                    lines.append(f"    {k}: {g[k]}")
        return "\n".join(lines) + "\n)"

