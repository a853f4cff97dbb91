"""Importing PyTorch weights (torch is never imported here: pass its tensors or arrays).

Differences handled:
- Linear weights are (in, out) here and (out, in) in torch: transposed;
- torch.nn.MultiheadAttention packs q, k, v into `in_proj_weight` (3E, E) and
  `in_proj_bias` (or q_proj_weight/k_proj_weight/v_proj_weight when kdim/vdim
  differ) and calls the output layer `out_proj`: split into our q, k, v and o.
Every other name (TransformerEncoderLayer's linear1/norm1/..., nn.Transformer's
encoder.layers.N..., Embedding, LayerNorm) is the same in both libraries.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .arrays import to_numpy
from .attention import MultiheadAttention
from .layers import Linear
from .module import Module, StateDictError


def _mha_sources(prefix: str, m: MultiheadAttention, torch_sd: Mapping[str, Any]) -> dict:
    """Our q/k/v/o names under `prefix` -> torch arrays, transposed to (in, out)."""
    out: dict[str, np.ndarray] = {}
    e = m.embed_dim
    if prefix + "in_proj_weight" in torch_sd:
        w = to_numpy(torch_sd[prefix + "in_proj_weight"])
        for i, n in enumerate("qkv"):
            out[f"{prefix}{n}.weight"] = w[i * e:(i + 1) * e].T
    else:
        for n in "qkv":
            key = f"{prefix}{n}_proj_weight"
            if key in torch_sd:
                out[f"{prefix}{n}.weight"] = to_numpy(torch_sd[key]).T
    if prefix + "in_proj_bias" in torch_sd:
        b = to_numpy(torch_sd[prefix + "in_proj_bias"])
        for i, n in enumerate("qkv"):
            out[f"{prefix}{n}.bias"] = b[i * e:(i + 1) * e]
    if prefix + "out_proj.weight" in torch_sd:
        out[f"{prefix}o.weight"] = to_numpy(torch_sd[prefix + "out_proj.weight"]).T
    if prefix + "out_proj.bias" in torch_sd:
        out[f"{prefix}o.bias"] = to_numpy(torch_sd[prefix + "out_proj.bias"])
    return out


def convert_torch_state_dict(model: Module, torch_sd: Mapping[str, Any], strict: bool = True) -> dict:
    """A torch state dict (names as torch.nn) -> this model's state dict (NumPy arrays).
    With `strict`, a torch entry that has no place in the model raises StateDictError."""
    converted: dict[str, np.ndarray] = {}
    used: set[str] = set()
    inside_mha: set[str] = set()
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, MultiheadAttention):
            converted.update(_mha_sources(prefix, m, torch_sd))
            used.update(k for k in torch_sd if k.startswith(prefix) and
                        (k[len(prefix):].startswith(("in_proj_", "out_proj.")) or
                         k[len(prefix):] in ("q_proj_weight", "k_proj_weight", "v_proj_weight")))
            inside_mha.update(f"{prefix}{n}" for n in "qkvo")
    for name, m in model.named_modules():
        if name in inside_mha:
            continue
        prefix = f"{name}." if name else ""
        for pname, p in m._parameters.items():
            key = prefix + pname
            if p is None or key not in torch_sd or key in converted:
                continue
            arr = to_numpy(torch_sd[key])
            converted[key] = arr.T if isinstance(m, Linear) and pname == "weight" else arr
            used.add(key)
    leftover = [k for k in torch_sd if k not in used]
    if leftover and strict:
        raise StateDictError(f"convert_torch_state_dict: torch entries with no place in "
                             f"{type(model).__name__}: {leftover}")
    return converted


def load_torch_state_dict(model: Module, torch_sd: Mapping[str, Any], strict: bool = True) -> Any:
    """Load torch.nn weights into `model` (same architecture, torch names); see the module
    docstring for what is converted. Returns load_state_dict's (missing, unexpected)."""
    return model.load_state_dict(convert_torch_state_dict(model, torch_sd, strict), strict=strict)
