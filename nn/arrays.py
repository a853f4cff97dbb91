"""Arrays handed over by other libraries (torch tensors, engine Tensors, NumPy arrays) as
NumPy arrays: what loading foreign weights reads (nn.interop, Linear.load_torch)."""
from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any device, with or without grad), Tensor or array -> NumPy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    elif hasattr(x, "numpy"):
        x = x.numpy()
    return np.asarray(x)
