"""Side-by-side training-step benchmark on the shared workload (model_spec.md).

    python -m benchmarks.run [--configs small base medium] [--json results.json]
                             [--device cpu|cuda] [--steps N]

Each (config, implementation) runs in its own process, so memory and thread pools
do not mix. "peak MB" is the peak RSS during training (warm-up and compilation
included) above the RSS once the model, optimizer and batch are built: the memory
training needs beyond the model, whether an allocator keeps it or frees it.
Rows: the engine eager, the engine jit, PyTorch eager (when installed), and the
NumPy matmul floor (just the step's matmuls). Ratios come from one run on one
machine; absolute times vary with load. Losses at step 1 and 5 are checked
against PyTorch's (the spec asks ~1e-5 and ~1e-4 relative).

By default the children run with OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset (they
slow a current NumPy on this machine; see the env notes); --keep-env keeps them.
Every implementation gets the same thread budget (--threads, default 1: on a shared
2-core machine spinning BLAS/OpenMP pools distort timings by 10x or more).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

from .spec import CONFIGS, canonical_batch, canonical_params, matmul_shapes

DEFAULT_STEPS = {"small": 40, "base": 20, "medium": 12}
WARMUP = 3


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM), so the peak covers the timed steps only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _floor(cfg_name: str, steps: int) -> dict:
    cfg = CONFIGS[cfg_name]
    rng = np.random.default_rng(0)
    pairs = [(rng.standard_normal(a).astype(np.float32), rng.standard_normal(b).astype(np.float32))
             for a, b in matmul_shapes(cfg)]
    times = []
    for i in range(WARMUP + steps):
        t0 = time.perf_counter()
        for a, b in pairs:
            np.matmul(a, b)
        times.append(time.perf_counter() - t0)
    return dict(median_s=float(np.median(times[WARMUP:])))


def child(cfg_name: str, impl: str, steps: int, device: str) -> dict:
    """Run one implementation of one config and report timings, losses and memory."""
    cfg = CONFIGS[cfg_name]
    if impl == "floor":
        return _floor(cfg_name, steps)
    params, batch = canonical_params(cfg), canonical_batch(cfg)
    if impl == "torch":
        import torch
        from .torch_model import build
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads:
            torch.set_num_threads(threads)
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        step, _ = build(cfg, params, batch, device=device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    else:
        from .engine_model import build
        step, _ = build(cfg, params, batch, device=device, jit=(impl == "jit"))
        sync = lambda: None
    losses, times = [], []
    compile_s = None
    _reset_peak()                 # peak over all of training, warm-up and compile included
    base_rss = _status_mb("VmRSS")
    for i in range(WARMUP + steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        dt = time.perf_counter() - t0
        if i == 0 and impl == "jit":
            compile_s = dt
        losses.append(loss)
        times.append(dt)
    out = dict(median_s=float(np.median(times[WARMUP:])), loss1=losses[0], loss5=losses[4],
               peak_growth_mb=max(0.0, _status_mb("VmHWM") - base_rss), compile_s=compile_s)
    if device != "cpu":
        out["gpu_pool_mb"] = _gpu_pool_mb(impl)
    return out


def _gpu_pool_mb(impl: str) -> float:
    """Device memory the allocator holds after training: its caching pool's high-water mark.

    On a GPU the host RSS says little; both CuPy's and PyTorch's pools keep freed blocks,
    so what they hold is the most the step needed at once (plus fragmentation)."""
    if impl == "torch":
        import torch
        return torch.cuda.max_memory_reserved() / 2**20
    import cupy
    return cupy.get_default_memory_pool().total_bytes() / 2**20


def _spawn(cfg: str, impl: str, steps: int, device: str, keep_env: bool, threads: int) -> dict | None:
    env = dict(os.environ)
    if threads > 0:               # the same thread budget for every implementation
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    if not keep_env:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    cmd = [sys.executable, "-m", "benchmarks.run", "--child", cfg, impl, "--steps", str(steps),
           "--device", device]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        print(f"  {cfg}/{impl} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["small", "base", "medium"], choices=list(CONFIGS))
    ap.add_argument("--impls", nargs="+", default=["eager", "jit", "torch", "floor"])
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default per config)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--markdown", action="store_true", help="also print the rows as the README's table")
    ap.add_argument("--keep-env", action="store_true", help="keep OPENBLAS_* settings in children")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS/OpenMP threads for every implementation (0: libraries' defaults)")
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        out = child(args.child[0], args.child[1], args.steps or DEFAULT_STEPS[args.child[0]], args.device)
        print(json.dumps(out))
        return [out]
    impls = [i for i in args.impls if i != "torch" or _has_torch()]
    if args.device != "cpu":
        impls = [i for i in impls if i != "floor"]
    rows = []
    header = (f"{'config':7s} {'impl':6s} {'ms/step':>9s} {'steps/s':>8s} {'GFLOP/s':>8s} "
              f"{'peak MB':>8s} {'x torch':>8s} {'x floor':>8s} {'loss@1':>10s} {'loss@5':>10s} {'compile s':>9s}"
              + (f" {'GPU MB':>9s}" if args.device != "cpu" else ""))
    print(header)
    for cfg_name in args.configs:
        cfg = CONFIGS[cfg_name]
        steps = args.steps or DEFAULT_STEPS[cfg_name]
        res = {impl: _spawn(cfg_name, impl, steps, args.device, args.keep_env, args.threads)
               for impl in impls}
        torch_s = res.get("torch", {}) and res["torch"]["median_s"]
        floor_s = res.get("floor", {}) and res["floor"]["median_s"]
        for impl in impls:
            r = res[impl]
            if r is None:
                continue
            t = r["median_s"]
            row = dict(config=cfg_name, impl=impl, device=args.device, ms=t * 1e3, steps_per_s=1 / t,
                       gflops=cfg.step_flops / t / 1e9,
                       x_torch=t / torch_s if torch_s else None, x_floor=t / floor_s if floor_s else None,
                       **{k: v for k, v in r.items() if k != "median_s"})
            if impl in ("eager", "jit") and "torch" in res and res["torch"]:
                row["loss1_rel_err"] = abs(r["loss1"] - res["torch"]["loss1"]) / abs(res["torch"]["loss1"])
                row["loss5_rel_err"] = abs(r["loss5"] - res["torch"]["loss5"]) / abs(res["torch"]["loss5"])
            rows.append(row)

            def f(v: Any, fmt: str) -> str:
                return format(v, fmt) if isinstance(v, (int, float)) else "-"
            print(f"{cfg_name:7s} {impl:6s} {t * 1e3:9.2f} {1 / t:8.1f} {row['gflops']:8.1f} "
                  f"{f(r.get('peak_growth_mb'), '8.1f')} {f(row['x_torch'], '8.2f')} {f(row['x_floor'], '8.2f')} "
                  f"{f(r.get('loss1'), '10.6f')} {f(r.get('loss5'), '10.6f')} {f(r.get('compile_s'), '9.2f')}"
                  + (f" {f(r.get('gpu_pool_mb'), '9.1f')}" if "gpu_pool_mb" in r else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    if args.markdown:
        print(markdown(rows))
    return rows


_NAMES = {"eager": "engine eager", "jit": "engine jit", "torch": "PyTorch eager", "floor": "NumPy matmul floor"}


def markdown(rows: list[dict]) -> str:
    """The rows as the README's performance table."""
    def f(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "–"
    gpu = any("gpu_pool_mb" in r for r in rows)
    memory = "GPU pool MB" if gpu else "peak MB"
    lines = [f"| config | impl | ms/step | GFLOP/s | x PyTorch | x matmul floor | {memory} | loss@1 / loss@5 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = (f"{r['loss1']:.6f} / {r['loss5']:.6f}" if r.get("loss1") is not None else "–")
        mem = r.get("gpu_pool_mb") if gpu else r.get("peak_growth_mb")
        lines.append(f"| {r['config']} | {_NAMES.get(r['impl'], r['impl'])} | {r['ms']:.2f} | {r['gflops']:.1f} | "
                     f"{f(r.get('x_torch'), '.2f')} | {f(r.get('x_floor'), '.2f')} | "
                     f"{f(mem, '.1f')} | {loss} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
