"""The engine's exceptions (defined with the op spec, where shape rules raise them)."""
from ops.errors import (ArgumentError, ArgumentTypeError, DeviceError, DTypeError, EngineError,
                        GradError, OpError, ShapeError, TraceError)


class GradcheckError(GradError):
    """Analytic and numeric gradients disagree."""


__all__ = ["EngineError", "ArgumentError", "ArgumentTypeError", "ShapeError", "DTypeError",
           "DeviceError", "GradError", "OpError", "TraceError", "GradcheckError"]
