"""Side-by-side training-step benchmark on the shared workload (model_spec.md).

    python -m benchmarks.run [--configs small base medium] [--json results.json]
                             [--device cpu|cuda] [--steps N] [--threads 1,all] [--repeat N]

Each (config, implementation) runs in its own process, so memory and thread pools
do not mix. "peak MB" is the peak RSS during training (warm-up and compilation
included) above the RSS once the model, optimizer and batch are built: the memory
training needs beyond the model, whether an allocator keeps it or frees it.
Rows: the engine eager, the engine jit, PyTorch eager (when installed), and the
NumPy matmul floor (just the step's matmuls); on a GPU, PyTorch's torch.compile instead
of the floor. There "GPU MB" is what the allocator pools hold after training (the
engine's CUDA graphs' private pools included), and a line after the jit row says
whether its step ran as a CUDA graph. Ratios come from one run on one
machine; absolute times vary with load. Losses at step 1 and 5 are checked
against PyTorch's (the spec asks ~1e-5 and ~1e-4 relative).

By default the children run with OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset (they
slow a current NumPy on this machine; see the env notes); --keep-env keeps them.
Every implementation runs at each thread count of --threads (default "1,all": one
thread, then every core this process may use), set in the child the way a user
would: eg.set_num_threads(n) for the engine, torch.set_num_threads(n) for PyTorch,
threadpoolctl for the NumPy floor. The run starts by naming the machine: CPU model,
cores, NumPy's BLAS and PyTorch's (also in the JSON, next to the rows).
On a machine whose speed drifts (a shared virtual machine), --repeat N runs the whole
sweep N times, one round after another, so a slow spell hits one round rather than
one implementation; every ratio still comes from one round (the rows beside it), and
the table gives each figure's median over the rounds with the ratios' min-max.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
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


def _set_threads(impl: str, threads: int) -> None:
    """Size the implementation's thread pools as its user would (0: its defaults)."""
    if not threads:
        return
    if impl == "torch":
        import torch
        torch.set_num_threads(threads)
    elif impl == "floor":
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads, user_api="blas")
    else:
        import engine as eg
        eg.set_num_threads(threads)


def child(cfg_name: str, impl: str, steps: int, device: str, threads: int = 0) -> dict:
    """Run one implementation of one config and report timings, losses and memory."""
    cfg = CONFIGS[cfg_name]
    _set_threads(impl, threads)
    if impl == "floor":
        return _floor(cfg_name, steps)
    params, batch = canonical_params(cfg), canonical_batch(cfg)
    if impl in ("torch", "compile"):
        import torch
        from .torch_model import build
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        step, _ = build(cfg, params, batch, device=device, compile=impl == "compile")
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
        if i == 0 and impl in ("jit", "compile"):
            compile_s = dt
        losses.append(loss)
        times.append(dt)
    out = dict(median_s=float(np.median(times[WARMUP:])), loss1=losses[0], loss5=losses[4],
               peak_growth_mb=max(0.0, _status_mb("VmHWM") - base_rss), compile_s=compile_s)
    if device != "cpu":
        out["gpu_pool_mb"] = _gpu_pool_mb(impl)
    compiled = getattr(step, "compiled", None)
    if compiled is not None:
        graphs = [s for s in compiled.stats() if s["name"] == "cuda_graphs"]
        if graphs:
            out["cuda_graphs"] = {k: v for k, v in graphs[0].items() if k != "name"}
    return out


def _gpu_pool_mb(impl: str) -> float:
    """Device memory the allocator holds after training: its caching pool's high-water mark.

    On a GPU the host RSS says little; both CuPy's and PyTorch's pools keep freed blocks,
    so what they hold is the most the step needed at once (plus fragmentation)."""
    if impl in ("torch", "compile"):
        import torch
        return torch.cuda.max_memory_reserved() / 2**20
    import cupy
    from backends import cuda_graphs
    return (cupy.get_default_memory_pool().total_bytes() + cuda_graphs.held_bytes()) / 2**20


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _numpy_blas() -> list[dict]:
    from threadpoolctl import threadpool_info
    np.ones((2, 2)) @ np.ones((2, 2))                 # BLAS loaded
    keys = ("internal_api", "version", "architecture", "threading_layer", "num_threads")
    return [{k: p.get(k) for k in keys} for p in threadpool_info() if p["user_api"] == "blas"]


