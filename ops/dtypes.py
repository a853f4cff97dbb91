"""What users write for a dtype -> a NumPy dtype, with clear errors."""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import DTypeError

_UNSUPPORTED = {
    "bfloat16": "bfloat16 is not supported: NumPy has no bfloat16 dtype and CuPy (the GPU "
                "backend) has none either, so no kernel could store it. For mixed precision "
                "use float16: `with eg.autocast(eg.float16):` and nn.amp.GradScaler.",
}


def as_dtype(dtype: Any) -> np.dtype:
    """np.dtype(dtype), or a DTypeError naming what is wrong (bfloat16, a typo)."""
    if isinstance(dtype, np.dtype):
        return dtype
    name = str(getattr(dtype, "__name__", dtype)).lower()
    if name in ("bfloat16", "bf16", "torch.bfloat16"):
        raise DTypeError(_UNSUPPORTED["bfloat16"])
    try:
        return np.dtype(dtype)
    except TypeError as e:
        raise DTypeError(f"unknown dtype {dtype!r} ({e}); use a NumPy dtype such as "
                         f"eg.float32, eg.float16, eg.int64 or eg.bool_") from None
