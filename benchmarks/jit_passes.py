"""Where a jitted training step's passes over memory go: every call of its generated
program timed, with the bytes it reads and writes, grouped by what runs.

    python -m benchmarks.jit_passes [--config medium] [--steps 3] [--top 25]

Each call the program makes (a C kernel, a ufunc, a matmul, an op's forward) is
wrapped in its namespace; bytes are the sizes of its array arguments (read) and of
its result (written). Rows are grouped by label: the kernel's comment in the
generated source (`C: rows[...]`, `C: fused[...]`) or the op's name.
"""
from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict
from typing import Any, Callable

import numpy as np

from .engine_model import build
from .spec import CONFIGS, canonical_batch, canonical_params


def _nbytes(values: Any) -> int:
    if isinstance(values, np.ndarray):
        return values.nbytes
    if isinstance(values, (list, tuple)):
        return sum(_nbytes(v) for v in values)
    return 0


def _labels(source: str, program: Any) -> dict[str, str]:
    """namespace name (`_f12`, `_g3_1`) -> what it runs."""
    labels = {}
    for line in source.splitlines():
        m = re.search(r"(?:= |^    )(_(?:f|g|rows)\d+(?:_\d+)?)\(", line)
        if not m:
            continue
        name = m.group(1)
        comment = line.split("# ", 1)[1] if "# " in line else ""
        k = int(re.match(r"_(?:f|g|rows)(\d+)", name).group(1))
        op = getattr(program.nodes[k].op, "name", type(program.nodes[k].op).__name__) \
            if k < len(program.nodes) else "?"
        kind = "C " if comment.startswith("C:") else ("ufunc-chain " if name.startswith("_g") else "")
        labels[name] = kind + (re.sub(r"\[.*", "", comment[3:]) + ":" + op if comment.startswith("C:") else op)
    return labels


def profile(config: str = "medium", steps: int = 3) -> list[tuple[str, int, float, int, int]]:
    """(label, calls per step, ms per step, MB read, MB written per step), slowest first."""
    cfg = CONFIGS[config]
    step, _ = build(cfg, canonical_params(cfg), canonical_batch(cfg), jit=True)
    step()
    step()
    entry = _find_entry(step)
    ns, labels = entry.generated.namespace, _labels(entry.generated.source, entry.program)
    records: dict = defaultdict(lambda: [0, 0.0, 0, 0])

    def timed(label: str, fn: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            rec = records[label]
            rec[0] += 1
            rec[1] += time.perf_counter() - t0
            rec[2] += _nbytes(args)      # a row group's outputs are among its arguments
            rec[3] += _nbytes(out) if out is not None else _nbytes(kwargs.get("out"))
            return out
        return run

    originals = {name: ns[name] for name in labels}
    for name, label in labels.items():
        ns[name] = timed(label, originals[name])
    try:
        for _ in range(steps):
            step()
    finally:
        ns.update(originals)
    rows = [(label, n // steps, t * 1e3 / steps, r // steps >> 20, w // steps >> 20)
            for label, (n, t, r, w) in records.items()]
    return sorted(rows, key=lambda row: -row[2])


def _find_entry(step: Callable) -> Any:
    """The compiled program behind a benchmark step (the Jit object in its closure)."""
    for cell in step.__closure__ or ():
        value = cell.cell_contents
        if hasattr(value, "_entry"):
            return value._entry()
    raise ValueError("the step holds no jitted function")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="medium", choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    rows = profile(args.config, args.steps)
    total = sum(r[2] for r in rows)
    print(f"{'what runs':<40} {'calls':>5} {'ms/step':>8} {'share':>6} {'MB read':>8} {'MB written':>10}")
    for label, n, ms, r, w in rows[:args.top]:
        print(f"{label[:40]:<40} {n:>5} {ms:>8.2f} {ms / total:>6.1%} {r:>8} {w:>10}")
    print(f"{'total (timed calls)':<40} {sum(r[1] for r in rows):>5} {total:>8.2f}"
          f" {'':>6} {sum(r[3] for r in rows):>8} {sum(r[4] for r in rows):>10}")


if __name__ == "__main__":
    main()