def _torch_config() -> dict:
    """PyTorch's version, BLAS, CPU capability and parallel backend (from torch.__config__)."""
    import torch
    show = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=([^,\s]+)", show)
    capability = re.search(r"CPU capability usage: (\S+)", show)
    backend = re.search(r"ATen parallel backend: (.+)", torch.__config__.parallel_info())
    return dict(version=torch.__version__, blas=blas.group(1) if blas else None, mkl=torch.backends.mkl.is_available(),
                cpu_capability=capability.group(1) if capability else None,
                parallel_backend=backend.group(1).strip() if backend else None,
                default_threads=torch.get_num_threads())


def machine(with_torch: bool) -> dict:
    """Which machine the figures come from (PyTorch's side read in a child process)."""
    out = dict(cpu=_cpu_model(), cores=len(os.sched_getaffinity(0)), logical_cpus=os.cpu_count(),
               system=platform.platform(), python=platform.python_version(), numpy=np.__version__,
               numpy_blas=_numpy_blas())
    if with_torch:
        res = subprocess.run([sys.executable, "-m", "benchmarks.run", "--describe-torch"],
                             capture_output=True, text=True)
        out["torch"] = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
    return out


def thread_counts(spec: str) -> list[int]:
    """"1,all" -> [1, cores]: each a positive int or "all" (the cores this process may use)."""
    counts: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        n = len(os.sched_getaffinity(0)) if part == "all" else int(part) if part.isdigit() else 0
        if n < 1:
            raise ValueError(f"--threads: expected positive ints or 'all' separated by commas, got {spec!r}")
        if n not in counts:
            counts.append(n)
    return counts


