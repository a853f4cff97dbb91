"""Two source trees' training steps, timed in alternation: a regression check that holds
on a machine whose speed drifts.

    python -m benchmarks.paired OTHER_TREE [--configs small base] [--impls eager jit]
                                [--steps 40] [--rounds 40]

OTHER_TREE is a checkout of the engine (e.g. `git worktree add /tmp/before <commit>`).
For each (config, implementation) both trees build the benchmark's training step once,
each in its own persistent process with one thread, then take turns running `--steps`
steps, `--rounds` times (the order alternates every round). A shared virtual machine's
speed drifts by tens of percent over minutes, which swamps a few percent between two
separate runs; within one round both trees see the same machine, so the median of the
per-round ratios (this tree / OTHER_TREE) says what a single pair of runs cannot. The
quartiles of those ratios are printed next to it: wide quartiles mean a noisy machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

_WORKER = """
import sys, time
import engine as eg
from benchmarks.spec import CONFIGS, canonical_params, canonical_batch
from benchmarks.engine_model import build
if hasattr(eg, "set_num_threads"):      # an older tree: the environment sets it
    eg.set_num_threads(1)
cfg = CONFIGS[sys.argv[1]]
step, _ = build(cfg, canonical_params(cfg), canonical_batch(cfg), jit=sys.argv[2] == "jit")
for _ in range(3):
    step()
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    t = time.perf_counter()
    for _ in range(n):
        step()
    print((time.perf_counter() - t) / n, flush=True)
"""


def _start(tree: Path, config: str, impl: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(tree), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        env.pop(var, None)
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, config, impl], cwd=tree, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the {config}/{impl} step did not start in {tree}")
    return proc


def compare(other: Path, here: Path, config: str, impl: str, steps: int, rounds: int) -> dict:
    """Per-round seconds per step of both trees and the median ratio here / other."""
    procs = {"other": _start(other, config, impl), "here": _start(here, config, impl)}
    times: dict[str, list[float]] = {"other": [], "here": []}
    try:
        for r in range(rounds):
            for k in (("other", "here") if r % 2 == 0 else ("here", "other")):
                procs[k].stdin.write(f"{steps}\n")
                procs[k].stdin.flush()
                times[k].append(float(procs[k].stdout.readline()))
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()
    ratios = sorted(h / o for h, o in zip(times["here"], times["other"]))
    q = len(ratios) // 4
    return dict(config=config, impl=impl, other_ms=statistics.median(times["other"]) * 1e3,
                here_ms=statistics.median(times["here"]) * 1e3, ratio=statistics.median(ratios),
                q1=ratios[q], q3=ratios[-1 - q])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("other", type=Path, help="the other checkout of the engine")
    ap.add_argument("--configs", nargs="+", default=["small", "base"])
    ap.add_argument("--impls", nargs="+", default=["eager", "jit"])
    ap.add_argument("--steps", type=int, default=40, help="steps per turn")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args(argv)
    here = Path(__file__).resolve().parent.parent
    print(f"this tree: {here}; other: {args.other.resolve()}; one thread; "
          f"{args.rounds} rounds of {args.steps} steps each")
    print("| config | impl | other ms | this ms | this / other (median of rounds) | quartiles |")
    print("|---|---|---|---|---|---|")
    for config in args.configs:
        for impl in args.impls:
            r = compare(args.other.resolve(), here, config, impl, args.steps, args.rounds)
            print(f"| {config} | {impl} | {r['other_ms']:.3f} | {r['here_ms']:.3f} | "
                  f"{r['ratio']:.3f} | {r['q1']:.3f} - {r['q3']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
