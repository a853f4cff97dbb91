"""Mutation testing for the engine: break each correctness feature on purpose and
check that the tests covering it fail.

A mutation is an exact text replacement in one file (the old text must occur exactly
once, so the list fails loudly when the code it quotes has moved) and the narrowest
test selection that should catch it. Each mutant runs in a fresh temporary copy of
the tree (the working tree is never written), with

    python -m pytest -x -q -p no:cacheprovider <selection>

under a timeout, and is recorded as caught (with the first failing test), survived
or timed out. A survivor means the tests do not pin that behaviour down.

    python scripts/mutate.py                  # every mutation, a Markdown table on stdout
    python scripts/mutate.py -j 2 --write docs/mutations.md
    python scripts/mutate.py --only softmax-vjp-sign --only relu-kink
    python scripts/mutate.py --list           # names and what each breaks
    python scripts/mutate.py --check          # only check that every old text matches once
    python scripts/mutate.py --baseline       # run the selections on the unbroken tree

The exit status is 0 only when every mutation run was caught.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = ("-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE")
# Not copied into a mutant's tree: version control, caches, run outputs.
_SKIP = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks",
                               "*.egg-info", "build", "dist", "runs", ".venv", "*.npz")


@dataclass(frozen=True)
class Mutation:
    """Replace `old` (which must occur exactly once in `path`) by `new`; `tests` is
    the pytest selection (shell words) that must then fail."""
    name: str
    path: str
    old: str
    new: str
    breaks: str
    tests: str


M = Mutation
MUTATIONS: tuple[Mutation, ...] = (
    # -- VJPs of elementwise ops: their declared (or sympy-derived) derivatives ----------------
    M("mul-vjp-sign", "ops/elementwise.py",
      'mul = elementwise("mul", lambda a, b: a * b, numpy=np.multiply)',
      'mul = elementwise("mul", lambda a, b: a * b, grads=lambda a, b, out: (b, -a), numpy=np.multiply)',
      "d(a*b)/db = a", "tests/test_symbolic.py -k 'spec_grads_equal_sympy_diff and mul'"),
    M("div-vjp-sign", "ops/elementwise.py",
      "grads=lambda a, b, out: (1 / b, -out / b)", "grads=lambda a, b, out: (1 / b, out / b)",
      "d(a/b)/db = -a/b^2", "tests/test_symbolic.py -k 'spec_grads_equal_sympy_diff and div'"),
    M("exp-vjp-sign", "ops/elementwise.py",
      "grads=lambda x, out: (out,), float_result=True, numpy=np.exp",
      "grads=lambda x, out: (-out,), float_result=True, numpy=np.exp",
      "d exp(x)/dx = exp(x)", "tests/test_symbolic.py -k 'spec_grads_equal_sympy_diff and exp'"),
    M("log-vjp-sign", "ops/elementwise.py",
      'lambda x: sympy.log(x), float_result=True,',
      'lambda x: sympy.log(x), grads=lambda x, out: (-1 / x,), float_result=True,',
      "d log(x)/dx = 1/x", "tests/test_symbolic.py -k 'spec_grads_equal_sympy_diff and log'"),
    M("tanh-vjp-sign", "ops/elementwise.py",
      "grads=lambda x, out: (1 - out ** 2,)", "grads=lambda x, out: (1 + out ** 2,)",
      "d tanh/dx = 1 - tanh^2", "tests/test_symbolic.py -k 'spec_grads_equal_sympy_diff and tanh'"),
    M("sigmoid-vjp-sign", "ops/elementwise.py",
      "grads=lambda x, out: (out * (1 - out),)", "grads=lambda x, out: (out * (1 + out),)",
      "d sigmoid/dx = s(1 - s)",
      "tests/test_symbolic.py -k 'spec_grads_equal_sympy_diff and sigmoid'"),
    M("relu-kink", "ops/elementwise.py",
      "grads=lambda x, out: (sympy.Heaviside(out, 0),)", "grads=lambda x, out: (sympy.Heaviside(out, 1),)",
      "relu'(0) = 0", "tests/test_symbolic_kinks.py"),
    M("maximum-ties", "ops/elementwise.py",
      "grads=lambda a, b, out: (sympy.Heaviside(a - b, sympy.S.Half),",
      "grads=lambda a, b, out: (sympy.Heaviside(a - b, 1),",
      "maximum's ties share the gradient", "tests/test_symbolic_kinks.py"),
    # -- reductions, broadcasting, matmul ----------------------------------------------------
    M("fused-constants-folded", "engine/compiler/passes.py",
      "if isinstance(a, tuple) else Constant(int(a) if type(a) is bool else a)",
      "if isinstance(a, tuple) else sympy.sympify(int(a) if type(a) is bool else a, strict=True)",
      "a fused kernel's scalar constants stay opaque to sympy (0*inf stays NaN)",
      "tests/test_jit_constants.py"),
    M("fused-operands-transparent", "backends/cprint.py",
      "        return e if e.is_number else None",
      "        return e",
      "a fused kernel computes each step as eager does (no (x + 1) - x -> 1 across steps)",
      "tests/test_jit_constants.py"),
    M("rsqrt-as-power", "ops/numpy_impls.py",
      "return np.divide(1, np.sqrt(x), out=out)",
      "return np.power(x, -0.5, out=out)",
      "eager rsqrt is 1/sqrt(x) as the printed kernels (NaN at -inf, -inf at -0)",
      "tests/test_jit_constants.py -k special"),
    M("fold-python-arithmetic", "ops/sympy_ops.py",
      "        return _fold(name, args)",
      "        return _PY[name](*args)",
      "a VJP folded in Python numbers gives IEEE values (1 / 0.0 = inf), never a Python error",
      "tests/test_core_autograd.py -k ieee"),
    M("c-reciprocal-unparenthesized", "backends/cprint.py",
      "return f\"({one}/{self.parenthesize(sympy.Pow(b, -n), PRECEDENCE['Mul'], strict=True)})\"",
      "return f\"({one}/{self._print(sympy.Pow(b, -n))})\"",
      "the C printer divides by the whole divisor (1/(x + y), not 1.0/x + y)",
      "tests/test_cuda_codegen.py -k reciprocals"),
    M("rows-kernel-accepts-strided-rows", "backends/host_kernels.py",
      "if a.dtype != dtype or a.shape != shape or not a.flags.c_contiguous:",
      "if a.dtype != dtype or a.shape != shape:",
      "a row kernel declines rows that are not C-contiguous (a transposed input)",
      "tests/test_host_kernels.py tests/test_row_losses.py"),
    M("rows-kernel-index-width", "backends/host_kernels.py",
      "            want = np.dtype(np.int64)\n",
      "            want = a.dtype\n",
      "a row kernel reads class indices as int64 (int32 targets converted)",
      "tests/test_host_kernels.py tests/test_row_losses.py"),
    M("autograd-keeps-last-contribution", "engine/autograd.py",
      "pending[xk] = gx if prev is None else prev + gx",
      "pending[xk] = gx",
      "autograd sums the cotangents of a tensor read by several ops (the chain rule's sum)",
      "tests/test_nn_proofs.py -k 'chain_rule or lost_contribution'"),
    M("softplus-grad-cancels", "ops/elementwise.py",
      "grads=lambda x, out: (1 / (1 + sympy.exp(-x)),),",
      "grads=lambda x, out: (1 - sympy.exp(-out),),",
      "softplus's gradient keeps its relative precision in float32 (sigmoid, not 1 - exp(-out))",
      "tests/test_oracles.py -k softplus"),
    M("softplus-forward-log", "ops/elementwise.py",
      "impl=lambda x: sympy.Max(x, 0) + log1p(sympy.exp(-sympy.Abs(x))),",
      "impl=lambda x: sympy.Max(x, 0) + sympy.log(1 + sympy.exp(-sympy.Abs(x))),",
      "softplus keeps its relative precision far below zero (log1p: softplus(-20) = 2.06e-9, not 0 in float32)",
      "tests/test_oracles.py -k softplus"),
    M("pow-grad-nan-at-zero-base", "ops/elementwise.py",
      "sympy.Piecewise((0, sympy.Eq(a, 0) & (b >= 0)),",
      "sympy.Piecewise(",       # leaves the textbook out * log(a): 0 * -inf = NaN at a = 0
      "d(a**b)/db is 0 where a = 0 <= b, as PyTorch's (not out * log(a) = 0 * -inf = NaN)",
      "tests/test_oracles.py -k pow"),
    M("sum-vjp-keepdims", "ops/reduce.py",
      "    return reshape(g, shape=reduced_shape(x_shape, axis, True))",
      "    return g",
      "sum's VJP restores the reduced axes before broadcasting",
      "tests/test_symbolic.py -k 'primitive_vjp_equals_sympy_diff and sum'"),
    M("max-vjp-ties", "ops/extrema.py",
      "mul(keepdims_form(g, x.shape, axis, keepdims), div(hit, count))",
      "mul(keepdims_form(g, x.shape, axis, keepdims), hit)",
      "max's ties share the gradient evenly", "tests/test_symbolic_kinks.py"),
    M("sum-to-leading-axes", "ops/reduce.py",
      "    axes = tuple(range(lead)) + tuple(i + lead", "    axes = tuple(i + lead",
      "broadcasting undone over added leading axes (sum_to, broadcast_to's VJP)",
      "tests/test_symbolic.py -k 'primitive_vjp_equals_sympy_diff and broadcast_to'"),
    M("matmul-vjp-transpose", "ops/linalg.py",
      "ga = reshape(sum_to(matmul(g2, _swap_last(b2)), tuple(a2.shape))",
      "ga = reshape(sum_to(matmul(g2, b2), tuple(a2.shape))",
      "dA = g @ B^T", "tests/test_symbolic.py -k 'primitive_vjp_equals_sympy_diff and matmul'"),
    M("matmul-weight-grad-fold", "ops/linalg.py",
      "gb = matmul(_swap_last(reshape(a, shape=(_rows(a), k))),",
      "gb = matmul(reshape(_swap_last(a), shape=(k, _rows(a))),",
      "dW of batched x @ W folds the batch into rows",
      "tests/test_symbolic.py -k 'primitive_vjp_equals_sympy_diff and matmul'"),
    M("where-vjp-branches", "ops/elementwise.py",
      "gb = sum_to(where(c, 0.0, g), tuple(b.shape))", "gb = sum_to(where(c, g, 0.0), tuple(b.shape))",
      "where's gradient goes to the branch that was picked",
      "tests/test_symbolic.py -k 'primitive_vjp_equals_sympy_diff and where'"),
    M("concatenate-vjp-offset", "ops/movement.py",
      "        start = stop\n", "        start = start\n",
      "each input of a concatenation gets its own slice of the gradient",
      "tests/test_symbolic.py -k 'primitive_vjp_equals_sympy_diff and concatenate'"),
    # -- row programs (forward declarations and VJPs) ------------------------------------------
    M("rows-finite-or", "ops/rows.py",
      "return sympy.Piecewise((replacement, sympy.Eq(v, -sympy.oo)), (v, True))",
      "return sympy.Piecewise((replacement, sympy.Eq(v, sympy.oo)), (v, True))",
      "an all -inf row's max is taken as 0 (no inf - inf)",
      "tests/test_host_kernels.py tests/test_core_registry.py -k 'masked or printed'"),
    M("rows-evaluate-mean", "ops/rows.py",
      'env[st.name] = total if st.how == "sum" else _MEAN.forward(be, total, n)',
      "env[st.name] = total",
      "the step-by-step program (NumPy fallback, symbolic proofs) divides a mean by n",
      "tests/test_host_kernels.py -k printed_row_kernels"),
    M("softmax-empty-row-sum", "ops/fused.py",
      "Step(_s, \"map\", nonzero_or(_s0, 1)))", "Step(_s, \"map\", nonzero_or(_s0, 0)))",
      "softmax of an all -inf row is 0, not 0/0", "tests/test_host_kernels.py"),
    M("log-softmax-program-sign", "ops/fused.py",
      "(_x - _m) - sympy.log(_s)", "(_x - _m) + sympy.log(_s)",
      "log_softmax = x - max - log(sum)", "tests/test_host_kernels.py"),
    M("layer-norm-variance", "ops/fused.py",
      'Step(_var, "mean", (_x - _mu) ** 2)', 'Step(_var, "sum", (_x - _mu) ** 2)',
      "layer_norm's biased variance is a mean", "tests/test_host_kernels.py"),
    M("layer-norm-eps", "ops/fused.py",
      "Step(_rstd, \"map\", 1 / sympy.sqrt(_var + _eps))", "Step(_rstd, \"map\", 1 / sympy.sqrt(_var))",
      "layer_norm adds eps inside the root", "tests/test_core_registry.py -k layer_norm"),
    M("softmax-vjp-sign", "ops/fused.py",
      "return (mul(out, sub(g, sum_op(mul(g, out), axis=(axis,), keepdims=True))),)",
      "return (mul(out, add(g, sum_op(mul(g, out), axis=(axis,), keepdims=True))),)",
      "softmax VJP p * (g - sum(g p))",
      "tests/test_symbolic.py -k 'primitive_vjp_equals_sympy_diff and softmax'"),
    M("log-softmax-vjp-sign", "ops/fused.py",
      "return (sub(g, mul(exp(out), sum_op(g, axis=(axis,), keepdims=True))),)",
      "return (add(g, mul(exp(out), sum_op(g, axis=(axis,), keepdims=True))),)",
      "log_softmax VJP g - p sum(g)",
      "tests/test_symbolic.py -k 'primitive_vjp_equals_sympy_diff and log_softmax'"),
    M("layer-norm-vjp-mean", "ops/fused.py",
      "gx = mul(rstd, sub(sub(gxh, m1), mul(xhat, m2)))", "gx = mul(rstd, sub(gxh, mul(xhat, m2)))",
      "layer_norm dx subtracts mean(dxh)",
      "tests/test_symbolic.py -k 'primitive_vjp_equals_sympy_diff and layer_norm'"),
    # -- attention and losses -----------------------------------------------------------------
    M("attention-mask-convention", "ops/composite.py",
      "scores = where(mask, scores, NEG_INF)", "scores = where(mask, NEG_INF, scores)",
      "bool mask True = may attend (ops.attention)", "tests/test_oracles.py -k attention"),
    M("mha-mask-conversion", "nn/attention.py",
      "mask = ~mask                         # torch's", "mask = mask                         # torch's",
      "MultiheadAttention's True = blocked, converted at its API", "tests/test_oracles.py -k mask"),
    M("cross-entropy-ignore-mask", "ops/losses.py",
      "return sympy.Piecewise((0, sympy.Eq(_t, _ign)), (loss, sympy.Eq(_s, 0)), (smoothed, True))",
      "return sympy.Piecewise((loss, sympy.Eq(_s, 0)), (smoothed, True))",
      "an ignored row never reaches the loss", "tests/test_row_losses.py"),
    M("nll-ignored-count", "ops/composite.py",
      "return div(total, maximum(count, 1.0))", "return div(total, maximum(count, 0.0))",
      "a batch with every row ignored gives 0, not 0/0",
      "tests/test_nn_loss.py -k all_ignored"),
    M("nll-smoothing-minus-inf", "ops/losses.py",
      "_FINITE_X = sympy.Piecewise((0, sympy.Eq(_x, -sympy.oo)), (_x, True))", "_FINITE_X = _x",
      "a -inf class is left out of label smoothing (finite loss)",
      "tests/test_row_losses.py"),
    M("causal-mask-diagonal", "nn/functional.py",
      "return cols > rows + (tk - tq)", "return cols >= rows + (tk - tq)",
      "a causal query sees its own position", "tests/test_nn_attention.py -k causal"),
    M("causal-mask-cache-offset", "nn/functional.py",
      "return cols > rows + (tk - tq)", "return cols > rows",
      "with a KV cache the queries are the last positions",
      "tests/test_generation.py -k 'cached_generation or cached_logits'"),
    M("embedding-padding-grad", "nn/layers.py",
      "out = eg.where(keep, out, eg.stop_gradient(out))", "out = eg.where(keep, out, out)",
      "the padding row of an embedding gets no gradient", "tests/test_nn_layers.py -k padding"),
    M("dropout-rescale", "ops/composite.py",
      "return mul(x, mul(keep, 1.0 / (1.0 - p)))", "return mul(x, keep)",
      "dropout scales the kept values by 1/(1-p)", "tests/test_nn_layers.py -k dropout"),
    M("amp-backoff", "nn/amp.py",
      "self.scale_value *= self.backoff_factor", "self.scale_value *= self.growth_factor",
      "the loss scale backs off after an overflow", "tests/test_amp.py -k backs_off"),
    # -- printed kernels ----------------------------------------------------------------------
    M("cprint-c-loop-bound", "backends/cprint.py",
      'return f"void {name}({c_args}) {{\\n  for (long long i = 0; i < n; ++i) {{',
      'return f"void {name}({c_args}) {{\\n  for (long long i = 0; i < n - 1; ++i) {{',
      "the flat C kernel covers every element",
      "tests/test_cuda_codegen.py -k generated_forward"),
    M("cprint-relu-kink", "backends/cprint.py",
      'return f"({a} > {z} ? {p} : ({a} <= {z} ? {z} : {a}))"',
      'return f"({a} >= {z} ? {p} : ({a} <= {z} ? {z} : {a}))"',
      "the printed Heaviside(x, 0) is 0 at 0 (relu'(0) in C and CUDA)",
      "tests/test_cuda_codegen.py -k 'kinks or derivatives'"),
    M("cprint-max-nan", "backends/cprint.py",
      'nan = f" || {acc} != {acc}" if self._floating and not acc_is_number else ""', 'nan = ""',
      "printed maximum/minimum propagate NaN like NumPy",
      "tests/test_cuda_codegen.py -k 'kinks or generated_forward'"),
    M("rowprint-sum-tail", "backends/rowprint.py",
      "  for (; j < n; ++j) tail += v[j];", "  for (; j < n - 1; ++j) tail += v[j];",
      "the C row sum adds the tail after its 32-wide blocks", "tests/test_host_kernels.py"),
    M("rowprint-sum-fold", "backends/rowprint.py",
      "  for (int w = 16; w > 0; w /= 2)\n    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];\n  {T} tail",
      "  for (int w = 16; w > 1; w /= 2)\n    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];\n  {T} tail",
      "the 32 partial sums are all folded", "tests/test_host_kernels.py"),
    M("rowprint-max-lanes", "backends/rowprint.py",
      "for (int l = 0; l < {LANES}; ++l) m = lanes[l] > m ? lanes[l] : m;",
      "for (int l = 1; l < {LANES}; ++l) m = lanes[l] > m ? lanes[l] : m;",
      "the AVX row max reads every lane", "tests/test_host_kernels.py -k row_max"),
    M("rowprint-exp-masked", "backends/rowprint.py",
      '"    if (masked)",', '"    if (0)",',
      "exp(-inf) is patched to exactly 0 in the fast exp path",
      "tests/test_host_kernels.py"),
    M("cuda-row-block-sum", "backends/rowprint.py",
      'f"{v} = engine_block_sum({v}, buf){per};"]', 'f"{v} = {v}{per};"]',
      "the CUDA row kernel reduces over the whole block",
      "tests/test_cuda_codegen.py -k printed_row_kernels"),
    M("cuda-block-sum-halving", "backends/cupy_backend.py",
      "if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];",
      "if (threadIdx.x < s - 1) buf[threadIdx.x] += buf[threadIdx.x + s];",
      "the CUDA block sum's tree adds every slot",
      "tests/test_cuda_codegen.py -k printed_row_kernels"),
    # -- the fused attention kernel (backends/attnprint.py) and its offer -------------------------
    M("attention-softmax-grad-sign", "ops/fused.py",
      'Step(_out, "map", _p * (_dp - _s0))', 'Step(_out, "map", _p * (_dp + _s0))',
      "the softmax gradient row program is p * (dp - sum(dp * p))",
      "tests/test_cuda_attention.py -k 'softmax_grad_program or (fused_equals and emulated)'"),
    M("attention-mask-inverted", "backends/attnprint.py",
      'f"      a = mask[r * S + j] ? a : engine_neg_inf_{acc}();"',
      'f"      a = mask[r * S + j] ? engine_neg_inf_{acc}() : a;"',
      "a bool mask's True means may attend",
      "tests/test_cuda_attention.py -k 'fused_equals and emulated and causal'"),
    M("attention-missing-scale", "backends/attnprint.py",
      '"      a = a * scale;"]', '"      a = a;"]',
      "the scores are scaled", "tests/test_cuda_attention.py -k 'fused_equals and emulated and none'"),
    M("attention-dropout-bits-offset", "backends/attnprint.py",
      "(unsigned long long)(r * S + j), ", "(unsigned long long)(r * S + j + 1), ",
      "the kernel's keep mask uses the counters of the composite's draw",
      "tests/test_cuda_attention.py -k 'dropout_draws and emulated'"),
    M("attention-dropout-backward-scale", "backends/attnprint.py",
      'f"        if (dropped) a = a * (w != ({acc})0 ? keep_scale : ({acc})0);",',
      'f"        if (dropped) a = a * (w != ({acc})0 ? ({acc})1 : ({acc})0);",',
      "the backward scales kept weights' gradients by 1 / (1 - p)",
      "tests/test_cuda_attention.py -k 'dropout_draws and emulated'"),
    M("attention-pv-loop-bound", "backends/attnprint.py",
      '"      for (long long j = 0; j < S; ++j) a += p_row[j] * v[bh * S * DV + j * DV + c];",',
      '"      for (long long j = 0; j < S - 1; ++j) a += p_row[j] * v[bh * S * DV + j * DV + c];",',
      "out = P @ V sums over every key", "tests/test_cuda_attention.py -k 'fused_equals and emulated and none'"),
    M("attention-masked-row-not-zeroed", "ops/fused.py",
      'Step(_s, "map", nonzero_or(_s0, 1)))', 'Step(_s, "map", _s0))',
      "a query with no allowed key gets weights 0 (the softmax program the kernel prints)",
      "tests/test_cuda_attention.py -k 'fused_equals and emulated and all_masked'"),
    M("attention-shared-row-unwritten", "backends/attnprint.py",
      '"    for (long long c = threadIdx.x; c < D; c += blockDim.x) q_row[c] = q[r * D + c];",',
      '"    for (long long c = threadIdx.x; c < D - 1; c += blockDim.x) q_row[c] = q[r * D + c];",',
      "the forward writes the whole query row to shared memory before reading it (the emulation's "
      "shared memory starts as NaN)", "tests/test_cuda_attention.py -k 'fused_equals and emulated and none'"),
    M("attention-offer-limit", "backends/cupy_backend.py",
      "if max(t, s) > ATTENTION_MAX_SEQ or", "if max(t, s) > ATTENTION_MAX_SEQ + 1 or",
      "beyond T, S = 256 the composite runs", "tests/test_cuda_attention.py -k 'beyond_the_limits and emulated'"),
    M("attention-second-order-silent", "ops/attention.py",
      "vjp=_no_second_order, saves=(),", "vjp=None, saves=(),",
      "second-order gradients through the fused backward raise GradError",
      "tests/test_cuda_attention.py -k 'second_order and emulated'"),
    M("cparallel-first-chunk", "backends/cparallel.py",
      "task(ctx, 0, parts > 1 ? items / parts : items);",
      "task(ctx, 0, parts > 1 ? items / parts - 1 : items);",
      "the caller's chunk of a parallel loop ends where the next worker starts",
      "tests/test_threads_kernels.py -k bit_identical"),
    M("colsum-block-combine", "engine/compiler/ckernels.py",
      'f"for (long long b = 0; b < {blocks}LL; ++b)",', 'f"for (long long b = 1; b < {blocks}LL; ++b)",',
      "a row group's column sums add every block's partial sum",
      "tests/test_threads_kernels.py -k column_sums"),
    M("cparallel-grain", "backends/cparallel.py",
      "if (parts > work / pool_grain) parts = work / pool_grain;", "if (0) parts = work / pool_grain;",
      "work under the grain per thread stays on the calling thread",
      "tests/test_threads_kernels.py -k below_the_threshold"),
    M("colsum-blocks-by-threads", "engine/compiler/ckernels.py",
      "block = max(1, CHUNK // n) if any(", "block = max(1, -(-rows // cparallel.threads())) if any(",
      "column sums are added in an order that never depends on the thread count",
      "tests/test_threads_kernels.py -k column_sums"),
    M("inplace-version-bump", "engine/tensor.py",
      "        interpreters.stack[-1].assign(self, name, value, index)\n        self._version[0] += 1",
      "        interpreters.stack[-1].assign(self, name, value, index)",
      "an in-place write bumps the version autograd and the jit check",
      "tests/test_core_autograd.py -k inplace"),
    M("grad-mode-per-thread", "engine/state.py",
      "class _GradMode(threading.local):", "class _GradMode:",
      "no_grad in one thread leaves the others recording", "tests/test_threads.py -k grad_mode"),
    M("jit-value-checks", "engine/compiler/jit.py",
      "        for i, j, check in entry.checks:\n            check(",
      "        for i, j, check in entry.checks[:0]:\n            check(",
      "value checks (index bounds) run at every compiled call",
      "tests/test_jit.py -k value_checks"),
    M("float16-sum-accumulates-in-float32", "backends/array_backend.py",
      "return x.sum(axis=axis, dtype=_F32, keepdims=keepdims).astype(_F16)",
      "return x.sum(axis=axis, keepdims=keepdims)",
      "float16 sums accumulate in float32", "tests/test_amp.py -k 'accumulate'"),
    # -- the checkers: proofs, gradcheck, autograd's version check --------------------------------
    M("proof-points-never-refute", "engine/symbolic/zero.py",
      "        if not zero:\n            return Proof(False", "        if False:\n            return Proof(False",
      "the zero decision refutes a nonzero difference at a rational point",
      "tests/test_symbolic.py -k 'decide_zero or wrong'"),
    M("gradcheck-tolerance", "engine/gradcheck.py",
      "err = np.abs(a - n) - (atol + rtol * np.abs(n))", "err = np.abs(a - n) - (atol + rtol * np.abs(n)) * 1e6",
      "gradcheck's tolerance is the one asked for", "tests/test_core_autograd.py -k gradcheck"),
    M("autograd-version-check", "engine/autograd.py",
      "if isinstance(x, _GRAPH_TYPES) and x._version[0] != versions[i]:",
      "if False and isinstance(x, _GRAPH_TYPES) and x._version[0] != versions[i]:",
      "backward refuses a saved value changed in place", "tests/test_core_autograd.py -k inplace"),
    M("jit-cse-random", "engine/compiler/passes.py",
      '        if getattr(n.op, "random", False):\n            nodes.append(n)',
      '        if False:\n            nodes.append(n)',
      "two random draws are never merged into one", "tests/test_jit.py -k cse"),
    M("adamw-decoupled", "nn/optim/adam.py",
      "            if self._decoupled:", "            if not self._decoupled:",
      "AdamW decays the weights, Adam adds wd * p to the gradient",
      "tests/test_nn_optim.py -k 'adam and not capturable'"),
    M("memplan-escaping", "engine/compiler/codegen.py",
      "if n.out not in capable or n.out in escaping or n.out not in last_use:",
      "if n.out not in capable or n.out not in last_use:",
      "a returned value never lives in a reused buffer", "tests/test_jit.py -k own_buffer"),
    M("memplan-inplace-alias", "engine/compiler/codegen.py",
      "                and all(b is a or root.get(b, b) is not a for b in values)):",
      "                ):",
      "an op is computed in place only when no other input is a view of the donor",
      "tests/test_jit.py -k 'memory_plan or alias'"),
    M("bands-contains", "engine/compiler/bands.py",
      "return outer[0] == inner[0] and inner[1] >= outer[1]",
      "return outer[0] == inner[0] and inner[1] >= outer[1] - 1",
      "a band is known zero only where the mask's triangle covers it", "tests/test_jit_bands.py"),
    M("bands-plan-bound", "engine/compiler/bands.py",
      'k0, k1 = (0, min(k, s1 + off)) if side == "U"', 'k0, k1 = (0, min(k, s1 + off - 1)) if side == "U"',
      "a banded matmul block reads every inner index that is not known zero",
      "tests/test_jit_bands.py"),
    M("donation-liveness", "engine/compiler/codegen.py",
      "and last_use.get(src, -1) <= position[out] and src not in donated.values()):",
      "and src not in donated.values()):",
      "a captured tensor's buffer is written in place only after its last read",
      "tests/test_jit.py -k old_value_is_read"),
    M("colsum-scratch-index", "engine/compiler/ckernels.py",
      "scratch[(b * {len(colsums)}LL + {q}LL) * {n}LL + j]", "scratch[(b * {len(colsums)}LL) * {n}LL + j]",
      "each column sum of a row group reads its own partial sums",
      "tests/test_threads_kernels.py -k column_sums"),
    # -- jit guards and cache --------------------------------------------------------------------
    M("guard-identity", "engine/compiler/guards.py",
      'w.fail_if(f"{name} is not {w.const(obj)}")', 'w.fail_if(f"False and {name} is not {w.const(obj)}")',
      "objects on a path to a captured tensor are the traced ones",
      "tests/test_jit_staleness.py -k named"),
    M("guard-length", "engine/compiler/guards.py",
      'self.fail_if(f"len({d}) != {len(items)}")', 'self.fail_if(f"False and len({d}) != {len(items)}")',
      "containers on a path keep their length", "tests/test_jit_staleness.py -k named"),
    M("guard-value-entries", "engine/compiler/guards.py",
      'self.fail_if(f"type({expr}) is not {type(value).__name__} or {expr} != {value!r}")',
      'self.fail_if(f"False and (type({expr}) is not {type(value).__name__} or {expr} != {value!r})")',
      "ints and strings read while tracing (a closure's power) keep their value",
      "tests/test_jit_staleness.py -k named"),
    M("guard-flag-entries", "engine/compiler/guards.py",
      'self.fail_if(f"{expr} is not {value!r}")', 'self.fail_if(f"False and {expr} is not {value!r}")',
      "bools and None next to captured state (module.training set directly) keep their value",
      "tests/test_jit_staleness.py -k named"),
    M("guard-shape-dtype", "engine/compiler/guards.py",
      'w.fail_if(f"{v}._data is not D[{i}] and ({v}.shape, {v}.dtype, {v}.device) != "',
      'w.fail_if(f"False and {v}._data is not D[{i}] and ({v}.shape, {v}.dtype, {v}.device) != "',
      "captured tensors keep shape, dtype and device", "tests/test_jit.py -k reshaped_captures"),
    M("guard-requires-grad", "engine/compiler/guards.py",
      'w.fail_if(f"{v}.requires_grad is not {meta[3]!r}")',
      'w.fail_if(f"False and {v}.requires_grad is not {meta[3]!r}")',
      "captured tensors keep requires_grad", "tests/test_jit_staleness.py -k named"),
    M("guard-grad-none", "engine/compiler/guards.py",
      'w.fail_if(f"({w.const(t)}.grad is None) is not {was_none!r}")',
      'w.fail_if(f"False and ({w.const(t)}.grad is None) is not {was_none!r}")',
      "the None-ness of .grad the trace started from",
      "tests/test_jit.py -k accumulates_into_existing_grad"),
    M("guard-version", "engine/compiler/guards.py",
      'w.fail_if(f"{w.const(t)}._version[0] != {version}")',
      'w.fail_if(f"False and {w.const(t)}._version[0] != {version}")',
      "values read on the host while tracing keep their version",
      "tests/test_jit.py -k read_on_the_host"),
    M("jit-key-grad-mode", "engine/compiler/jit.py",
      "key = (sig, structure, grad_mode.enabled, autocast_state.dtype)",
      "key = (sig, structure, autocast_state.dtype)",
      "a program traced with grad on is not reused under no_grad",
      "tests/test_jit_staleness.py -k named"),
    M("jit-buffer-pool-pop", "engine/compiler/codegen.py",
      "buffers = pool.pop() if pool else self._carve()", "buffers = pool[-1] if pool else self._carve()",
      "each running call has buffers of its own",
      "tests/test_threads.py -k concurrent_calls_of_a_compiled"),
    M("jit-buffer-pool-release", "engine/compiler/codegen.py",
      "        self._pool.clear()", "        pass",
      "a program left behind gives its buffers back", "tests/test_jit.py -k keeps_its_buffers"),
    # -- security -----------------------------------------------------------------------------
    M("cache-owner-check", "backends/kernel_cache.py",
      "if st.st_uid != os.getuid():", "if False and st.st_uid != os.getuid():",
      "libraries another user owns are never loaded",
      "tests/test_security.py -k another_user"),
    M("cache-mode-check", "backends/kernel_cache.py",
      "if st.st_mode & _FOREIGN_WRITE:", "if False and st.st_mode & _FOREIGN_WRITE:",
      "libraries others can write are never loaded", "tests/test_security.py -k others_can_write"),
    M("cache-nofollow", "backends/kernel_cache.py",
      "_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK", "_OPEN_FILE = os.O_RDONLY | os.O_NONBLOCK",
      "a symbolic link in the cache is never followed", "tests/test_security.py -k symbolic_links"),
    M("codegen-literal-plain", "engine/compiler/codegen.py",
      "return kind is int or kind is bool or value is None or (kind is float and math.isfinite(value))",
      "return isinstance(value, (int, float)) or value is None",
      "only builtin numbers' repr becomes code", "tests/test_security.py -k repr_is_code"),
    # -- random streams -----------------------------------------------------------------------
    M("rng-claim-overlap", "backends/base.py",
      "self.rng_counter = start + n", "self.rng_counter = start + n - 1",
      "each draw takes fresh counters", "tests/test_rng.py"),
    M("rng-claim-lock", "backends/base.py",
      "with _COUNTER_LOCK:", "with threading.Lock():",
      "two threads never claim the same counters", "tests/test_rng.py -k claiming"),
    M("rng-fold-tag", "ops/random.py",
      "_FOLD_TAG = 1 ", "_FOLD_TAG = 0 ",
      "fold_in's counter is one no element draw uses", "tests/test_rng.py -k fold_in"),
    M("nn-load-rng", "nn/checkpoint.py",
      "    if rng:\n        _restore_rng(header)", "    if False:\n        _restore_rng(header)",
      "nn.load restores the random streams", "tests/test_rng.py -k nn_load"),
    M("kv-cache-padding-order", "nn/attention.py",
      "self.key_padding_mask = eg.concatenate([old, cur], axis=1)",
      "self.key_padding_mask = eg.concatenate([cur, old], axis=1)",
      "a KV cache keeps each key's padding flag next to that key",
      "tests/test_generation.py -k 'cache or cached'"),
    M("kv-cache-reorder-mask", "nn/attention.py",
      "            self.key_padding_mask = self.key_padding_mask[idx]", "            pass",
      "beam search's reorder moves the padding flags with their rows",
      "tests/test_generation.py -k 'beam or cache'"),
    # -- optimisers, schedules, clipping, data parallel -------------------------------------------
    M("adam-bias-correction", "nn/optim/adam.py",
      "return _as_dtype(lr / (1.0 - b1 ** t), p.dtype), math.sqrt(1.0 - b2 ** t)",
      "return _as_dtype(lr, p.dtype), math.sqrt(1.0 - b2 ** t)",
      "Adam's first-moment bias correction", "tests/test_nn_optim.py -k 'adam and not capturable'"),
    M("adam-capturable-bias-correction", "nn/optim/adam.py",
      "step_size = (_as_dtype(lr, eg.float64) / (1.0 - b1 ** step)).to(dtype=dtype)",
      "step_size = _as_dtype(lr, eg.float64).to(dtype=dtype)",
      "capturable Adam's bias correction (tensor step)", "tests/test_nn_optim.py -k capturable"),
    M("noam-warmup", "nn/optim/lr_scheduler.py",
      "min(s ** -0.5, s * warmup_steps ** -1.5)", "max(s ** -0.5, s * warmup_steps ** -1.5)",
      "noam's warmup then inverse square root", "tests/test_nn_optim.py -k noam"),
    M("scheduler-tensor-lr-in-place", "nn/optim/lr_scheduler.py",
      'g["lr"][...] = lr', 'g["lr"] = eg.tensor(lr)',
      "a tensor lr is updated in place (a compiled step reads it)",
      "tests/test_nn_optim.py -k 'tensor_lr or jit_traces'"),
    M("clip-grad-norm-coef", "nn/optim/clip.py",
      "coef = eg.minimum(max_norm / (total + 1e-6), 1.0)", "coef = eg.maximum(max_norm / (total + 1e-6), 1.0)",
      "clipping only scales down", "tests/test_nn_optim.py -k clip"),
    M("clip-grad-norm-root", "nn/optim/clip.py",
      "total = acc.sqrt() if norm_type == 2.0", "total = acc if norm_type == 2.0",
      "the 2-norm is a root of the sum of squares", "tests/test_nn_optim.py -k clip"),
    M("all-reduce-mean", "engine/distributed.py",
      "out /= out.dtype.type(self.size) if", "out *= out.dtype.type(self.size) if",
      "data-parallel gradients are averaged over ranks",
      "tests/test_distributed.py -k two_processes_reach"),
    # -- argument validation ------------------------------------------------------------------
    M("validate-dropout-probability", "engine/validate.py",
      '"dropout": probability,', '"dropout": nonnegative,',
      "a dropout rate is in [0, 1)", "tests/test_validation.py -k bad_input"),
    M("validate-finite", "engine/validate.py",
      "if not math.isfinite(v) or too_low or too_high:", "if too_low or too_high:",
      "real arguments are finite", "tests/test_validation.py -k bad_input"),
    M("validate-bool-is-not-int", "engine/validate.py",
      "    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):",
      "    if not isinstance(value, (int, np.integer)):",
      "True is not an integer argument", "tests/test_validation.py -k bad_input"),
)


class Drift(RuntimeError):
    """A mutation's old text no longer occurs exactly once: the list must be updated."""


