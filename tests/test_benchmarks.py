"""Smoke tests of the benchmark code (never timed: timing lives in benchmarks/)."""
import numpy as np
import pytest

from benchmarks import op_overhead
from benchmarks.engine_model import build as build_engine
from benchmarks.spec import CONFIGS, canonical_batch, canonical_params, matmul_shapes, step_flops


def test_spec_tables_match_the_shared_spec():
    for cfg in CONFIGS.values():
        assert sum(v.size for v in canonical_params(cfg).values()) == cfg.params
        assert step_flops(cfg) == cfg.step_flops
    assert len(matmul_shapes(CONFIGS["small"])) == 3 * (6 + 2 + 6 + 6 + 2 + 1)


def test_one_engine_step_matches_torch_and_the_jit():
    cfg = CONFIGS["small"]
    params, batch = canonical_params(cfg), canonical_batch(cfg)
    eager, _ = build_engine(cfg, params, batch)
    jitted, _ = build_engine(cfg, params, batch, jit=True)
    l_eager = [eager() for _ in range(2)]
    l_jit = [jitted() for _ in range(2)]
    assert l_jit == pytest.approx(l_eager, rel=1e-5)
    torch = pytest.importorskip("torch")
    from benchmarks.torch_model import build as build_torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step, _ = build_torch(cfg, params, batch)
        assert l_eager[0] == pytest.approx(step(), rel=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_runner_child_and_floor_report_their_fields():
    from benchmarks.run import child
    r = child("small", "floor", 1, "cpu")
    assert r["median_s"] > 0
    r = child("small", "eager", 2, "cpu")
    assert set(r) >= {"median_s", "loss1", "loss5", "peak_growth_mb"}
    assert np.isfinite(r["loss5"]) and r["loss5"] < r["loss1"]


def test_op_overhead_cases_run():
    for name, fns in op_overhead.cases():
        for fn in fns.values():
            fn()


def test_repeated_rounds_are_summarized_per_implementation():
    from benchmarks.run import markdown, summarize
    rows = [dict(config="small", impl=impl, threads=1, round=r, ms=ms, gflops=1.0, x_torch=x, x_floor=None,
                 peak_growth_mb=1.0, loss1=1.0, loss5=0.5)
            for r, (eager, torch) in enumerate([(3.0, 2.0), (9.0, 3.0), (4.0, 2.0)])
            for impl, ms, x in (("eager", eager, eager / torch), ("torch", torch, 1.0))]
    summary = summarize(rows)
    assert [(s["impl"], s["rounds"]) for s in summary] == [("eager", 3), ("torch", 3)]
    eager = summary[0]
    assert eager["ms"] == 4.0                       # the median, not the mean (5.33)
    assert eager["x_torch"] == 2.0 and eager["x_torch_range"] == (1.5, 3.0)
    table = markdown(summary)
    assert "| 1 | small | engine eager | 4.00 |" in table and "2.00 (1.50–3.00)" in table
    assert "| 1.00 |" in table                      # the reference row: no range


def test_paired_comparison_runs_both_trees_in_turn():
    """The tree against itself: both workers build the step, answer every round, and the
    ratio is a median of per-round ratios (no timing is asserted)."""
    from pathlib import Path
    from benchmarks.paired import compare
    here = Path(__file__).resolve().parent.parent
    r = compare(here, here, "small", "jit", steps=1, rounds=3)
    assert r["other_ms"] > 0 and r["here_ms"] > 0
    assert r["q1"] <= r["ratio"] <= r["q3"]
