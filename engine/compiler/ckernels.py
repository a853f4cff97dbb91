"""Fused elementwise groups as C loops, compiled with the system C compiler.

The loop body is the group's sympy expression printed by `backends.cprint` (the
same printer the CUDA kernels use), so fused kernels on the CPU and the GPU come
from one source. Each kernel is compiled once per source text (cached on disk
by its hash) and called through ctypes; without a C compiler, or when building
fails, the caller keeps its NumPy ufunc chain. Every kernel is printed through
`backends.cparallel.parallel_function`, which splits its outermost loop across the
thread pool (eg.set_num_threads) in a way that never changes its results.
"""
from __future__ import annotations

import ctypes
import hashlib
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import sympy

from backends import cparallel, rowprint
from backends.cbuild import address, available, vector_math
from backends.eager_kernels import merge_axes
from backends.cprint import CPrintError, c_expression, storage_ctype

from .ir import Value
from .rows import value_kind

# Below this many elements the per-call cost of ctypes exceeds what fusion saves.
MIN_ELEMENTS = 1 << 15
# A one-dimensional loop longer than this is cut into chunks of it, so threads can share it.
CHUNK = 1 << 14

def friendly(op: Any) -> bool:
    """Does a C loop over the op vectorise without -ffast-math (which would break the
    inf/NaN semantics masking relies on)? Read from the op's `c_math` trait (derived
    from its expression): plain arithmetic always, libm's transcendentals with libmvec."""
    how = getattr(op, "c_math", None)
    return how == "plain" or (how == "vector" and vector_math())


def _mode(shape: tuple, out_shape: tuple, split: int) -> str | None:
    """How an input broadcast to `out_shape` is read in the (outer, inner) loop nest that
    splits the output's axes at `split`: "same" (element i), "scalar" (0), "row" (it
    varies along the inner axes only: element c), "col" (along the outer axes only:
    element o), "suffix" (a trailing block shorter than a row: i % n), or None (the
    broadcast must be materialised first)."""
    nd = len(out_shape)
    padded = (1,) * (nd - len(shape)) + tuple(shape)
    if padded == tuple(out_shape):
        return "same"
    if int(np.prod(shape)) == 1:
        return "scalar"
    if all(d == 1 for d in padded[:split]) and padded[split:] == tuple(out_shape[split:]):
        return "row"
    if padded[:split] == tuple(out_shape[:split]) and all(d == 1 for d in padded[split:]):
        return "col"
    lead = 0
    while lead < nd and padded[lead] == 1:
        lead += 1
    if lead < nd and padded[lead:] == tuple(out_shape[lead:]):
        return "suffix"
    return None


def _input_ctypes(in_dtypes: list | None, dtype: np.dtype, n: int) -> list[str]:
    """Each input's storage type: the kernel's own, or bytes for a condition (`where`).
    (A NumPy bool is one byte 0/1; read through `_Bool` pointers GCC will not vectorise.)"""
    in_dtypes = in_dtypes or [dtype] * n
    return ["unsigned char" if np.dtype(d) == np.dtype(bool) else storage_ctype(d, "c")
            for d in in_dtypes]


def broadcast_strides(shape: tuple, out_shape: tuple) -> list[int]:
    """Element strides of a C-contiguous array of `shape` broadcast to `out_shape`."""
    nd = len(out_shape)
    padded = (1,) * (nd - len(shape)) + tuple(shape)
    strides, step = [0] * nd, 1
    for d in reversed(range(nd)):
        strides[d] = step if padded[d] != 1 else 0
        step *= padded[d]
    return strides


def loop_nest(shapes: list, out_shape: tuple, keep_last: bool = False) -> tuple[list[int], list[list[int]]]:
    """(extents, per-input strides) of the loops over the output (see merge_axes)."""
    return merge_axes(out_shape, [broadcast_strides(s, out_shape) for s in shapes], keep_last)


@dataclass
class _Nest:
    """The C scaffolding shared by the elementwise and row kernels: the signature's
    input arguments, the outer loops (the outermost over the items [lo, hi) of the
    thread pool: `items` of them), per-row offsets and the per-element loads."""
    args: list
    open: list
    offsets: list
    loads: str
    close: list
    pad: str
    items: int