def problems(root: Path = ROOT, mutations: tuple[Mutation, ...] = MUTATIONS) -> list[str]:
    """What is wrong with the list against the tree at `root` (empty when consistent):
    an old text found other than once, a missing file, a selection naming no test file,
    a duplicate name, or a no-op replacement."""
    found, seen = [], set()
    for m in mutations:
        if m.name in seen:
            found.append(f"{m.name}: duplicate name")
        seen.add(m.name)
        if m.old == m.new:
            found.append(f"{m.name}: the replacement changes nothing")
        path = root / m.path
        if not path.is_file():
            found.append(f"{m.name}: {m.path} does not exist")
            continue
        n = path.read_text().count(m.old)
        if n != 1:
            found.append(f"{m.name}: the old text occurs {n} times in {m.path} (expected once): "
                         f"{m.old!r}")
        files = [w for w in shlex.split(m.tests) if w.startswith("tests/")]
        if not files:
            found.append(f"{m.name}: the selection {m.tests!r} names no test file")
        for f in files:
            if not (root / f.split("::")[0]).is_file():
                found.append(f"{m.name}: the selection names {f}, which does not exist")
    return found


def mutated_text(root: Path, m: Mutation) -> str:
    text = (root / m.path).read_text()
    if text.count(m.old) != 1:
        raise Drift(f"{m.name}: the old text occurs {text.count(m.old)} times in {m.path}")
    return text.replace(m.old, m.new)


