#!/usr/bin/env bash
# One prepared command for a machine with an NVIDIA GPU and no network, where CuPy,
# NumPy, sympy, pytest and PyTorch are already installed:
#
#     bash scripts/gpu_check.sh RESULTS_DIR
#
# It installs the project without touching the network (or falls back to
# PYTHONPATH), records the machine, runs the CUDA tests (CUDA graphs included), trains
# the translate example and a few hundred steps of examples/lm.py (jit, tokens/s) on
# the GPU, then runs the GPU benchmark: engine eager and jit (as a CUDA graph) against
# PyTorch CUDA eager and torch.compile, with GPU pool memory, and the per-op latency.
# Everything lands in RESULTS_DIR: summary.md (everything a report needs: test counts,
# whether the jit ran as a graph, the table, tokens/s), env.txt, one log per step and
# the benchmark's JSON (8 files at most: what a device lease brings back).
# The exit status is non-zero when a step failed.
#
# The tests and the two examples share the GPU in the first phase (timings do not
# matter there, except lm's tokens/s, which is indicative only); the benchmark then
# runs alone. With the defaults the whole check ends within about 8 minutes even when
# a step hangs.
#
# Optional environment:
#   PYTHON          interpreter to use (default: python, else python3)
#   TEST_TIMEOUT    seconds for the test step (default 200)
#   TEST_WORKERS    pytest-xdist workers when xdist is installed (default 8)
#   TRANSLATE_ARGS  extra arguments for examples/translate.py (default: none)
#   LM_ARGS         arguments for examples/lm.py (default: --jit --steps 300 --eval-every 1000)
#   BENCH_ARGS      extra arguments for `python -m benchmarks.run` (default: --steps 20)
#   STEP_TIMEOUT    seconds for the translate and lm steps (default 150 each)
#   BENCH_TIMEOUT   seconds for the benchmark (default 240; torch.compile compiles 3 configs)
set -u -o pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 RESULTS_DIR" >&2
    exit 2
fi
OUT="$1"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="${PYTHON:-$(command -v python || command -v python3)}"
TEST_TIMEOUT="${TEST_TIMEOUT:-180}"
STEP_TIMEOUT="${STEP_TIMEOUT:-150}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-240}"
export PYTHONUNBUFFERED=1
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-${TMPDIR:-/tmp}/engine-cupy-cache}"
STATUS=0
SUMMARY="$OUT/summary.md"

note() { echo "$*" | tee -a "$SUMMARY"; }

# -- setup ------------------------------------------------------------------------------------
install_project() {
    if "$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
        note "- install: pip install --no-deps --no-build-isolation -e . (ok)"
    else
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
        note "- install: pip failed (see install.log); using PYTHONPATH=$ROOT"
    fi
}

record_environment() {
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
        echo "host: $(hostname)"
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
        "$PY" - <<'PYEOF' 2>&1
import platform
print("python", platform.python_version())
for name in ("numpy", "sympy", "cupy", "torch", "pytest"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(name, "missing:", type(e).__name__, e)
try:
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    print("gpu", props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
          "cc", f'{props["major"]}.{props["minor"]}',
          "cuda runtime", cupy.cuda.runtime.runtimeGetVersion())
except Exception as e:
    print("cupy gpu query failed:", type(e).__name__, e)
PYEOF
    } >"$OUT/env.txt"
    GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
    note "- date: $(date -u +%Y-%m-%d), GPU: ${GPU_NAME:-unknown} (details in env.txt)"
}

smoke_test() {
    if timeout 120 "$PY" - >"$OUT/smoke.log" 2>&1 <<'PYEOF'
import numpy as np
import engine as eg
eg.manual_seed(0)
x = eg.randn(4, 5, device="cuda", requires_grad=True)
y = (eg.softmax(x @ x.T, axis=-1).tanh() * 2).sum()
y.backward()
assert x.device == "cuda" and x.grad.device == "cuda"
print("smoke ok:", float(y.item()), np.abs(x.grad.numpy()).sum())
PYEOF
    then note "- smoke test on cuda: ok"
    else note "- smoke test on cuda: FAILED (smoke.log)"; STATUS=1
    fi
}

