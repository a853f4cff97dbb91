"""Row programs (ops/rows.py) printed as host C and CUDA kernels.

A row program is a list of steps over one row: reductions (max / sum / mean of an
expression) giving row scalars, picks (a row expression at the column a per-row index
names, NaN outside the row: the kernel never reads past it) and maps (sympy
expressions of the row's values, the column index, earlier row scalars and per-row
inputs). The output is a row, or one value per row (a reducing program: its row maps
are inlined into the reductions that read them). The printers read the program as data (duck-typed: `.steps`
with `.name`, `.how`, `.expr`; `.rows`, `.cols`, `.params`), so this module imports
nothing above the backends; expressions go through `backends.cprint`, the printer of
every elementwise kernel.

Host C: one static per-row function (the jit's row kernels call it on a scratch row)
and one exported loop over rows. Reductions of a row are the 32-partial-sum loop
(`row_sum`, or inline when they reduce an expression) and an AVX max that propagates
NaN; a row map that is not the output lives in the output row; a map `exp(arg)` runs
as the libmvec fast path (arguments clamped so the vector exp stays fast, -inf and
tiny arguments patched afterwards, exactly). CUDA: one block per row, block
reductions, row maps inlined into the steps that read them, and sub-expressions that
do not vary along the row (`log(s)`) computed once per row (GCC hoists them itself).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import sympy

from . import cparallel
from .cprint import CUDA_PREAMBLE, CPrintError, c_expression

_TYPES = {np.dtype(np.float32): ("float", "f32", "f"), np.dtype(np.float64): ("double", "f64", "")}
_FAST = {"f32": "-87.0f", "f64": "-708.0"}      # exp's result is still a normal number here
_AVX = {"f32": dict(VEC="__m256", SET1="_mm256_set1_ps", MAX="_mm256_max_ps", LOADU="_mm256_loadu_ps",
                    STOREU="_mm256_storeu_ps", OR="_mm256_or_ps", CMP="_mm256_cmp_ps",
                    MASK="_mm256_movemask_ps", ZERO="_mm256_setzero_ps", LANES=8),
        "f64": dict(VEC="__m256d", SET1="_mm256_set1_pd", MAX="_mm256_max_pd", LOADU="_mm256_loadu_pd",
                    STOREU="_mm256_storeu_pd", OR="_mm256_or_pd", CMP="_mm256_cmp_pd",
                    MASK="_mm256_movemask_pd", ZERO="_mm256_setzero_pd", LANES=4)}

C_HEADER = "#include <math.h>\n#if defined(__AVX__)\n#include <immintrin.h>\n#endif\n"

_C_HELPERS = """
#ifndef ENGINE_ROW_HELPERS_{S}
#define ENGINE_ROW_HELPERS_{S}
/* Thirty-two running sums (several vector registers, so the adds do not wait on each
   other), folded pairwise: vectorises without reassociating. */