def _nest(dims: list[int], strides: list[list[int]], dtype: np.dtype, in_dtypes: list | None,
          out_offset: str) -> _Nest:
    """`out_offset`: the declaration of a row's output position, "{}" standing for the
    element offset."""
    ct = storage_ctype(dtype, "c")
    cts = _input_ctypes(in_dtypes, dtype, len(strides))
    args = []
    for k in range(len(strides)):
        args += [f"const {cts[k]}* restrict p{k}", f"long long n{k}"]
    depth = len(dims) - 1
    opening = [f"{'  ' * (a + 1)}for (long long d{a} = {'lo' if a == 0 else 0}; d{a} < {'hi' if a == 0 else f'{dims[a]}LL'}; ++d{a}) {{"
               for a in range(depth)]
    pad = "  " * (depth + 1)

    def offset(steps: list[int]) -> str:
        terms = [f"d{a} * {steps[a]}LL" for a in range(depth) if steps[a]]
        return " + ".join(terms) or "0"
    offsets = [f"{pad}{out_offset.format(offset([int(np.prod(dims[a + 1:])) for a in range(depth)]))};"]
    loads = []
    for k, st in enumerate(strides):
        offsets.append(f"{pad}const long long b{k} = {offset(st)};")
        index = f"b{k} + j" if st[-1] == 1 else (f"b{k}" if st[-1] == 0 else f"b{k} + j * {st[-1]}LL")
        loads.append(f"const {ct} in{k} = p{k}[{index}];")
    closing = [f"{'  ' * (a + 1)}}}" for a in reversed(range(depth))]
    return _Nest(args, opening, offsets, " ".join(loads), closing, pad, dims[0] if depth else 1)


