"""The fused attention (ops/attention.py) printed as CUDA kernels.

Forward, `engine_attention_fwd_<dtype>_<mask>[_drop]`: one block per query row
(grid-stride over the batch * T rows), a thread per key (j, j + blockDim.x, ...) and
per output column. A row: its query into shared memory, the scaled scores q . k_j
with the mask applied, the softmax (the row program ops.fused.SOFTMAX as a printed
`__device__` function, backends.rowprint), the dropout keep mask (the Philox rounds
and Bernoulli threshold of ops.random.BERNOULLI, printed from that spec: element
(row, j) uses counter first + offset + row * S + j, as the composite's draw of the
weights), the weights written out, and out[c] = sum_j w_j v[j, c].

Backward, `engine_attention_bwd_<dtype>_<mask>[_scores]`: one block per batch
element (grid-stride), the query rows in turn; thread j owns key j, so it alone
accumulates column j of dK^T and row j of dV: no atomics, the same sums in the same
order at every run. Per query row: the probabilities recomputed (the forward's code),
dP = g_w + g_out . v_j times the dropout scale where the weight was kept (read back
from the forward's weights: a kept weight is never 0 where p is not), dS the row
program ops.fused.SOFTMAX_GRAD, then dK^T, dV, dQ (and dS, for an additive mask's
gradient). Rows live in dynamic shared memory (`ENGINE_DYNAMIC_SHARED`), sized by the
launch: (2 S + d) values forward, (4 S + d + dv) backward.

The limits (T, S <= 256, head dims <= 128: a row's values fit shared memory and one
block) are the CUDA backend's offer; the kernels themselves loop over any sizes.
Kernels take the row programs and the draw as data (duck-typed), so this module
imports nothing above the backends.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .cprint import CUDA_PREAMBLE
from .rowprint import row_device_function, row_device_name

MASKS = ("none", "bool", "add")
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Dynamic shared memory, as CUDA declares it (an emulation defines the macro first).
ATTENTION_PRELUDE = r"""
#ifndef ENGINE_DYNAMIC_SHARED
#define ENGINE_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif
"""


def _acc(dtype: Any) -> str:
    return "double" if np.dtype(dtype) == np.float64 else "float"


def philox_keep_function(draw: Any, name: str) -> str:
    """`__device__ bool name(start, i, k0, k1, threshold)`: the Bernoulli draw's body
    (its kernel_source, printed from the Philox spec) for element i of a draw starting at
    counter `start`: the same bits as the elementwise draw kernel."""
    ins, _, body = draw.kernel_source(np.dtype(np.float32))
    assert "threshold" in ins, "the keep mask is a thresholded (Bernoulli) draw"
    lines = "\n".join("  " + ln for ln in body.splitlines())
    return (f"__device__ __forceinline__ bool {name}(unsigned long long start, unsigned long long i, "
            f"unsigned int k0, unsigned int k1, unsigned int threshold) {{\n  bool out0;\n{lines}\n"
            f"  return out0;\n}}\n")


def _guarded(name: str, source: str) -> str:
    """`source` defined once per translation unit (kernels share device functions)."""
    guard = f"ENGINE_DEFINED_{name.upper()}"
    return f"#ifndef {guard}\n#define {guard}\n{source}#endif\n"


class AttentionKernel:
    """One printed attention kernel (forward or backward, per mask kind and variant):
    `params` are (role, name) pairs as CudaRowKernel's, roles "in" (a float array),
    "mask" (bool or float array), "out", "i64", "acc" (a scalar in the compute type),
    "i32", "u32", "u64" and "state" (3 uint64 on the device: first counter, key words)."""

    def __init__(self, direction: str, mask: str, softmax: Any, softmax_grad: Any, draw: Any,
                 dropout: bool = False, scores: bool = False) -> None:
        assert direction in ("fwd", "bwd") and mask in MASKS
        assert not (dropout and direction == "bwd") and not (scores and direction == "fwd")
        self.direction, self.mask, self.dropout, self.scores = direction, mask, dropout, scores
        self.softmax, self.softmax_grad, self.draw = softmax, softmax_grad, draw
        m = (("mask", "mask"),) if mask != "none" else ()
        dims = (("i64", "n_rows"), ("i64", "T"), ("i64", "S"), ("i64", "D"), ("i64", "DV"), ("acc", "scale"))
        if direction == "fwd":
            rng = (("state", "rng"), ("u64", "rng_offset"), ("u32", "threshold"), ("acc", "keep_scale")) \
                if dropout else ()
            self.params = (("in", "q"), ("in", "kt"), ("in", "v")) + m + (("out", "y"),) + dims + rng
        else:
            self.params = (("in", "g"), ("in", "y"), ("in", "q"), ("in", "kt"), ("in", "v")) + m \
                + (("out", "dx"),) + dims + (("acc", "keep_scale"), ("i32", "dropped"))

    def kernel_name(self, dtype: Any) -> str:
        tail = "_drop" if self.dropout else "_scores" if self.scores else ""
        return f"engine_attention_{self.direction}_{np.dtype(dtype).name}_{self.mask}{tail}"

    def shared_bytes(self, dtype: Any, s: int, d: int, dv: int) -> int:
        """Dynamic shared memory of one block."""
        n = 2 * s + d if self.direction == "fwd" else 4 * s + d + dv
        return n * np.dtype(dtype).itemsize

    def _scores(self, acc: str, mask_t: str) -> list[str]:
        """Thread j's scores of row r (query in q_row) into s_row."""
        lines = ["    for (long long j = threadIdx.x; j < S; j += blockDim.x) {",
                 f"      {acc} a = 0;",
                 "      for (long long c = 0; c < D; ++c) a += q_row[c] * kt[bh * D * S + c * S + j];",
                 "      a = a * scale;"]
        if self.mask == "bool":
            lines.append(f"      a = mask[r * S + j] ? a : engine_neg_inf_{acc}();")
        elif self.mask == "add":
            lines.append("      a = a + mask[r * S + j];")
        return lines + ["      s_row[j] = a;", "    }", "    __syncthreads();"]

    def source(self, dtype: Any) -> str:
        """The device functions and the kernel (it needs the backend's prelude, block
        reductions and ATTENTION_PRELUDE before it)."""
        dt = np.dtype(dtype)
        if dt not in DTYPES:
            raise TypeError(f"attention kernel: no kernel for dtype {dt}")
        acc = _acc(dt)
        mask_t = "bool" if self.mask == "bool" else acc
        decl = {"in": f"const {acc}* __restrict__", "mask": f"const {mask_t}* __restrict__",
                "out": f"{acc}* __restrict__", "i64": "long long", "acc": acc, "i32": "int",
                "u32": "unsigned int", "u64": "unsigned long long",
                "state": "const unsigned long long* __restrict__"}
        args = ", ".join(f"{decl[role]} {n}" for role, n in self.params)
        softmax = row_device_name(self.softmax, dt)
        keep = f"engine_attention_keep_{dt.name}"
        head = [_guarded(softmax, row_device_function(self.softmax, dt))]
        if self.direction == "bwd":
            head.append(_guarded(row_device_name(self.softmax_grad, dt), row_device_function(self.softmax_grad, dt)))
        if self.dropout:
            head.append(_guarded(keep, philox_keep_function(self.draw, keep)))
        lines = [f'extern "C" __global__ void {self.kernel_name(dt)}({args}) {{',
                 f"  __shared__ {acc} buf[ENGINE_BLOCK];",
                 "  ENGINE_DYNAMIC_SHARED(engine_smem);",
                 f"  {acc}* s_row = ({acc}*)engine_smem;",
                 f"  {acc}* p_row = s_row + S;",
                 f"  {acc}* q_row = p_row + S;"]
        if self.direction == "fwd":
            lines += ["  for (long long r = blockIdx.x; r < n_rows; r += gridDim.x) {",
                      "    const long long bh = r / T;",
                      "    for (long long c = threadIdx.x; c < D; c += blockDim.x) q_row[c] = q[r * D + c];",
                      "    __syncthreads();"]
            lines += self._scores(acc, mask_t)
            lines += [f"    {softmax}(s_row, p_row, S, buf);", "    __syncthreads();",
                      "    for (long long j = threadIdx.x; j < S; j += blockDim.x) {",
                      f"      {acc} w = p_row[j];"]
            if self.dropout:
                lines += [f"      w = w * ({keep}(rng[0] + rng_offset, (unsigned long long)(r * S + j), "
                          f"(unsigned int)rng[1], (unsigned int)rng[2], threshold) ? keep_scale : ({acc})0);",
                          "      p_row[j] = w;"]
            lines += ["      y[r * (S + DV) + j] = w;", "    }", "    __syncthreads();",
                      "    for (long long c = threadIdx.x; c < DV; c += blockDim.x) {",
                      f"      {acc} a = 0;",
                      "      for (long long j = 0; j < S; ++j) a += p_row[j] * v[bh * S * DV + j * DV + c];",
                      "      y[r * (S + DV) + S + c] = a;", "    }",
                      "    __syncthreads();                 // the rows are rewritten next",
                      "  }", "}"]
            return "\n".join(head) + "\n".join(lines) + "\n"
        grad = row_device_name(self.softmax_grad, dt)
        width = "(T * D + D * S + S * DV" + (" + T * S)" if self.scores else ")")
        lines += [f"  {acc}* dp_row = q_row + D;",
                  f"  {acc}* ds_row = dp_row + S;",
                  f"  {acc}* go_row = ds_row + S;",
                  "  const long long W = S + DV;",
                  "  for (long long bh = blockIdx.x; bh < n_rows; bh += gridDim.x) {",
                  f"    {acc}* dq = dx + bh * {width};",
                  f"    {acc}* dkt = dq + T * D;",
                  f"    {acc}* dv = dkt + D * S;",
                  f"    {acc}* dsc = dv + S * DV;",
                  "    for (long long j = threadIdx.x; j < S; j += blockDim.x) {",
                  "      for (long long c = 0; c < D; ++c) dkt[c * S + j] = 0;",
                  "      for (long long c = 0; c < DV; ++c) dv[j * DV + c] = 0;",
                  "    }",
                  "    for (long long t = 0; t < T; ++t) {",
                  "      const long long r = bh * T + t;",
                  "      for (long long c = threadIdx.x; c < D; c += blockDim.x) q_row[c] = q[r * D + c];",
                  "      for (long long c = threadIdx.x; c < DV; c += blockDim.x) go_row[c] = g[r * W + S + c];",
                  "      __syncthreads();"]
        lines += ["  " + ln for ln in self._scores(acc, mask_t)]
        lines += [f"      {softmax}(s_row, p_row, S, buf);", "      __syncthreads();",
                  "      for (long long j = threadIdx.x; j < S; j += blockDim.x) {",
                  "        const long long vj = bh * S * DV + j * DV;",
                  f"        {acc} a = 0;",
                  "        for (long long c = 0; c < DV; ++c) a += go_row[c] * v[vj + c];",
                  "        const " + acc + " w = y[r * W + j];",
                  f"        a = g[r * W + j] + a;",
                  f"        if (dropped) a = a * (w != ({acc})0 ? keep_scale : ({acc})0);",
                  "        dp_row[j] = a;",
                  "        for (long long c = 0; c < DV; ++c) dv[j * DV + c] += w * go_row[c];",
                  "      }", "      __syncthreads();",
                  f"      {grad}(p_row, dp_row, ds_row, S, buf);", "      __syncthreads();",
                  "      for (long long j = threadIdx.x; j < S; j += blockDim.x) {"]
        if self.scores:
            lines.append("        dsc[t * S + j] = ds_row[j];")
        lines += [f"        const {acc} d = ds_row[j] * scale;",
                  "        for (long long c = 0; c < D; ++c) dkt[c * S + j] += q_row[c] * d;",
                  "        ds_row[j] = d;",
                  "      }", "      __syncthreads();",
                  "      for (long long c = threadIdx.x; c < D; c += blockDim.x) {",
                  f"        {acc} a = 0;",
                  "        for (long long j = 0; j < S; ++j) a += ds_row[j] * kt[bh * D * S + c * S + j];",
                  "        dq[t * D + c] = a;", "      }",
                  "      __syncthreads();               // the rows are rewritten next",
                  "    }", "  }", "}"]
        return "\n".join(head) + "\n".join(lines) + "\n"

    def full_source(self, dtype: Any, prelude: str) -> str:
        """What RawKernel compiles: `prelude` (the backend's types and block reductions),
        the dynamic shared memory declaration and the kernel."""
        return CUDA_PREAMBLE + prelude + ATTENTION_PRELUDE + self.source(dtype)


def all_kernels(softmax: Any, softmax_grad: Any, draw: Any) -> list[AttentionKernel]:
    """Every variant: forward per mask, with and without dropout; backward per mask, with
    and without dScores (an additive mask's gradient)."""
    out = []
    for mask in MASKS:
        out += [AttentionKernel("fwd", mask, softmax, softmax_grad, draw, dropout=d) for d in (False, True)]
        out += [AttentionKernel("bwd", mask, softmax, softmax_grad, draw, scores=sc)
                for sc in ((False, True) if mask == "add" else (False,))]
    return out


__all__ = ["AttentionKernel", "ATTENTION_PRELUDE", "MASKS", "DTYPES", "all_kernels", "philox_keep_function"]
