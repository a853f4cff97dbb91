"""A small training loop: progress lines, periodic evaluation, checkpoints, exact resume,
a JSONL/CSV log, and optionally a jit-compiled step.

    hist = nn.train(model, opt, batch_fn, loss_fn, steps=1000, scheduler=sched, clip_norm=1.0,
                    eval_fn=evaluate, eval_every=100, checkpoint="run.npz",
                    checkpoint_every=100, resume=True, log="run.jsonl", tokens_fn=count)

Conventions (what makes `resume=True` reproduce an uninterrupted run exactly):
- Update i (0-based) trains on `batch_fn(i)`; batch_fn must depend only on i (and on
  fixed data/seed), never on how many times it has been called.
- Before update i the engine's random generators are reseeded from (seed, i), so
  dropout masks depend on (seed, i) alone. This is why the loop needs no copy of a
  backend's generator state (CuPy's cannot be read back) and why evaluation, which
  may draw random numbers (sampling), does not shift the training stream.
- A record's "step" counts completed updates (1..steps); a checkpoint written after
  update i holds step = i + 1 with model, optimizer and scheduler state, and a
  resumed run starts at update `step`. Log lines past the checkpoint (written by
  the interrupted run after its last checkpoint) are dropped on resume.

`jit=True` traces one update (loss, backward, clipping, optimizer step) with eg.jit.
State that changes between steps must then live in tensors: build Adam/AdamW with
`capturable=True` and, when a scheduler is used, a 0-d tensor lr (schedulers write it
in place). Update 0 runs eagerly, so lazily created optimizer state (SGD's momentum
buffer) exists before tracing; a resumed run has that state from its checkpoint and
compiles its first update, so every update past the first runs the same compiled
program whether or not the run was interrupted (eager and compiled steps agree only to
rounding: their sums run in different orders). Switching model.train()/eval()
for evaluation makes the next compiled step retrace (the jit keys programs on it).
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from typing import Any, Callable

import numpy as np

import engine as eg
from engine.errors import ArgumentError
from engine import Tensor

from engine.validate import validated

from .checkpoint import load, save
from .files import atomic_write
from .optim.clip import clip_grad_norm_
from .parallel import DistributedDataParallel

__all__ = ["train", "read_log", "plot_losses", "step_seed"]

_BASE_COLUMNS = ["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"]


def step_seed(seed: int, step: int) -> int:
    """The engine seed used before update `step`: a hash of (seed, step), so nearby runs
    and nearby steps get unrelated dropout streams."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step)]).generate_state(1)[0])


def _lr(optimizer: Any) -> float:
    lr = optimizer.param_groups[0]["lr"]
    return float(lr.item()) if isinstance(lr, Tensor) else float(lr)


