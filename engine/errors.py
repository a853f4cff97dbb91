"""The engine's exceptions (defined with the op spec, where shape rules raise them)."""
from ops.errors import (DeviceError, DTypeError, EngineError, GradError, OpError, ShapeError,
                        TraceError)


class GradcheckError(GradError):
    """Analytic and numeric gradients disagree."""


__all__ = ["EngineError", "ShapeError", "DTypeError", "DeviceError", "GradError", "OpError",
           "TraceError", "GradcheckError"]
