"""The op spec: every primitive declared once, listed in `REGISTRY`.

Primitives live in movement / reduce (sum, broadcast_to) / elementwise / extrema (max) /
linalg / random / fused, in that dependency order (see docs/design.md, Layering);
composite functions built from them live in `composite` (listed in `COMPOSITES`).
The fused ops (softmax, log_softmax, layer_norm) are tested against their
composite decompositions, which stay the reference. Ops never
import a concrete backend: they receive one from the interpreter.
"""
from . import collective, composite, elementwise, extrema, fused, linalg, movement, random, reduce  # noqa: F401,E501  (registration)
from .composite import COMPOSITES
from .elementwise import ElementwiseOp
from .reduce import sum_to
from .errors import DeviceError, DTypeError, EngineError, GradError, OpError, ShapeError, TraceError
from .spec import REGISTRY, Op, register, set_dispatcher

__all__ = ["REGISTRY", "COMPOSITES", "Op", "ElementwiseOp", "register", "set_dispatcher", "sum_to",
           "EngineError", "ShapeError", "DTypeError", "DeviceError", "GradError", "OpError", "TraceError"]