static inline {T} row_sum_{S}(const {T}* restrict v, long long n) {{
  {T} acc[32] = {{0}};
  long long j = 0;
  for (; j + 32 <= n; j += 32)
    for (int l = 0; l < 32; ++l) acc[l] += v[j + l];
  for (int w = 16; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  {T} tail = 0;
  for (; j < n; ++j) tail += v[j];
  return acc[0] + tail;
}}

/* The row maximum; NaN if the row holds one (as NumPy's max). With AVX, `max(v, acc)` is
   one instruction on a whole register (GCC will not vectorise this reduction without
   -ffast-math), and an unordered compare collects NaNs alongside. */
static inline {T} row_max_{S}(const {T}* restrict v, long long n) {{
  {T} m = -INFINITY;
  int nan = 0;
  long long j = 0;
#if defined(__AVX__)
  {VEC} acc = {SET1}(-INFINITY), bad = {ZERO}();
  for (; j + {LANES} <= n; j += {LANES}) {{
    const {VEC} t = {LOADU}(v + j);
    acc = {MAX}(t, acc);
    bad = {OR}(bad, {CMP}(t, t, _CMP_UNORD_Q));
  }}
  {T} lanes[{LANES}];
  {STOREU}(lanes, acc);
  for (int l = 0; l < {LANES}; ++l) m = lanes[l] > m ? lanes[l] : m;
  nan = {MASK}(bad) != 0;
#endif
  for (; j < n; ++j) {{ m = v[j] > m ? v[j] : m; nan |= v[j] != v[j]; }}
  return nan ? NAN : m;
}}
#endif
"""


def c_helpers(dtype: Any) -> str:
    """The static row helpers (row_sum, row_max) of one float type."""
    t, s, _ = _TYPES[np.dtype(dtype)]
    return _C_HELPERS.format(T=t, S=s, **_AVX[s])


def _scalar(sym: Any) -> str:
    return f"v_{sym}"


def _hoist(expr: Any, row: set, hoisted: list) -> sympy.Expr:
    """`expr` with its calls and roots that do not vary along the row replaced by locals
    (appended to `hoisted` as (symbol, expression)), so they run once per row."""
    def walk(e: sympy.Expr) -> sympy.Expr:
        if e.is_Atom:
            return e
        varies = bool(e.free_symbols & row)
        call = isinstance(e, sympy.Function) or (e.is_Pow and not e.exp.is_Integer)
        if call and not varies and e.free_symbols:
            for s, h in hoisted:
                if h == e:
                    return s
            s = sympy.Symbol(f"h{len(hoisted)}", extended_real=True)
            hoisted.append((s, e))
            return s
        return e.func(*[walk(a) for a in e.args])
    return walk(sympy.sympify(expr))


def _rowfn_name(program: Any, dtype: Any) -> str:
    return f"rowfn_{program.name}_{_TYPES[np.dtype(dtype)][1]}"


def rows_function_name(program: Any, dtype: Any) -> str:
    """The exported C function running `program` over every row."""
    return f"rows_{program.name}_{_TYPES[np.dtype(dtype)][1]}"


def _inliner(program: Any, names: set) -> Any:
    """A function substituting the map steps in `names` into an expression (repeatedly)."""
    maps = {st.name: sympy.sympify(st.expr) for st in program.steps if st.how == "map" and st.name in names}

    def expand(e: Any) -> sympy.Expr:
        e = sympy.sympify(e)
        for _ in program.steps:
            nxt = e.xreplace(maps)
            if nxt == e:
                break
            e = nxt
        return e
    return expand


def _pick_guard(index: str, n: str) -> str:
    return f"({index} >= 0 && {index} < {n})"


def c_row_function(program: Any, dtype: Any) -> str:
    """`static inline void rowfn_<name>_<t>(rows..., cols..., params..., scalars..., indices..., T* y,
    long long n)`: the program on one row of length n (inputs read, output written at
    y: a row, or one value for a reducing program)."""
    dt = np.dtype(dtype)
    if dt not in _TYPES:
        raise CPrintError(f"row program {program.name}: no C kernel for dtype {dt}")
    t, s, f = _TYPES[dt]
    row = program.row_symbols()
    reduces = program.reduces
    # A full-row intermediate lives in the output row; a reducing program has none, so
    # its row maps are inlined where they are read.
    stored = [] if reduces else [st.name for st in program.steps[:-1] if st.how == "map" and st.name in row]
    if len(stored) > 1:
        raise CPrintError(f"row program {program.name}: at most one full-row intermediate fits the "
                          f"output row, got {[str(v) for v in stored]}")
    expand = _inliner(program, row - set(stored))
    pointer = {v: f"p_{v}" for v in tuple(program.rows) + tuple(program.cols)}
    pointer.update({v: "y" for v in stored})
    args = [f"const {t}* restrict p_{v}" for v in tuple(program.rows) + tuple(program.cols)]
    args += [f"{t} {_scalar(v)}" for v in tuple(program.params) + tuple(program.scalars)]
    args += [f"long long {_scalar(v)}" for v in program.indices]
    args += [f"{t}* restrict y", "long long n"]
    lines = [f"static inline void {_rowfn_name(program, dt)}({', '.join(args)}) {{"]

    def names(index: str) -> dict:
        out = {v: f"{p}[{index}]" for v, p in pointer.items()}
        out.update({st.name: _scalar(st.name) for st in program.steps if st.name not in row})
        out.update({v: _scalar(v) for v in tuple(program.params) + tuple(program.scalars) + tuple(program.indices)})
        if program.column is not None:
            out[program.column] = index
        if program.length is not None:
            out[program.length] = f"(({t})n)"
        return out

    def elementwise(expr: Any, dest: str) -> list[str]:
        # (calls that do not vary along the row, log(s), are hoisted by GCC: math
        # functions are pure under -fno-math-errno)
        if isinstance(expr, sympy.exp):
            return _exp_fast_path(c_expression(expr.args[0], names("j"), dt), dest, t, s, f)
        return [f"  for (long long j = 0; j < n; ++j) {dest}[j] = {c_expression(expr, names('j'), dt)};"]

    for st in program.steps:
        expr = expand(st.expr)
        v = _scalar(st.name)
        if st.how == "max" and expr in pointer:
            lines.append(f"  const {t} {v} = row_max_{s}({pointer[expr]}, n);")
        elif st.how == "max":
            body = c_expression(expr, names("j"), dt)
            lines += [f"  {t} {v} = -INFINITY;", "  {", "    int nan = 0;",
                      f"    for (long long j = 0; j < n; ++j) {{ const {t} a = {body}; "
                      f"{v} = a > {v} ? a : {v}; nan |= a != a; }}",
                      f"    if (nan) {v} = NAN;", "  }"]
        elif st.how in ("sum", "mean"):
            per = f" / ({t})n" if st.how == "mean" else ""
            if expr in pointer:
                lines.append(f"  const {t} {v} = row_sum_{s}({pointer[expr]}, n){per};")
            else:
                body = c_expression(expr, names("jj"), dt)
                lines += [f"  {t} {v};", "  {", f"    {t} acc[32] = {{0}};", "    long long j = 0;",
                          "    for (; j + 32 <= n; j += 32)",
                          f"      for (int l = 0; l < 32; ++l) {{ const long long jj = j + l; acc[l] += {body}; }}",
                          "    for (int w = 16; w > 0; w /= 2)",
                          "      for (int l = 0; l < w; ++l) acc[l] += acc[l + w];",
                          f"    {t} tail = 0;",
                          f"    for (; j < n; ++j) {{ const long long jj = j; tail += {body}; }}",
                          f"    {v} = (acc[0] + tail){per};", "  }"]
        elif st.how == "pick":
            at = _scalar(st.at)
            lines.append(f"  const {t} {v} = {_pick_guard(at, 'n')} ? {c_expression(expr, names(at), dt)} : NAN;")
        elif st.name in row:
            if not reduces:
                lines += elementwise(expr, "y")
        elif st is program.out:
            lines.append(f"  y[0] = {c_expression(expr, names('0'), dt)};")
        else:
            lines.append(f"  const {t} {v} = {c_expression(expr, names('0'), dt)};")
    if reduces and program.out.how != "map":
        lines.append(f"  y[0] = {_scalar(program.out.name)};")
    return "\n".join(lines + ["}"]) + "\n"


def _exp_fast_path(arg: str, dest: str, t: str, s: str, f: str) -> list[str]:
    """dest[j] = exp(arg). libmvec's SIMD exp leaves its fast path for special inputs
    (-inf: masked entries) and tiny results (~2.5x slower), so the vector loop sees
    arguments clamped to FAST and exact values are patched in afterwards: 0 for -inf,
    a scalar exp for the rare finite argument below FAST. (The exp loop is a loop of its
    own: fused with the clamp, GCC hoists exp(FAST) and calls the masked SIMD exp on the
    raw arguments, -inf included.)"""
    fast = _FAST[s]
    return ["  {", "    int masked = 0, tiny = 0;",
            "    for (long long j = 0; j < n; ++j) {",
            f"      const {t} a = {arg};",
            f"      {dest}[j] = a < {fast} ? {fast} : a;",
            "      masked |= a == -INFINITY;",
            f"      tiny |= a < {fast} && a != -INFINITY;", "    }",
            f"    for (long long j = 0; j < n; ++j) {dest}[j] = exp{f}({dest}[j]);",
            "    if (masked)",
            f"      for (long long j = 0; j < n; ++j) {dest}[j] = ({arg}) == -INFINITY ? 0 : {dest}[j];",
            "    if (tiny)",
            "      for (long long j = 0; j < n; ++j) {",
            f"        const {t} a = {arg};",
            f"        if (a < {fast} && a != -INFINITY) {dest}[j] = exp{f}(a);", "      }", "  }"]


def c_rows_source(program: Any, dtype: Any) -> str:
    """The helpers, the per-row function and `void rows_<name>_<t>(long long rows, long
    long n, const T* rows_inputs..., const T* cols..., const T* scalars..., const long long* indices...,
    double params..., T* y)`; y holds one value per row for a reducing program."""
    dt = np.dtype(dtype)
    t = _TYPES[dt][0] if dt in _TYPES else None
    fn = c_row_function(program, dt)
    ins = tuple(program.rows) + tuple(program.cols)
    args = ["long long rows", "long long n"] + [f"const {t}* restrict p_{v}" for v in ins]
    args += [f"const {t}* restrict p_{v}" for v in program.scalars]
    args += [f"const long long* restrict p_{v}" for v in program.indices]
    args += [f"double {_scalar(v)}" for v in program.params] + [f"{t}* restrict y"]
    call = [f"p_{v} + r * n" for v in program.rows] + [f"p_{v}" for v in program.cols]
    call += [f"({t}){_scalar(v)}" for v in program.params]
    call += [f"p_{v}[r]" for v in tuple(program.scalars) + tuple(program.indices)]
    call += ["y + r" if program.reduces else "y + r * n", "n"]
    body = [f"for (long long r = lo; r < hi; ++r) {_rowfn_name(program, dt)}({', '.join(call)});"]
    loop = cparallel.parallel_function(rows_function_name(program, dt), args, "rows", "rows * n", body)
    return c_helpers(dt) + fn + loop


def row_call(program: Any, dtype: Any, row: str, out: str, n: str, cols: tuple = (),
             params: tuple = ()) -> str:
    """A C statement running a one-row-input program on the row at `row` into `out`
    (`cols`: C pointers to its column inputs, `params`: C values of its parameters)."""
    if program.scalars or program.indices or program.reduces:
        raise CPrintError(f"row program {program.name}: only programs with a row output and no "
                          f"per-row or index inputs run on a scratch row")
    if len(program.rows) != 1 or len(cols) != len(program.cols) or len(params) != len(program.params):
        raise CPrintError(f"row program {program.name}: needs one row, {len(program.cols)} column(s) "
                          f"and {len(program.params)} parameter(s)")
    return f"{_rowfn_name(program, dtype)}({', '.join([row, *cols, *params, out, n])});"


# -- CUDA ---------------------------------------------------------------------------------------

def _block_row_steps(program: Any, names: Callable[[str], dict], compute: np.dtype, indent: str,
                     write: Callable[[str], str]) -> list[str]:
    """The steps of `program` for one CUDA block on one row (thread j takes entries j,
    j + blockDim.x, ...): reductions through the block helpers into per-row scalars,
    picks, per-row scalars, and the row output, assigned by `write(value)`. `names(i)`
    maps the program's symbols to C at column index `i`. The row kernel and the device
    function both print their steps here, so a program reads the same in each."""
    acc = "double" if compute == np.float64 else "float"
    row = program.row_symbols()
    expand = _inliner(program, row)
    loop = "for (long long j = threadIdx.x; j < cols; j += blockDim.x)"
    lines: list[str] = []
    for st in program.steps:
        v = _scalar(st.name)
        if st.how in ("max", "sum", "mean"):
            body = c_expression(expand(st.expr), names("j"), compute)
            if st.how == "max":
                lines += [f"{acc} {v} = engine_neg_inf_{acc}();", f"{loop} {v} = engine_max_nan({v}, {body});",
                          f"{v} = engine_block_max({v}, buf);"]
            else:
                per = f" / ({acc})cols" if st.how == "mean" else ""
                lines += [f"{acc} {v} = 0;", f"{loop} {v} += {body};", f"{v} = engine_block_sum({v}, buf){per};"]
        elif st.how == "pick":
            at = _scalar(st.at)
            value = c_expression(expand(st.expr), names(at), compute)
            lines.append(f"const {acc} {v} = {_pick_guard(at, 'cols')} ? {value} : "
                         f"{c_expression(sympy.nan, {}, compute)};")
        elif st is program.out and st.name in row:
            hoisted: list = []
            body = _hoist(expand(st.expr), row, hoisted)
            lines += [f"const {acc} {_scalar(h)} = {c_expression(e, names('j'), compute)};" for h, e in hoisted]
            scope = {**names("j"), **{h: _scalar(h) for h, _ in hoisted}}
            lines.append(f"{loop} {write(c_expression(body, scope, compute))};")
        elif st.name not in row:
            lines.append(f"const {acc} {v} = {c_expression(st.expr, names('0'), compute)};")
        elif st.how != "map":
            raise CPrintError(f"row program {program.name}: step {st.name} ({st.how}) has no CUDA form")
    return [indent + line for line in lines]


class CudaRowKernel:
    """A row program as a CUDA kernel, one block per row (grid-stride over rows): the
    same interface as a hand-written kernel template (`params`, `kernel_name`, `source`).

    `params` are (role, name) pairs: "in" (a row, column or per-row input), "index" (an int64
    input with one value per row), "out" (rows, or one value per row for a reducing
    program), "i64" (rows, cols) and "acc" (a scalar parameter, in the accumulation type).
    """

    DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

    def __init__(self, program: Any) -> None:
        self.program = program
        self.name = program.name
        ins = tuple(program.rows) + tuple(program.cols) + tuple(program.scalars)
        self.params = tuple(("in", f"p_{v}") for v in ins) + tuple(("index", f"p_{v}") for v in program.indices) \
            + (("out", "y"), ("i64", "rows"), ("i64", "cols")) + tuple(("acc", _scalar(v)) for v in program.params)

    def kernel_name(self, dtype: Any) -> str:
        return f"engine_rows_{self.name}_{np.dtype(dtype).name}"

    def source(self, dtype: Any) -> str:
        """The kernel alone (it needs the backend's prelude and block-reduction helpers)."""
        dt = np.dtype(dtype)
        if dt not in self.DTYPES:
            raise TypeError(f"row kernel {self.name}: no kernel for dtype {dt}")
        prog = self.program
        half = dt == np.float16
        acc = "double" if dt == np.float64 else "float"
        store_t = "engine_half_t" if half else acc
        compute = np.dtype(np.float64) if acc == "double" else np.dtype(np.float32)
        load = (lambda p: f"engine_h2f({p})") if half else (lambda p: p)
        store = "engine_f2h" if half else f"({store_t})"
        row = prog.row_symbols()

        def names(index: str) -> dict:
            out = {v: load(f"p_{v}r[{index}]") for v in prog.rows}
            out.update({v: load(f"p_{v}[{index}]") for v in prog.cols})
            out.update({st.name: _scalar(st.name) for st in prog.steps if st.name not in row})
            out.update({v: _scalar(v) for v in tuple(prog.params) + tuple(prog.scalars) + tuple(prog.indices)})
            if prog.column is not None:
                out[prog.column] = index
            if prog.length is not None:
                out[prog.length] = f"(({acc})cols)"
            return out

        decl = []
        for role, n in self.params:
            decl.append({"in": f"const {store_t}* __restrict__", "index": "const long long* __restrict__",
                         "out": f"{store_t}* __restrict__", "i64": "long long", "acc": acc}[role] + f" {n}")
        lines = [f'extern "C" __global__ void {self.kernel_name(dt)}({", ".join(decl)}) {{',
                 f"  __shared__ {acc} buf[ENGINE_BLOCK];",
                 "  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {"]
        lines += [f"    const {store_t}* p_{v}r = p_{v} + r * cols;" for v in prog.rows]
        lines += [f"    const {acc} {_scalar(v)} = {load(f'p_{v}[r]')};" for v in prog.scalars]
        lines += [f"    const long long {_scalar(v)} = p_{v}[r];" for v in prog.indices]
        lines.append(f"    {store_t}* yr = y + r * cols;" if not prog.reduces else "")
        lines += _block_row_steps(prog, names, compute, "    ", lambda c: f"yr[j] = {store}({c})")
        if prog.reduces:
            lines.append(f"    if (threadIdx.x == 0) y[r] = {store}({_scalar(prog.out.name)});")
        return "\n".join(line for line in lines + ["  }", "}"] if line) + "\n"


def row_device_name(program: Any, dtype: Any) -> str:
    """The `__device__` function `row_device_function` prints for `program`."""
    return f"engine_rowdev_{program.name}_{np.dtype(dtype).name}"


def row_device_function(program: Any, dtype: Any) -> str:
    """`program` as a `__device__` function one whole block calls on one row, for kernels
    that compute rows themselves (the fused attention): `void engine_rowdev_<name>_<t>(
    const A* p_<row>..., A* y, long long cols, A* buf)`, rows and output of `cols` values
    in the compute type A (shared or global memory), `buf` the block-reduction buffer.
    Every thread of the block must call it (it holds __syncthreads); thread j reads and
    writes only entries j, j + blockDim.x, ... in its last loop, so `y` may be a row input.
    Programs with a row output and row inputs only (softmax and its gradient)."""
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise CPrintError(f"row program {program.name}: no device function for dtype {dt}")
    if program.cols or program.scalars or program.indices or program.params or program.reduces \
            or program.column is not None or program.length is not None:
        raise CPrintError(f"row program {program.name}: a device function takes row inputs and "
                          f"gives a row (no columns, per-row inputs, parameters or reductions to one value)")
    acc = "double" if dt == np.float64 else "float"
    row = program.row_symbols()

    def names(index: str) -> dict:
        out = {v: f"p_{v}[{index}]" for v in program.rows}
        out.update({st.name: _scalar(st.name) for st in program.steps if st.name not in row})
        return out

    args = [f"const {acc}* p_{v}" for v in program.rows] + [f"{acc}* y", "long long cols", f"{acc}* buf"]
    lines = [f"__device__ __forceinline__ void {row_device_name(program, dt)}({', '.join(args)}) {{"]
    lines += _block_row_steps(program, names, dt, "  ", lambda c: f"y[j] = {c}")
    return "\n".join(lines + ["}"]) + "\n"


def cuda_rows_source(program: Any, dtype: Any, prelude: str) -> str:
    """A complete CUDA source of one printed row kernel: `prelude` (the backend's type
    and block-reduction helpers) and the kernel."""
    return CUDA_PREAMBLE + prelude + CudaRowKernel(program).source(dtype)


__all__ = ["C_HEADER", "c_helpers", "c_row_function", "c_rows_source", "rows_function_name", "row_call",
           "CudaRowKernel", "cuda_rows_source", "row_device_function", "row_device_name"]