@dataclass
class Result:
    mutation: Mutation
    outcome: str             # "caught", "survived", "timed out", "error"
    detail: str              # the first failing test, or why the run failed
    seconds: float


_FAILED = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", re.M)
_COUNTS = re.compile(r"(\d+) (passed|skipped)")
_PROGRESS = re.compile(r"^([.sxXFE]+) *(?:\[ *\d+%\])?$", re.M)


def _ran(out: str) -> tuple[int, int]:
    """(passed, skipped) of a passing run: from the summary line, or (the project's own
    -q makes it -qq, which prints none) from the progress marks."""
    counts = {k: int(n) for n, k in _COUNTS.findall(out)}
    if counts:
        return counts.get("passed", 0), counts.get("skipped", 0)
    marks = "".join(_PROGRESS.findall(out))
    return marks.count("."), marks.count("s")
_procs: set = set()
_procs_lock = threading.Lock()
_stopping = threading.Event()            # set on Ctrl-C: no new run starts


def run_one(m: Mutation, timeout: float, root: Path = ROOT, mutate: bool = True) -> Result:
    """Run `m`'s selection on a temporary copy of `root` with the mutation applied
    (`mutate=False`: on the unbroken copy). The copy is removed whatever happens."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
        tree = Path(tmp) / "tree"
        shutil.copytree(root, tree, ignore=_SKIP, symlinks=True)
        if mutate:
            (tree / m.path).write_text(mutated_text(root, m))
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1",
                   PYTHONPATH=os.pathsep.join([str(tree)] + [p for p in
                                              os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        cmd = [sys.executable, *PYTEST, *shlex.split(m.tests)]
        t0 = time.monotonic()
        with _procs_lock:
            if _stopping.is_set():
                return Result(m, "error", "interrupted", 0.0)
            proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            _procs.add(proc)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            proc.communicate()
            return Result(m, "timed out", f"after {timeout:.0f} s", time.monotonic() - t0)
        finally:
            _kill(proc)
            with _procs_lock:
                _procs.discard(proc)
        seconds = time.monotonic() - t0
    if proc.returncode == 0:
        passed, skipped = _ran(out)
        ran = f"{passed} passed, {skipped} skipped"
        if not passed:
            return Result(m, "error", f"no selected test ran ({ran})", seconds)
        return Result(m, "survived", ran, seconds)
    first = _FAILED.search(out)
    if proc.returncode in (1, 2) and first:       # 2: the mutant broke collection (an import)
        return Result(m, "caught", first.group(1), seconds)
    tail = " ".join(out.strip().splitlines()[-3:])
    return Result(m, "error", f"pytest exit {proc.returncode}: {tail}", seconds)


def _kill(proc: subprocess.Popen) -> None:
    """End the run's whole process group (pytest and anything it started)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def table(results: list[Result]) -> str:
    rows = ["| mutation | what it breaks | caught by | time |", "|---|---|---|---|"]
    for r in results:
        m = r.mutation
        where = f"`{m.path}`"
        caught = f"`{r.detail}`" if r.outcome == "caught" else f"**{r.outcome.upper()}** ({r.detail})"
        cells = (f"`{m.name}` ({where})", m.breaks, caught, f"{r.seconds:.0f} s")
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def summary(results: list[Result]) -> str:
    counts: dict = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing run"