# -- the CUDA tests ---------------------------------------------------------------------------------
run_cuda_tests() {
    local parallel=()
    if "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n "${TEST_WORKERS:-8}"); fi
    timeout "$TEST_TIMEOUT" "$PY" -m pytest tests/test_cuda.py tests/test_cuda_codegen.py tests/test_cuda_graphs.py \
        tests/test_cuda_attention.py \
        "${parallel[@]}" -o addopts="" -q -rA --durations=15 \
        >"$OUT/cuda_tests.log" 2>&1
    local rc=$?
    local line
    line="$(grep -E '[0-9]+ (passed|failed)' "$OUT/cuda_tests.log" | tail -1)"
    local gpu_skips
    gpu_skips="$(grep -c 'no CuPy with a usable GPU' "$OUT/cuda_tests.log" || true)"
    note "- CUDA tests (rc=$rc): ${line:-no summary line, see cuda_tests.log}"
    grep -E '^(FAILED|ERROR)' "$OUT/cuda_tests.log" | head -20 | sed 's/^/    /' | tee -a "$SUMMARY"
    note "  on the GPU itself: $(grep -cE '^PASSED .*\[gpu' "$OUT/cuda_tests.log" || true) tests passed, of them CUDA graphs: $(grep -cE '^PASSED tests/test_cuda_graphs.py::.*\[gpu' "$OUT/cuda_tests.log" || true)"
    if [ "$gpu_skips" != "0" ]; then
        note "  WARNING: GPU tests were skipped here ($gpu_skips skip lines): CuPy/GPU not usable"
        STATUS=1
    fi
    [ $rc -eq 0 ] || STATUS=1
}

# -- train the translate example on GPU (another developer writes examples/translate.py) -------------
train_translate_on_gpu() {
    if [ ! -f examples/translate.py ]; then
        note "- translate example: skipped (examples/translate.py does not exist yet)"
        return
    fi
    # shellcheck disable=SC2086
    if timeout "$STEP_TIMEOUT" "$PY" examples/translate.py --device cuda ${TRANSLATE_ARGS:-} \
        >"$OUT/translate.log" 2>&1; then
        note "- translate example on cuda: ok; last lines:"
        tail -5 "$OUT/translate.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    else
        note "- translate example on cuda: FAILED or timed out (translate.log)"; return 1
    fi
}

# -- a few hundred steps of the language model on the GPU (jit: one CUDA graph per step) ---------------
train_lm_on_gpu() {
    local rc=0
    # shellcheck disable=SC2086
    if timeout "$STEP_TIMEOUT" "$PY" examples/lm.py --device cuda ${LM_ARGS:---jit --steps 300 --eval-every 1000} \
        --out-dir "${TMPDIR:-/tmp}/engine-gpu-check-lm" >"$OUT/lm.log" 2>&1; then
        note "- lm example on cuda (jit): ok; last progress line and result:"
    else
        note "- lm example on cuda (jit): FAILED or timed out (lm.log); last lines:"; rc=1
    fi
    if [ $rc -eq 0 ]; then
        { grep 'tok/s' "$OUT/lm.log" | tail -1; grep -E '^(ours|total time)' "$OUT/lm.log"; }
    else
        tail -4 "$OUT/lm.log"
    fi | sed 's/^/    /' | tee -a "$SUMMARY"
    return $rc
}

# -- the GPU benchmark: engine on CuPy vs PyTorch CUDA eager (another developer writes benchmarks/run.py) --
run_gpu_benchmark() {
    if [ ! -f benchmarks/run.py ]; then
        note "- GPU benchmark: skipped (benchmarks/run.py does not exist yet)"
        return
    fi
    # shellcheck disable=SC2086
    if timeout "$BENCH_TIMEOUT" "$PY" -m benchmarks.run --device cuda ${BENCH_ARGS:---steps 20} \
        --threads 1 --markdown --json "$OUT/results_gpu.json" \
        >"$OUT/benchmark.log" 2>&1; then
        note "- GPU benchmark (engine eager/jit vs PyTorch eager/torch.compile): ok; rows and table:"
        grep -E 'CUDA graph|failed' "$OUT/benchmark.log" | sed 's/^/    /' | tee -a "$SUMMARY"
        if grep -q ' failed:' "$OUT/benchmark.log"; then
            note "  some benchmark rows FAILED (their errors are in benchmark.log)"; STATUS=1
        fi
        tail -25 "$OUT/benchmark.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    else
        note "- GPU benchmark: FAILED or timed out (benchmark.log)"; STATUS=1
    fi
    # per-op latency on the device: engine vs raw CuPy vs PyTorch CUDA (into the same log)
    if timeout 60 "$PY" -m benchmarks.op_overhead --device cuda --repeat 100 \
        >>"$OUT/benchmark.log" 2>&1; then
        note "- GPU op overhead: ok; last lines:"
        tail -5 "$OUT/benchmark.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    else
        note "- GPU op overhead: FAILED or timed out (benchmark.log)"; STATUS=1
    fi
}

: >"$SUMMARY"
note "# GPU check"
install_project
record_environment
smoke_test
# The summary lines of the two parallel steps are written when both are done.
( rc=0; train_translate_on_gpu || rc=1; train_lm_on_gpu || rc=1; exit $rc ) >"$OUT/.translate_summary" 2>&1 &
TRANSLATE_PID=$!
run_cuda_tests
wait $TRANSLATE_PID || STATUS=1
cat "$OUT/.translate_summary" && rm -f "$OUT/.translate_summary"
run_gpu_benchmark
note "- overall: $([ $STATUS -eq 0 ] && echo PASS || echo FAIL)"
exit $STATUS
