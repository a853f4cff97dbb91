"""The compiler: trace to IR, optimise with small passes, generate code. See `jit`."""
from .ir import Node, Program, Value
from .jit import Compiled, jit
from .passes import cse, constant_fold, dce, fuse_elementwise, simplify
from .pipeline import run_passes

__all__ = ["jit", "Compiled", "Program", "Node", "Value", "dce", "cse", "constant_fold",
           "simplify", "fuse_elementwise", "run_passes"]