def kernel_source(name: str, expr: Any, symbols: tuple, dims: list[int], strides: list[list[int]],
                  dtype: np.dtype, in_dtypes: list | None = None) -> str:
    """A C function `name(in0, n0, in1, n1, ..., out)` computing `expr` for every element of
    the output: one loop per (merged) axis, extents and broadcast strides baked in, so
    the innermost loop reads each input at `b + j` (or at `b`, when broadcast along it)
    and vectorises; no index arithmetic beyond one multiply-add per outer axis."""
    ct = storage_ctype(dtype, "c")
    body = c_expression(expr, {s: f"in{k}" for k, s in enumerate(symbols)}, dtype)
    total, bound = int(np.prod(dims)), f"{dims[-1]}LL"
    if len(dims) == 1 and dims[0] > CHUNK:        # one long loop: chunks the threads can share
        chunks = -(-dims[0] // CHUNK)
        dims, strides = [chunks, CHUNK], [[st[0] * CHUNK, st[0]] for st in strides]
        bound = f"(d0 == {chunks - 1}LL ? {total - (chunks - 1) * CHUNK}LL : {CHUNK}LL)"
    nest = _nest(dims, strides, dtype, in_dtypes, "const long long bo = {}")
    pad = nest.pad
    lines = [*nest.open, *nest.offsets, f"{pad}const long long jn = {bound};",
             f"{pad}for (long long j = 0; j < jn; ++j) {{",
             f"{pad}  {nest.loads}", f"{pad}  out[bo + j] = {body};", f"{pad}}}", *nest.close]
    return cparallel.parallel_function(name, nest.args + [f"{ct}* restrict out"], f"{nest.items}LL",
                                       f"{total}LL", lines)


def _loads(modes: list[str], cts: list[str], ct: str) -> list[str]:
    """Per input (see `_mode`): element i, 0, c (inner index), o (outer index) or i % n,
    as the kernel's type `ct` (conditions too: 0/1, so the loop stays one vector type)."""
    index = {"same": "i", "scalar": "0", "row": "c", "col": "o"}
    return [f"const {ct} in{k} = p{k}[{index.get(m, f'i % n{k}')}];" for k, m in enumerate(modes)]


def reduction_source(name: str, expr: Any, symbols: tuple, modes: list[str], dtype: np.dtype,
                     layout: str, in_dtypes: list | None = None) -> str:
    """A C function `name(outer, inner, in0, n0, ..., out)` summing `expr` over each row
    ("rows": out[o] = sum_j f(o*inner + j), thirty-two partial sums folded pairwise, so it
    vectorises without reassociating and the adds do not wait on each other) or down each
    column ("cols": out[j] = sum_o f(o*inner + j)). Threads share the rows, or the
    columns: each sum is added up in one order by one thread, whatever the thread count."""
    ct = storage_ctype(dtype, "c")
    cts = _input_ctypes(in_dtypes, dtype, len(modes))
    args = ["long long outer", "long long inner"]
    for k in range(len(modes)):
        args += [f"const {cts[k]}* restrict p{k}", f"long long n{k}"]
    args.append(f"{ct}* restrict out")
    body = c_expression(expr, {s: f"in{k}" for k, s in enumerate(symbols)}, dtype)
    loads = " ".join(_loads(modes, cts, ct))
    if layout == "rows":
        loop = [
            "  for (long long o = lo; o < hi; ++o) {",
            f"    {ct} acc[32] = {{0}};",
            "    long long j = 0;",
            "    for (; j + 32 <= inner; j += 32) {",
            f"      for (int l = 0; l < 32; ++l) {{ const long long c = j + l, i = o * inner + c; {loads} acc[l] += {body}; }}",
            "    }",
            "    for (int w = 16; w > 0; w /= 2)",
            "      for (int l = 0; l < w; ++l) acc[l] += acc[l + w];",
            f"    {ct} tail = 0;",
            f"    for (; j < inner; ++j) {{ const long long c = j, i = o * inner + c; {loads} tail += {body}; }}",
            "    out[o] = acc[0] + tail;",
            "  }"]
    else:
        loop = [
            "  for (long long j = lo; j < hi; ++j) out[j] = 0;",
            "  for (long long o = 0; o < outer; ++o) {",
            f"    for (long long j = lo; j < hi; ++j) {{ const long long c = j, i = o * inner + c; {loads} out[j] += {body}; }}",
            "  }"]
    return cparallel.parallel_function(name, args, "outer" if layout == "rows" else "inner",
                                       "outer * inner", loop)


MAX_ROW = 1 << 14         # a row kernel keeps one row on the stack


def row_source(name: str, op: Any, dims: list[int], strides: list[list[int]], dtype: np.dtype,
               in_dtypes: list) -> str:
    """A C function running a row op (its row program, printed by backends/rowprint.py)
    on each row of a fused group's value: the row goes to a scratch row on the stack,
    then the program's per-row function writes the output row."""
    ct = storage_ctype(dtype, "c")
    expr, symbols = op.group.expression()
    body = c_expression(expr, {s: f"in{k}" for k, s in enumerate(symbols)}, dtype)
    n = dims[-1]
    nest = _nest(dims, strides, dtype, in_dtypes, ct + "* restrict y = out + {}")
    pad = nest.pad
    lines = [f"  {ct} row[{n}];", *nest.open, *nest.offsets,
             f"{pad}for (long long j = 0; j < {n}LL; ++j) {{ {nest.loads} row[j] = {body}; }}",
             f"{pad}{rowprint.row_call(op.row_op.rows, dtype, 'row', 'y', f'{n}LL')}"]
    return cparallel.parallel_function(name, nest.args + [f"{ct}* restrict out"], f"{nest.items}LL",
                                       f"{int(np.prod(dims))}LL", lines + nest.close)


def row_group_source(name: str, group: Any, dtype: np.dtype) -> str:
    """A C function running a row group (engine/compiler/rows.py) row by row: per row,
    each step in order on the row (full rows in stack arrays, or straight in their
    output buffer when stored; per-row scalars in locals; row sums with 32 running
    sums; column sums accumulated row by row, in row order); stored values are written
    once. Arguments: the inputs, the stored values in order, then (`row_group_scratch`
    elements, when not 0) scratch for column sums.

    Threads share the rows. With column sums they share blocks of rows whose size is
    fixed here (never by the thread count): each block sums its rows into a partial row
    of the scratch, and the partials are added up in block order once all are done, so
    the result is the same on any number of threads."""
    ct = storage_ctype(dtype, "c")
    space = group.space
    n = space[-1]
    rows = int(np.prod(space[:-1]))
    inputs = {v: k for k, v in enumerate(group.inputs)}
    cts = _input_ctypes([v.dtype for v in group.inputs], dtype, len(group.inputs))
    stored = {v: q for q, v in enumerate(group.stored)}
    args = []
    for k in range(len(group.inputs)):
        args += [f"const {cts[k]}* restrict p{k}", f"long long n{k}"]
    args += [f"{ct}* restrict out{q}" for q in range(len(group.stored))]
    local = {s.out: m for m, s in enumerate(group.steps)}
    colsums = [m for m, st in enumerate(group.steps) if st.kind == "colsum"]
    block, blocks = _row_blocks(group)
    if blocks > 1 and colsums:
        args.append(f"{ct}* restrict scratch")
    lines = [f"  {ct} f{m}[{n}];" for m, st in enumerate(group.steps)
             if value_kind(st.out.shape, space) == "full" and st.out not in stored]
    lines.append("  for (long long b = lo; b < hi; ++b) {")
    for q, m in enumerate(colsums):          # column sums: one running row each per block
        target = f"scratch + (b * {len(colsums)}LL + {q}LL) * {n}LL" if blocks > 1 else f"out{stored[group.steps[m].out]}"
        lines += [f"  {ct}* restrict c{m} = {target};",
                  f"  for (long long j = 0; j < {n}LL; ++j) c{m}[j] = 0;"]
    end = f"(b + 1) * {block}LL < {rows}LL ? (b + 1) * {block}LL : {rows}LL"
    lines.append(f"  for (long long r = b * {block}LL; r < ({end}); ++r) {{")
    lines.append(f"    const long long base = r * {n}LL;")
    for m, st in enumerate(group.steps):
        if value_kind(st.out.shape, space) == "full" and st.out in stored:
            lines.append(f"    {ct}* restrict f{m} = out{stored[st.out]} + base;")

    def access(v: Value, j: str) -> str:
        if v in local:
            m = local[v]
            return f"f{m}[{j}]" if value_kind(v.shape, space) == "full" else f"s{m}"
        k, kind = inputs[v], value_kind(v.shape, space)
        period = int(np.prod(v.shape[:-1])) if v.shape else 1
        read = {"full": f"p{k}[base + {j}]", "rowscalar": f"p{k}[r]", "col": f"p{k}[{j}]",
                "scalar": f"p{k}[0]", "tile": f"p{k}[(r % {period}LL) * {n}LL + {j}]"}[kind]
        return f"(({ct}){read})"

    for m, st in enumerate(group.steps):
        expr, symbols = st.group.expression()
        if st.kind == "sum":
            names = {sym: access(v, "jj") for sym, v in zip(symbols, st.inputs)}
            body = c_expression(expr, names, dtype)
            lines += [f"    {ct} s{m};", "    {",
                      f"      {ct} acc[32] = {{0}};", "      long long j = 0;",
                      f"      for (; j + 32 <= {n}LL; j += 32)",
                      f"        for (int l = 0; l < 32; ++l) {{ const long long jj = j + l; acc[l] += {body}; }}",
                      "      for (int w = 16; w > 0; w /= 2)",
                      "        for (int l = 0; l < w; ++l) acc[l] += acc[l + w];",
                      f"      {ct} tail = 0;",
                      f"      for (; j < {n}LL; ++j) {{ const long long jj = j; tail += {body}; }}",
                      f"      s{m} = acc[0] + tail;", "    }"]
        elif st.kind == "rowop":          # the op's per-row function, on rows in hand
            def pointer(v: Value) -> str:
                if v in local:
                    return f"f{local[v]}"
                return f"p{inputs[v]} + base" if value_kind(v.shape, space) == "full" else f"p{inputs[v]}"
            prog = st.row_op.rows
            params = tuple(c_expression(sympy.Float(st.params[str(p)], 30), {}, dtype) for p in prog.params)
            lines.append("    " + rowprint.row_call(prog, dtype, pointer(st.inputs[0]), f"f{m}", f"{n}LL",
                                                    tuple(pointer(c) for c in st.inputs[1:]), params))
            continue
        elif st.kind == "colsum":
            names = {sym: access(v, "j") for sym, v in zip(symbols, st.inputs)}
            lines.append(f"    for (long long j = 0; j < {n}LL; ++j) c{m}[j] += "
                         f"{c_expression(expr, names, dtype)};")
            continue
        elif value_kind(st.out.shape, space) == "full":
            names = {sym: access(v, "j") for sym, v in zip(symbols, st.inputs)}
            lines.append(f"    for (long long j = 0; j < {n}LL; ++j) f{m}[j] = "
                         f"{c_expression(expr, names, dtype)};")
        else:
            names = {sym: access(v, "0") for sym, v in zip(symbols, st.inputs)}
            lines.append(f"    const {ct} s{m} = {c_expression(expr, names, dtype)};")
        if st.out in stored and value_kind(st.out.shape, space) != "full":
            lines.append(f"    out{stored[st.out]}[r] = s{m};")
    lines += ["  }", "  }"]
    after = []
    if blocks > 1:
        for q, m in enumerate(colsums):       # the blocks' partial sums, in block order
            out = f"out{stored[group.steps[m].out]}"
            after += [f"for (long long j = 0; j < {n}LL; ++j) {out}[j] = 0;",
                      f"for (long long b = 0; b < {blocks}LL; ++b)",
                      f"  for (long long j = 0; j < {n}LL; ++j) {out}[j] += scratch[(b * {len(colsums)}LL + {q}LL) * {n}LL + j];"]
    return cparallel.parallel_function(name, args, f"{blocks}LL", f"{rows * n}LL", lines, after=after)


def _row_blocks(group: Any) -> tuple[int, int]:
    """(rows per block, blocks) of a row group's split across threads: single rows, or,
    with column sums, blocks of about CHUNK elements (a size that never depends on the
    thread count: it decides the order in which column sums are added)."""
    n, rows = group.space[-1], int(np.prod(group.space[:-1]))
    block = max(1, CHUNK // n) if any(st.kind == "colsum" for st in group.steps) else 1
    return block, -(-rows // block)


def row_group_scratch(group: Any) -> int:
    """Elements of scratch a row group's kernel needs for its blocks' partial column sums."""
    block, blocks = _row_blocks(group)
    colsums = sum(st.kind == "colsum" for st in group.steps)
    return blocks * colsums * group.space[-1] if blocks > 1 else 0


def plan_row_group(group: Any) -> Planned | None:
    """A row group as one C kernel, or None when it cannot be printed."""
    dtype = group.steps[0].out.dtype
    if not available() or dtype not in (np.dtype(np.float32), np.dtype(np.float64)) \
            or not all(friendly(op) for st in group.steps for op, _ in st.group.steps):
        return None
    try:
        src = row_group_source("k", group, dtype)
    except (CPrintError, TypeError, ValueError, KeyError):
        return None
    src, name = _named(src, "k", "rows")
    out = group.stored[0] if group.stored else group.steps[-1].out
    programs = {st.row_op.rows.name: st.row_op.rows for st in group.steps if st.kind == "rowop"}
    try:
        helpers = tuple(rowprint.c_row_function(p, dtype) for p in programs.values())
    except CPrintError:
        return None
    return Planned(src, name, (), ["same"] * len(group.inputs),
                   [int(np.prod(v.shape)) for v in group.inputs], group.space, out.shape, dtype,
                   helpers=(rowprint.c_helpers(dtype),) + helpers if helpers else (),
                   n_out=len(group.stored), scratch=row_group_scratch(group))


@dataclass
class Planned:
    """A kernel to build: its C source, function name, and how to call it."""
    source: str
    name: str
    head: tuple                # leading integer arguments (n, or outer and inner)
    modes: list                # per input: how it is indexed (None: materialise)
    sizes: list                # per input: its element count
    full_shape: tuple          # the shape inputs broadcast to
    out_shape: tuple
    dtype: np.dtype
    helpers: tuple = ()        # static C functions it calls (row programs' per-row functions)
    n_out: int | None = None   # a row group: called as run(*inputs, *outputs)
    scratch: int = 0           # a row group: elements of scratch for its column sums

    def runner(self, cfn: Any) -> Callable[..., Any]:
        if self.n_out is not None:
            return self._group_runner(cfn)
        cfn.restype = None
        cfn.argtypes = ([ctypes.c_longlong] * len(self.head)
                        + [ctypes.c_void_p, ctypes.c_longlong] * len(self.modes) + [ctypes.c_void_p])
        head = tuple(self.head)
        full, size = self.full_shape, int(np.prod(self.full_shape))
        modes, sizes, shape, dtype = self.modes, self.sizes, self.out_shape, self.dtype

        def run(*arrays: Any, out: Any = None) -> Any:
            if out is None:
                out = np.empty(shape, dtype)
            elif not out.flags.c_contiguous:         # e.g. a donated buffer that is a view
                out[...] = run(*arrays)
                return out
            args = list(head)
            keep = []
            for a, mode, n in zip(arrays, modes, sizes):
                if mode is None:
                    a, n = np.ascontiguousarray(np.broadcast_to(a, full)), size
                    keep.append(a)                   # alive until the call returns
                elif type(a) is not np.ndarray or not a.flags.c_contiguous:
                    a = np.ascontiguousarray(a)
                    keep.append(a)
                args += (address(a), n)
            args.append(address(out))
            cfn(*args)
            return out
        return run

    def _group_runner(self, cfn: Any) -> Callable[..., Any]:
        """run(*inputs, *outputs): every output preallocated and C-contiguous."""
        cfn.restype = None
        n_in = len(self.modes)
        cfn.argtypes = ([ctypes.c_void_p, ctypes.c_longlong] * n_in
                        + [ctypes.c_void_p] * (self.n_out + (self.scratch > 0)))
        sizes, scratch, dtype = self.sizes, self.scratch, self.dtype
        local = threading.local()           # scratch per thread: a C call ends on its thread

        def run(*arrays: Any) -> None:
            outs = arrays[n_in:]
            if not all(o.flags.c_contiguous for o in outs):      # e.g. a donated view
                temps = [np.empty(o.shape, o.dtype) for o in outs]
                run(*arrays[:n_in], *temps)
                for o, t in zip(outs, temps):
                    o[...] = t
                return
            args = []
            keep = []
            for a, n in zip(arrays[:n_in], sizes):
                if type(a) is not np.ndarray or not a.flags.c_contiguous:
                    a = np.ascontiguousarray(a)
                    keep.append(a)                   # alive until the call returns
                args += (address(a), n)
            args += [address(o) for o in outs]
            if scratch:                              # this thread's: calls never share it
                buf = getattr(local, "scratch", None)
                if buf is None:
                    buf = local.scratch = np.empty(scratch, dtype)
                args.append(address(buf))
            cfn(*args)
        return run


# A kernel replacing at least MIN_CALLS whole-array NumPy calls (each op's `cost`)
# pays for its ctypes call at any size.
MIN_CALLS = 3


_REDUCTION_CALLS = 3        # np.sum over an axis tuple costs about three ufunc calls


def _eligible(steps: list, inputs: tuple, dtype: np.dtype, size: int, extra_calls: int = 0) -> bool:
    calls = sum(getattr(op, "cost", 1) for op, _ in steps) + extra_calls
    return (available() and (size >= MIN_ELEMENTS or calls >= MIN_CALLS)
            and all(friendly(op) for op, _ in steps)
            and dtype in (np.dtype(np.float32), np.dtype(np.float64))
            and all(isinstance(v, Value) and v.dtype in (dtype, np.dtype(bool)) for v in inputs))


def _named(source: str, placeholder: str, prefix: str) -> tuple[str, str]:
    """The source with its function (and the thread pool's helpers for it) renamed by its hash."""
    name = f"{prefix}_{hashlib.sha1(source.encode()).hexdigest()[:12]}"
    for a, b in ((f"void {placeholder}(", f"void {name}("), (f"{placeholder}_part", f"{name}_part"),
                 (f"struct {placeholder}_args", f"struct {name}_args")):
        source = source.replace(a, b)
    return source, name


def plan_group(group: Any, inputs: tuple, out: Value) -> Planned | None:
    """A fused elementwise group as a C loop nest, or None if not worthwhile or not printable."""
    size = int(np.prod(out.shape))
    if not _eligible(group.steps, inputs, out.dtype, size):
        return None
    dims, strides = loop_nest([v.shape for v in inputs], out.shape)
    try:
        expr, symbols = group.expression()
        src = kernel_source("k", expr, symbols, dims, strides, out.dtype, [v.dtype for v in inputs])
    except (CPrintError, TypeError, ValueError):
        return None
    src, name = _named(src, "k", "k")
    return Planned(src, name, (), ["same"] * len(inputs), [int(np.prod(v.shape)) for v in inputs],
                   out.shape, out.shape, out.dtype)


def plan_reduction(red: Any, inputs: tuple, out: Value) -> Planned | None:
    """A FusedReduction over a leading or trailing block of axes as a C loop, or None."""
    split = red.split()
    if split is None or not _eligible(red.group.steps, inputs, out.dtype, int(np.prod(red.in_shape)),
                                      _REDUCTION_CALLS):
        return None
    outer, inner, layout = split
    nd = len(red.in_shape)
    reduced = nd if red.axis is None else len(red.axis)
    cut = nd - reduced if layout == "rows" else reduced        # the outer axes come first
    modes = [_mode(v.shape, red.in_shape, cut) for v in inputs]
    try:
        expr, symbols = red.group.expression()
        src = reduction_source("r", expr, symbols, [m or "same" for m in modes], out.dtype, layout,
                               [v.dtype for v in inputs])
    except (CPrintError, TypeError, ValueError):
        return None
    src, name = _named(src, "r", "r")
    return Planned(src, name, (outer, inner), modes, [int(np.prod(v.shape)) for v in inputs],
                   red.in_shape, out.shape, out.dtype)


def plan_row(op: Any, inputs: tuple, out: Value) -> Planned | None:
    """A FusedRowOp (softmax / log_softmax of a group, last axis) as a C row kernel."""
    n = out.shape[-1] if out.shape else 0
    if (not 2 <= n <= MAX_ROW or not vector_math()
            or not _eligible(op.group.steps, inputs, out.dtype, int(np.prod(out.shape)), _REDUCTION_CALLS)):
        return None
    dims, strides = loop_nest([v.shape for v in inputs], out.shape, keep_last=True)
    try:
        src = row_source("k", op, dims, strides, out.dtype, [v.dtype for v in inputs])
    except (CPrintError, TypeError, ValueError):
        return None
    src, name = _named(src, "k", "row")
    helpers = (rowprint.c_helpers(out.dtype), rowprint.c_row_function(op.row_op.rows, out.dtype))
    return Planned(src, name, (), ["same"] * len(inputs), [int(np.prod(v.shape)) for v in inputs],
                   out.shape, out.shape, out.dtype, helpers=helpers)


def build(planned: list[Planned]) -> list[Callable[..., Any]] | None:
    """Compile every planned kernel of a program in one translation unit (one compiler
    run), and return their runners; None if the compiler fails."""
    if not planned:
        return []
    unique = {p.name: p.source for p in planned}
    helpers = "".join(dict.fromkeys(h for p in planned for h in p.helpers))
    try:
        lib = cparallel.build(rowprint.C_HEADER + helpers + "\n".join(unique.values()), vector=vector_math())
    except (RuntimeError, OSError):
        return None
    return [p.runner(getattr(lib, p.name)) for p in planned]
