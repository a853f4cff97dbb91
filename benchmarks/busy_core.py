"""Does a thread pool collapse when another process keeps a core busy?

    python -m benchmarks.busy_core [--config small] [--steps 10] [--threads all]

Times the engine's training step (eager and jit) with BLAS and the engine's C kernels
each at one thread or at --threads, first on the machine as it is, then while a
spinning Python process keeps one core busy. A pool whose waiting workers spin
(OpenBLAS's) slows down many times over in the second case; a pool whose workers
sleep (the engine's kernels) should not. Each setting runs in its own process.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from .run import thread_counts
from .timing import median_time


def child(config: str, impl: str, blas: int, kernels: int, steps: int) -> dict:
    import engine as eg
    from backends import cparallel
    from threadpoolctl import threadpool_limits

    from .engine_model import build
    from .spec import CONFIGS, canonical_batch, canonical_params
    eg.set_num_threads(kernels)
    threadpool_limits(blas, user_api="blas")
    cfg = CONFIGS[config]
    step, _ = build(cfg, canonical_params(cfg), canonical_batch(cfg), jit=impl == "jit")
    return dict(ms=median_time(step, repeat=steps, warmup=3) * 1e3, parallel_loops=cparallel.parallel_loops())


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", default="all", help="the thread count compared with one (an int or 'all')")
    ap.add_argument("--child", nargs=4, metavar=("IMPL", "BLAS", "KERNELS", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        impl, blas, kernels, steps = args.child
        print(json.dumps(child(args.config, impl, int(blas), int(kernels), int(steps))))
        return []
    n = thread_counts(args.threads)[-1]
    rows = []
    print(f"{'busy core':9s} {'impl':5s} {'BLAS':>4s} {'kernels':>7s} {'ms/step':>9s} {'parallel calls':>14s}")
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for impl in ("eager", "jit"):
                for blas, kernels in ((1, 1), (n, n), (1, n), (n, 1)):
                    res = subprocess.run([sys.executable, "-m", "benchmarks.busy_core", "--config", args.config,
                                          "--child", impl, str(blas), str(kernels), str(args.steps)],
                                         capture_output=True, text=True)
                    if res.returncode != 0:
                        print(res.stderr[-2000:], file=sys.stderr)
                        continue
                    r = dict(busy=busy, impl=impl, blas=blas, kernels=kernels,
                             **json.loads(res.stdout.strip().splitlines()[-1]))
                    rows.append(r)
                    print(f"{str(busy):9s} {impl:5s} {blas:4d} {kernels:7d} {r['ms']:9.2f} {r['parallel_loops']:14d}",
                          flush=True)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    return rows


if __name__ == "__main__":
    main()