def _params(optimizer: Any) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _fmt_rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _fmt_metric(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


# -- the log ----------------------------------------------------------------------------------
def read_log(path: str) -> list[dict]:
    """Records of a log written by `train` (JSONL, or CSV when the path ends in .csv);
    CSV cells come back as floats (ints for "step"/"tokens"), empty cells are dropped."""
    if not os.path.exists(path):
        return []
    if path.endswith(".csv"):
        out = []
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                rec: dict = {}
                for k, v in row.items():
                    if v in ("", None):
                        continue
                    try:
                        rec[k] = int(v) if k in ("step", "tokens") else float(v)
                    except ValueError:
                        rec[k] = v
                out.append(rec)
        return out
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class _Log:
    """Appends records as JSON lines, or as CSV rows (rewriting the file with a wider
    header the first time a new column, such as an eval metric, appears)."""

    def __init__(self, path: str | None, keep_until: int | None) -> None:
        self.path = path
        self.csv = bool(path and path.endswith(".csv"))
        self.rows: list[dict] = []
        self.columns: list[str] = list(_BASE_COLUMNS)
        if path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        old = read_log(path) if keep_until is not None else []
        self.rows = [r for r in old if int(r.get("step", 0)) <= keep_until]
        for r in self.rows:
            self.columns += [k for k in r if k not in self.columns]
        self._rewrite()

    def _rewrite(self) -> None:
        def write(f: Any) -> None:
            if self.csv:
                w = csv.DictWriter(f, fieldnames=self.columns)
                w.writeheader()
                w.writerows(self.rows)
            else:
                for r in self.rows:
                    f.write(json.dumps(r) + "\n")
        atomic_write(self.path, write, binary=False)

    def append(self, rec: dict) -> None:
        if self.path is None:
            return
        self.rows.append(rec)
        new = [k for k in rec if k not in self.columns]
        if self.csv and new:
            self.columns += new
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            if self.csv:
                csv.DictWriter(f, fieldnames=self.columns).writerow(rec)
            else:
                f.write(json.dumps(rec) + "\n")


def plot_losses(log_path: str, png_path: str, title: str | None = None,
                baselines: dict[str, float] | None = None) -> bool:
    """Plot training loss (and every eval metric whose name contains "loss") against the
    step into `png_path`, with `baselines` ({label: loss}) as dashed horizontal lines.
    Returns False, writing nothing, when matplotlib is not installed (it is the
    optional `plot` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = read_log(log_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    train_rows = [r for r in rows if "loss" in r]
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], lw=1,
            label="train loss")
    keys = sorted({k for r in rows for k in r if "loss" in k and k != "loss"})
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=k)
    for label, value in (baselines or {}).items():
        ax.axhline(value, ls="--", lw=1, color="gray")
        ax.annotate(label, (0, value), xycoords=("axes fraction", "data"), xytext=(4, 3),
                    textcoords="offset points", color="gray", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or os.path.basename(log_path))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


# -- the loop ---------------------------------------------------------------------------------
def _check_jit(optimizer: Any, scheduler: Any) -> None:
    """Refuse configurations whose jitted step would silently freeze a changing number."""
    for i, g in enumerate(optimizer.param_groups):
        if scheduler is not None and not isinstance(g["lr"], Tensor):
            raise ArgumentError(f"train(jit=True): parameter group {i} has a Python float lr, which "
                                f"the compiled step would freeze while the scheduler changes it; "
                                f"pass lr=eg.tensor(lr) to the optimizer")
        if "capturable" in g and not g["capturable"]:
            raise ArgumentError(f"train(jit=True): {type(optimizer).__name__} keeps its step count "
                                f"in a Python int; build it with capturable=True")


def _make_step(model: Any, optimizer: Any, loss_fn: Callable, params: list[Tensor],
               clip_norm: float | None) -> Callable:
    def step(batch: Any) -> tuple[Tensor, Tensor | None]:
        loss = loss_fn(model, batch)
        loss.backward()
        norm = clip_grad_norm_(params, clip_norm) if clip_norm is not None else None
        optimizer.step()
        optimizer.zero_grad()
        return loss, norm
    return step


@validated
def train(model: Any, optimizer: Any, batch_fn: Callable[[int], Any],
          loss_fn: Callable[[Any, Any], Tensor], *, steps: int, scheduler: Any = None,
          clip_norm: float | None = None, eval_fn: Callable[[Any], dict] | None = None,
          eval_every: int = 0, checkpoint: str | None = None, checkpoint_every: int = 0,
          resume: bool = False, log: str | None = None, print_every: int = 10,
          tokens_fn: Callable[[Any], int] | None = None, seed: int = 0,
          jit: bool = False, distributed: bool = False) -> list[dict]:
    """Run updates until `steps` have been completed; return this call's records.

    Each record: step, loss, lr (used by that update), tokens (if tokens_fn),
    tokens_per_s, elapsed_s, grad_norm (before clipping, with clip_norm) and, on
    evaluation steps, the metrics eval_fn returned (eval runs after updates that are
    multiples of eval_every, and after the last one). With `checkpoint`, state is saved
    every checkpoint_every updates and at the end; `resume=True` loads it first when
    the file exists (and starts from scratch when it does not). `print_every=0`
    prints nothing.

    `distributed=True` (after engine.distributed.init()) trains data-parallel: see
    `_DataParallel`.
    """
    if checkpoint_every and checkpoint is None:
        raise ArgumentError("train: checkpoint_every needs a checkpoint path")
    if resume and checkpoint is None:
        raise ArgumentError("train: resume=True needs a checkpoint path")
    if jit:
        _check_jit(optimizer, scheduler)

    par = _DataParallel(model) if distributed else None
    if par is not None and par.rank != 0:
        log, print_every = None, 0
    start = 0
    if resume and os.path.exists(checkpoint):
        meta = load(checkpoint, model, optimizer)
        start = int(meta["step"])
        if meta.get("seed", seed) != seed:
            raise ArgumentError(f"train: {checkpoint!r} was written by a run with seed "
                                f"{meta['seed']}, resuming with seed {seed} would not continue it")
        if scheduler is not None:
            if "scheduler" not in meta:
                raise ArgumentError(f"train: {checkpoint!r} holds no scheduler state")
            scheduler.load_state_dict(meta["scheduler"])
        if print_every:
            print(f"resumed from {checkpoint} at step {start}/{steps}", flush=True)
    logger = _Log(log, keep_until=start if resume else None)

    params = _params(optimizer)
    eager_step = _make_step(model if par is None else par.model, optimizer, loss_fn, params,
                            clip_norm)
    compiled = eg.jit(eager_step) if jit else None

    def save_checkpoint(done: int) -> None:
        if par is not None and par.rank != 0:
            return
        extra = {"scheduler": scheduler.state_dict()} if scheduler is not None else {}
        save(checkpoint, model, optimizer, step=done, seed=seed, **extra)

    optimizer.zero_grad()                 # gradients left over from the caller would be added
    history: list[dict] = []
    t0 = time.perf_counter()
    window_time, window_tokens, window_steps = 0.0, 0, 0   # throughput: training steps only
    model.train()
    for i in range(start, steps):
        t_step = time.perf_counter()
        eg.manual_seed(step_seed(seed, i))
        batch = batch_fn(i)
        lr = _lr(optimizer)
        fn = compiled if compiled is not None and i > 0 else eager_step
        loss, norm = fn(batch if par is None else par.enter_step(batch))
        loss_value = float(loss.item()) if par is None else par.mean(float(loss.item()))
        if scheduler is not None:
            scheduler.step()
        done = i + 1
        now = time.perf_counter()
        window_time += now - t_step
        rec: dict[str, Any] = {"step": done, "loss": loss_value, "lr": lr}
        if norm is not None:
            rec["grad_norm"] = float(norm.item())
        n_tok = int(tokens_fn(batch)) if tokens_fn is not None else 0
        window_tokens += n_tok
        window_steps += 1
        if tokens_fn is not None:
            rec["tokens"] = n_tok
        rec["elapsed_s"] = round(now - t0, 4)

        if print_every and (done % print_every == 0 or done == steps or done == start + 1):
            dt = max(window_time, 1e-9)
            rate = (f"{_fmt_rate(window_tokens / dt)} tok/s" if tokens_fn is not None
                    else f"{window_steps / dt:.2f} steps/s")
            eta = (now - t0) / (done - start) * (steps - done)
            rec["tokens_per_s" if tokens_fn is not None else "steps_per_s"] = round(
                (window_tokens if tokens_fn is not None else window_steps) / dt, 2)
            width = len(str(steps))
            print(f"step {done:>{width}}/{steps}  loss {loss_value:.4f}  lr {lr:.2e}  {rate}  "
                  f"ETA {_fmt_time(eta)}", flush=True)
            window_time, window_tokens, window_steps = 0.0, 0, 0

        if eval_fn is not None and (par is None or par.rank == 0) and (
                (eval_every and done % eval_every == 0) or done == steps):
            metrics = eval_fn(model)
            model.train()
            rec.update({k: (float(v) if isinstance(v, (int, float, np.number)) else v)
                        for k, v in metrics.items()})
            if print_every:
                print(f"  eval @ {done}: " + "  ".join(f"{k} {_fmt_metric(v)}"
                                                       for k, v in metrics.items()), flush=True)
        history.append(rec)
        logger.append(rec)        # before the checkpoint: a resume drops lines past it, never misses one
        if checkpoint is not None and ((checkpoint_every and done % checkpoint_every == 0)
                                       or done == steps):
            save_checkpoint(done)
    if print_every and steps > start:
        print(f"trained {steps - start} steps in {_fmt_time(time.perf_counter() - t0)}",
              file=sys.stdout, flush=True)
    if par is not None:
        par.group.barrier()               # rank 0's evaluation, log and checkpoint are written
    return history


# -- data parallel ----------------------------------------------------------------------------
class _DataParallel:
    """nn.train(distributed=True): the model wrapped in DistributedDataParallel (rank 0's
    parameters everywhere; a checkpoint to resume from is read by every rank), each update on this rank's rows of the global batch batch_fn(i) with its
    own dropout stream (the step's key folded with the rank), losses averaged over the
    ranks, evaluation, logs and checkpoints on rank 0 only. The checkpoint holds no trace of the
    world size, so a run resumes on any number of processes."""

    def __init__(self, model: Any) -> None:
        self.model = model if isinstance(model, DistributedDataParallel) else \
            DistributedDataParallel(model)
        self.group = self.model._group
        self.rank, self.size = self.group.rank, self.group.size

    def enter_step(self, batch: Any) -> Any:
        eg.fold_in_rng(self.rank)
        return _shard(batch, self.rank, self.size)

    def mean(self, value: float) -> float:
        be = eg.state.get_backend("cpu")
        return float(self.group.all_reduce_array(be, np.array([value]), "mean")[0])


def _shard(batch: Any, rank: int, size: int) -> Any:
    """Rank's equal share of every tensor/array in `batch` (rows along axis 0)."""
    if isinstance(batch, (tuple, list)):
        return type(batch)(_shard(b, rank, size) for b in batch)
    if isinstance(batch, dict):
        return {k: _shard(v, rank, size) for k, v in batch.items()}
    if isinstance(batch, (Tensor, np.ndarray)):
        n = batch.shape[0]
        if n % size:
            raise ValueError(f"train(distributed=True): a batch of {n} rows does not split "
                             f"evenly over {size} processes; use a multiple of {size} so the "
                             f"averaged gradient is the global batch's")
        k = n // size
        return batch[rank * k:(rank + 1) * k]
    return batch