def select(names: list[str] | None) -> tuple[Mutation, ...]:
    if not names:
        return MUTATIONS
    known = {m.name: m for m in MUTATIONS}
    wanted = [n for arg in names for n in arg.split(",") if n]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"mutate: unknown mutation(s) {unknown}; --list shows the names")
    return tuple(known[n] for n in wanted)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", metavar="NAME", help="run this mutation (repeatable, or comma-separated)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--check", action="store_true", help="only check the list against the tree")
    ap.add_argument("--baseline", action="store_true",
                    help="run the selections on the unbroken tree (each must pass)")
    ap.add_argument("-j", type=int, default=1, metavar="N", help="parallel runs (each in its own copy)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run (default 300)")
    ap.add_argument("--write", metavar="PATH", help="also write the table (with the command) to PATH")
    args = ap.parse_args(argv)
    chosen = select(args.only)
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.path:30} {m.breaks}  [{m.tests}]")
        return 0
    bad = problems(ROOT, chosen)
    if bad:
        print("mutate: the mutation list no longer matches the code:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 2
    if args.check:
        print(f"mutate: {len(chosen)} mutations, each old text found exactly once")
        return 0
    results: list = [None] * len(chosen)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.j))
    try:
        futures = {pool.submit(run_one, m, args.timeout, ROOT, not args.baseline): i
                   for i, m in enumerate(chosen)}
        for done in concurrent.futures.as_completed(futures):
            r = results[futures[done]] = done.result()
            print(f"[{sum(x is not None for x in results)}/{len(chosen)}] {r.mutation.name}: "
                  f"{r.outcome} ({r.detail}, {r.seconds:.0f} s)", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        with _procs_lock:
            _stopping.set()
            for p in list(_procs):
                _kill(p)
        print("mutate: interrupted; the working tree was never changed", file=sys.stderr)
        return 130
    pool.shutdown()
    if args.baseline:
        failing = [r for r in results if r.outcome != "survived"]
        for r in failing:
            print(f"baseline: {r.mutation.name}: {r.outcome} ({r.detail})", file=sys.stderr)
        print(f"baseline: {len(results) - len(failing)}/{len(results)} selections pass unbroken")
        return 1 if failing else 0
    text = table(results)
    print(text, end="")
    print(f"\n{summary(results)}")
    if args.write:
        command = "python scripts/mutate.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        Path(args.write).write_text(
            "# Mutation testing\n\n"
            "Each row breaks one correctness feature on purpose (an exact text replacement, "
            "listed in `scripts/mutate.py`) and runs the narrowest tests that should notice; "
            "\"caught by\" names the first test that failed. A survivor would mean the tests do "
            "not pin that behaviour down. When code a mutation quotes moves, "
            "`tests/test_mutate.py` fails naming the mutation: update its text in the list.\n\n"
            f"Produced by `{command.strip()}` on {stamp} ({summary(results)}; times are "
            f"wall-clock on a shared machine).\n\n" + text)
    return 0 if all(r.outcome == "caught" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
