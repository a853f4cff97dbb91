import os

# One BLAS thread: the tests multiply small matrices, where a second OpenBLAS thread
# only adds synchronisation, and on a busy 2-core machine it slows runs tenfold.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from hypothesis import settings

import engine as eg

settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True)
settings.load_profile("ci")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def to_tensor(a, requires_grad=False):
    """NumPy sample -> tensor (floats differentiable when asked); scalars pass through."""
    if isinstance(a, (np.ndarray, np.generic)):
        a = np.asarray(a)
        return eg.tensor(a, dtype=a.dtype, requires_grad=requires_grad and a.dtype.kind == "f")
    return a
