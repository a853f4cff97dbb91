"""The pass pipeline: the optimisation passes (passes.py) and, on the CPU, the banded
matmul pass (bands.py, which builds on the fused nodes of passes.py), in order, with a
record of what each did."""
from __future__ import annotations

import os
from typing import Any, Callable

from .bands import band_matmuls
from .ir import Program
from .passes import (constant_fold, cse, dce, fuse_elementwise, fuse_reductions, fuse_row_prologues,
                     simplify)


def run_passes(program: Program, backend: Any, fuse: bool = True) -> tuple[Program, list]:
    """All passes in order; returns the program and per-pass statistics."""
    pipeline: list[tuple[str, Callable[[Program], Program]]] = [
        ("dce", dce), ("constant_fold", lambda p: constant_fold(p, backend)), ("simplify", simplify),
        ("cse", cse), ("dce", dce)]
    if fuse:
        pipeline += [("fuse_elementwise", fuse_elementwise), ("fuse_reductions", fuse_reductions),
                     ("fuse_row_prologues", fuse_row_prologues)]
        if backend.name == "cpu":
            # not on a GPU: each block would be one more launch, and launches bound its step
            pipeline.append(("band_matmuls", band_matmuls))
    stats = []
    debug = int(os.environ.get("ENGINE_DEBUG", "0") or 0)
    if debug >= 1:
        print(f"== traced program ({len(program.nodes)} nodes)\n{program}")
    for name, fn in pipeline:
        before = program.nodes
        program = fn(program)
        kept = {id(n) for n in before}
        stats.append(dict(name=name, nodes_before=len(before), nodes_after=len(program.nodes),
                          rewritten=sum(id(n) not in kept for n in program.nodes)))
        if debug >= 2:
            print(f"== after {name} ({len(before)} -> {len(program.nodes)} nodes)\n{program}")
    return program, stats

