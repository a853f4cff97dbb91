"""The engine's exception hierarchy.

It lives in the lowest layer that raises it (shape rules are part of the op spec);
`engine.errors` re-exports it for users. Each class also derives from the built-in
exception a Python user would catch (ValueError, TypeError, RuntimeError).
"""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ShapeError(EngineError, ValueError):
    """Shapes that an op cannot accept together."""


class DTypeError(EngineError, TypeError):
    """A dtype an op cannot accept (e.g. a gradient for an integer tensor)."""


class DeviceError(EngineError, RuntimeError):
    """Tensors on different devices in one op, or a device that cannot start."""


class GradError(EngineError, RuntimeError):
    """Misuse of autograd: freed graphs, non-scalar backward, in-place conflicts."""


class TraceError(EngineError, RuntimeError):
    """An operation that needs concrete values was asked of a traced tensor."""


class ArgumentError(EngineError, ValueError):
    """An argument outside its allowed range (a size of 0, a probability above 1, a NaN rate)."""


class ArgumentTypeError(EngineError, TypeError):
    """An argument of the wrong kind (a float size, a list where a Tensor is needed)."""


class OpError(EngineError, RuntimeError):
    """An op failed for a reason its shape and dtype rules did not foresee."""