def _spawn(cfg: str, impl: str, steps: int, device: str, keep_env: bool, threads: int) -> dict | None:
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)        # the child sizes its pools itself, as a user's script would
    if not keep_env:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    cmd = [sys.executable, "-m", "benchmarks.run", "--child", cfg, impl, "--steps", str(steps),
           "--device", device, "--child-threads", str(threads)]
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
    ap.add_argument("--impls", nargs="+", default=None,
                    help="default: eager jit torch floor (cpu); eager jit torch compile (cuda)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default per config)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--markdown", action="store_true", help="also print the rows as the README's table")
    ap.add_argument("--keep-env", action="store_true", help="keep OPENBLAS_* settings in children")
    ap.add_argument("--threads", default="1,all",
                    help="thread counts to run every implementation at, e.g. 1,all or 1,2,4")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the whole sweep this many times; the table gives medians and ranges")
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "IMPL"), help=argparse.SUPPRESS)
    ap.add_argument("--child-threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--describe-torch", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.describe_torch:
        print(json.dumps(_torch_config()))
        return []
    if args.child:
        out = child(args.child[0], args.child[1], args.steps or DEFAULT_STEPS[args.child[0]], args.device,
                    args.child_threads)
        print(json.dumps(out))
        return [out]
    try:
        counts = thread_counts(args.threads)
    except ValueError as e:
        ap.error(str(e))
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    impls = args.impls or (["eager", "jit", "torch", "floor"] if args.device == "cpu"
                           else ["eager", "jit", "torch", "compile"])
    impls = [i for i in impls if i not in ("torch", "compile") or _has_torch()]
    if args.device != "cpu":
        impls = [i for i in impls if i != "floor"]
    host = machine("torch" in impls)
    print(describe(host))
    rows = []
    header = (f"{'threads':>7s} {'config':7s} {'impl':6s} {'ms/step':>9s} {'steps/s':>8s} {'GFLOP/s':>8s} "
              f"{'peak MB':>8s} {'x torch':>8s} {'x floor':>8s} {'loss@1':>10s} {'loss@5':>10s} {'compile s':>9s}"
              + (f" {'GPU MB':>9s}" if args.device != "cpu" else ""))
    print(header)
    sweep = [(r, n, c) for r in range(args.repeat) for n in counts for c in args.configs]
    for round_, threads, cfg_name in sweep:
        if args.repeat > 1 and threads == counts[0] and cfg_name == args.configs[0]:
            print(f"round {round_ + 1} of {args.repeat}")
        cfg = CONFIGS[cfg_name]
        steps = args.steps or DEFAULT_STEPS[cfg_name]
        res = {impl: _spawn(cfg_name, impl, steps, args.device, args.keep_env, threads)
               for impl in impls}
        torch_s = res.get("torch") and res["torch"]["median_s"]
        floor_s = res.get("floor") and res["floor"]["median_s"]
        for impl in impls:
            r = res[impl]
            if r is None:
                continue
            t = r["median_s"]
            row = dict(config=cfg_name, impl=impl, device=args.device, threads=threads, round=round_,
                       ms=t * 1e3,
                       steps_per_s=1 / t,
                       gflops=cfg.step_flops / t / 1e9,
                       x_torch=t / torch_s if torch_s else None, x_floor=t / floor_s if floor_s else None,
                       **{k: v for k, v in r.items() if k != "median_s"})
            if impl in ("eager", "jit") and "torch" in res and res["torch"]:
                row["loss1_rel_err"] = abs(r["loss1"] - res["torch"]["loss1"]) / abs(res["torch"]["loss1"])
                row["loss5_rel_err"] = abs(r["loss5"] - res["torch"]["loss5"]) / abs(res["torch"]["loss5"])
            rows.append(row)

            def f(v: Any, fmt: str) -> str:
                return format(v, fmt) if isinstance(v, (int, float)) else "-"
            print(f"{threads:7d} {cfg_name:7s} {impl:6s} {t * 1e3:9.2f} {1 / t:8.1f} {row['gflops']:8.1f} "
                  f"{f(r.get('peak_growth_mb'), '8.1f')} {f(row['x_torch'], '8.2f')} {f(row['x_floor'], '8.2f')} "
                  f"{f(r.get('loss1'), '10.6f')} {f(r.get('loss5'), '10.6f')} {f(r.get('compile_s'), '9.2f')}"
                  + (f" {f(r.get('gpu_pool_mb'), '9.1f')}" if "gpu_pool_mb" in r else ""))
            if "cuda_graphs" in r:
                g = r["cuda_graphs"]
                print(f"{'':7s} {cfg_name:7s} {impl:6s} CUDA graph: " + (
                    f"captured, {g['replays']} replays" if g["captured"] else f"not used ({g['reason']})"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(machine=host, rows=rows), fh, indent=2)
    if args.markdown:
        print(describe(host))
        print(markdown(summarize(rows)))
    return rows


def describe(host: dict) -> str:
    """The machine in one line for the table's caption."""
    blas = ", ".join(f"{b['internal_api']} {b['version']} ({b['architecture']}, {b['threading_layer']})"
                     for b in host["numpy_blas"]) or "none found"
    text = f"{host['cpu']}, {host['cores']} cores; NumPy {host['numpy']} BLAS: {blas}"
    torch = host.get("torch")
    if torch:
        text += (f"; PyTorch {torch['version']} BLAS: {torch['blas']} (CPU {torch['cpu_capability']}, "
                 f"{torch['parallel_backend']})")
    return text


def _median(values: list) -> Any:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (threads, config, impl) over the rounds of a --repeat run: the median
    of each timing and ratio, the ratios' (min, max) and the number of rounds. Losses do
    not depend on the round (same parameters and batch); the first round's are kept."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.get("threads"), r["config"], r["impl"]), []).append(r)
    out = []
    for group in groups.values():
        first = dict(group[0])
        first["rounds"] = len(group)
        for key in ("ms", "gflops", "peak_growth_mb", "gpu_pool_mb", "x_torch", "x_floor"):
            if key in first:
                first[key] = _median([g.get(key) for g in group])
        for key in ("x_torch", "x_floor"):
            vals = [g[key] for g in group if g.get(key) is not None]
            first[key + "_range"] = (min(vals), max(vals)) if vals else None
        out.append(first)
    return out


_NAMES = {"eager": "engine eager", "jit": "engine jit", "torch": "PyTorch eager", "compile": "torch.compile",
          "floor": "NumPy matmul floor"}


def markdown(rows: list[dict]) -> str:
    """The rows (one per implementation: `summarize`'s) as the README's performance table;
    a ratio over several rounds reads "median (min–max)"."""
    def f(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "–"

    def ratio(r: dict, key: str) -> str:
        spread = r.get(key + "_range")
        if r.get("rounds", 1) > 1 and spread and spread[0] != spread[1]:
            return f"{f(r.get(key), '.2f')} ({spread[0]:.2f}–{spread[1]:.2f})"
        return f(r.get(key), ".2f")
    gpu = any("gpu_pool_mb" in r for r in rows)
    memory = "GPU pool MB" if gpu else "peak MB"
    lines = [f"| threads | config | impl | ms/step | GFLOP/s | x PyTorch | x matmul floor | {memory} | loss@1 / loss@5 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = (f"{r['loss1']:.6f} / {r['loss5']:.6f}" if r.get("loss1") is not None else "–")
        mem = r.get("gpu_pool_mb") if gpu else r.get("peak_growth_mb")
        lines.append(f"| {r.get('threads', '–')} | {r['config']} | {_NAMES.get(r['impl'], r['impl'])} | {r['ms']:.2f} | {r['gflops']:.1f} | "
                     f"{ratio(r, 'x_torch')} | {ratio(r, 'x_floor')} | "
                     f"{f(mem, '.1f')} | {loss} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
