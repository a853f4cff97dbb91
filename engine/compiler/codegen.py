"""Code generation: one Python function per program, calling the backend directly.

The generated source (readable via `Compiled.source`) touches no Tensor and no
tape: it takes raw arrays and returns raw arrays. Where the backend's function
can write into a given array (`out=`: NumPy/CuPy ufuncs and matmul), values get
buffers from a liveness-based plan, reused across calls; fused elementwise
groups run as a chain of in-place ufunc calls over one or two temporaries.
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Any

import numpy as np

from backends.cprint import c_expression, expression_kernel_source
from ops.elementwise import ElementwiseOp

from . import ckernels
from .bands import BandedMatmul
from .ir import Node, Program, Value
from .passes import FusedElementwise, FusedReduction, FusedRowOp, single_group
from .rows import find_row_groups, value_kind

_ALIASING_KINDS = {"movement", "index"}      # may return views of an input


def literal(value: Any, ns: dict) -> str:
    """Source text standing for the constant `value` in generated code: a literal for
    finite plain numbers, bools, None and tuples of them (the repr of these builtins is
    exactly their value), else a name bound to the object itself in the namespace `ns`.
    No other object's text (a string, a user's number subclass with its own repr, an
    odd integer in a shape) ever becomes code."""
    if _plain(value):
        return repr(value)
    key = f"_o{len(ns)}"                  # namespace only grows: a fresh name every time
    ns[key] = value
    return key


def _plain(value: Any) -> bool:
    kind = type(value)
    if kind is tuple:
        return all(_plain(v) for v in value)
    return kind is int or kind is bool or value is None or (kind is float and math.isfinite(value))


def _comment(text: str) -> str:
    """`text` for a comment in generated code: on one line whatever it holds."""
    return text if text.isprintable() else ascii(text)


def _writes_out(fn: Any) -> bool:
    """Can `fn` write into a given array (`out=`)? Ufuncs can; other backend functions
    say so with a `writes_out` attribute."""
    return isinstance(fn, np.ufunc) or type(fn).__name__ == "ufunc" or getattr(fn, "writes_out", False)


def _ufunc(op: Any, backend: Any, node_inputs: tuple, out: Value) -> Any:
    """The backend's out=-capable function for an elementwise node, or None."""
    if not isinstance(op, ElementwiseOp):
        return None
    fn = op.impl(backend)
    if not _writes_out(fn):
        return None
    for a in node_inputs:
        if isinstance(a, Value) and a.dtype != out.dtype:
            return None
    return _at_size(fn, int(np.prod(out.shape)))


def _at_size(fn: Any, size: int) -> Any:
    """`fn` as bound for a fixed size: a backend function that picks its path by size
    (`for_size`) decides it once here instead of at every call."""
    for_size = getattr(fn, "for_size", None)
    return fn if for_size is None else for_size(size)


def _group_ufuncs(group: FusedElementwise, backend: Any, out: Value) -> list | None:
    fns = []
    size = int(np.prod(out.shape))     # every step's result has the group's shape at most
    for op, _ in group.steps:
        fn = op.impl(backend) if isinstance(op, ElementwiseOp) else None
        if fn is None or not _writes_out(fn) or (op.float_result and out.dtype.kind != "f"):
            return None
        fns.append(_at_size(fn, size))
    return fns


def cuda_group_source(group: FusedElementwise, dtype: Any,
                      in_dtypes: list | None = None) -> tuple[str, str, str]:
    """(in_params, out_params, body) of a CUDA elementwise kernel computing a fused
    group, printed from its sympy expression by the same printer as the op kernels."""
    expr, symbols = group.expression()
    return expression_kernel_source(expr, symbols, dtype, in_dtypes=in_dtypes)


def gpu_group_kernel(group: FusedElementwise, inputs: tuple, out: Value,
                     backend: Any) -> tuple[Any, str] | None:
    """A fused group as one `cupy.ElementwiseKernel` (CuPy broadcasts the inputs)."""
    make = getattr(backend, "elementwise_kernel", None)
    if make is None or any(not isinstance(v, Value) or v.dtype not in (out.dtype, np.dtype(bool))
                           for v in inputs):
        return None
    in_params, out_params, body = cuda_group_source(group, out.dtype, [v.dtype for v in inputs])
    kernel = make(in_params, out_params, body, "engine_fused")

    def run(*arrays: Any, out: Any = None) -> Any:
        return kernel(*arrays) if out is None else kernel(*arrays, out)
    return run, body


def cuda_reduction_source(red: FusedReduction, dtype: Any) -> tuple[str, str, str, str]:
    """(in_params, out_params, map_expr, identity) of a `cupy.ReductionKernel` summing a
    fused group: the group's expression is the map, `a + b` the reduction."""
    expr, symbols = red.group.expression()
    dt = np.dtype(dtype)
    map_expr = c_expression(expr, {s: f"in{i}" for i, s in enumerate(symbols)}, dt)
    in_params = ", ".join(f"{dt.name} in{i}" for i in range(len(symbols)))
    return in_params, f"{dt.name} out0", map_expr, "0"


def cuda_reduction_standalone(name: str, red: FusedReduction, dtype: Any) -> str:
    """A self-contained CUDA kernel (one thread per output row) computing the same sum
    as the ReductionKernel, so tests can compile the printed map with nvcc."""
    in_params, _, map_expr, _ = cuda_reduction_source(red, dtype)
    dt = np.dtype(dtype)
    ct = {"float32": "float", "float64": "double"}[dt.name]
    n = red.group.n_inputs
    args = ", ".join([f"const {ct}* in{i}_p" for i in range(n)] + [f"{ct}* out_p", "long long outer",
                                                                    "long long inner"])
    loads = " ".join(f"const {ct} in{i} = in{i}_p[o * inner + j];" for i in range(n))
    return (f'extern "C" __global__ void {name}({args}) {{\n'
            f"  long long o = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n"
            f"  if (o >= outer) return;\n  {ct} acc = 0;\n"
            f"  for (long long j = 0; j < inner; ++j) {{ {loads} acc += {map_expr}; }}\n"
            f"  out_p[o] = acc;\n}}\n")


def gpu_reduction_kernel(red: FusedReduction, inputs: tuple, out: Value,
                         backend: Any) -> tuple[Any, str] | None:
    """A fused reduction as one `cupy.ReductionKernel` over the reduced axes."""
    make = getattr(backend, "reduction_kernel", None)
    if make is None or any(not isinstance(v, Value) or v.dtype != out.dtype for v in inputs):
        return None
    in_params, out_params, map_expr, identity = cuda_reduction_source(red, out.dtype)
    kernel = make(in_params, out_params, map_expr, "a + b", "out0 = a", identity, "engine_fused_sum")

    def run(*arrays: Any, out: Any = None) -> Any:
        res = kernel(*arrays, axis=red.axis, keepdims=red.keepdims)
        if out is None:
            return res
        out[...] = res
        return out
    return run, map_expr


def _donations_stream(group: Any, donated: dict, roots: dict) -> bool:
    """Can the group write its donated values straight into the buffers they replace?
    Only if it reads each such buffer, if at all, as whole rows in its own layout (row
    r is read before row r is written, and no other row is touched)."""
    targets = {donated[v] for v in group.stored if v in donated}
    whole = {s.inputs[0] for s in group.steps if s.kind == "rowop"}    # may be reread after y is written
    return all(value_kind(x.shape, group.space) == "full" and roots.get(x, x) is x and x not in whole
               for x in group.inputs if roots.get(x, x) in targets)


def _row_group_lines(group: Any, runner: Any, k: int, names: dict, name: Any, slots: dict, ns: dict,
                     dying: list, donated: dict) -> list[str]:
    """One call running a row group where its last member stands: its stored values get
    their planned buffers, the buffers they replace (donated) or new arrays; then names
    dying inside it are dropped."""
    ns[f"_rows{k}"] = runner
    lines = []
    for v in group.stored:
        buf = f"_b[{slots[v]}]" if v in slots else (
            names[donated[v]] if v in donated else f"np.empty({literal(v.shape, ns)}, {literal(v.dtype, ns)})")
        lines.append(f"    {names[v]} = {buf}")
    ops_ = ",".join(s.group.name if s.kind == "map" else s.row_op.name if s.kind == "rowop"
                    else f"sum<{s.group.name}>" for s in group.steps)
    args = [name(v) for v in group.inputs] + [names[v] for v in group.stored]
    lines.append(f"    _rows{k}({', '.join(args)})  # C: {_comment(f'rows[{ops_}]')}")
    inside = {s.out for s in group.steps if s.out not in group.stored}     # never named
    gone = [v for v in dying if v not in inside]
    if gone:
        lines.append(f"    del {', '.join(names[v] for v in gone)}")
    return lines


def _dead_after(program: Program) -> dict:
    """{node index: the node values last read there (or never read: made there)}: the
    generated code drops their names then, so an array no planned buffer holds is freed
    as in eager mode instead of living until the program returns (a view keeps its base
    alive by itself)."""
    keep = {o for o in program.outputs if isinstance(o, Value)}
    last: dict = {}
    for i, n in enumerate(program.nodes):
        if n.out not in keep:
            last[n.out] = i
        for a in n.inputs:
            if a in last:
                last[a] = i
    dead: dict = defaultdict(list)
    for v, i in last.items():
        dead[i].append(v)
    return dead


def _transposed_outputs(program: Program) -> dict:
    """{matmul output: (shape, inverse axes)} for matmuls whose one reader transposes
    them (attention heads merged back: (B, H, T, d) -> (B, T, H, d) -> reshape). The
    matmul writes straight into a buffer laid out as the transpose, so the transpose
    is contiguous and the reshape after it a view, not a copy."""
    readers: dict = defaultdict(list)
    for n in program.nodes:
        for a in n.inputs:
            if isinstance(a, Value):
                readers[a].append(n)
    outputs = {o for o in program.outputs if isinstance(o, Value)}
    found = {}
    for n in program.nodes:
        users = readers.get(n.out, [])
        permutation = getattr(users[0].op, "permutation", None) if len(users) == 1 else None
        if getattr(n.op, "contraction", False) and permutation is not None and n.out not in outputs:
            axes = tuple(permutation(users[0].params))
            inverse = tuple(sorted(range(len(axes)), key=lambda i: axes[i]))
            found[n.out] = (tuple(users[0].out.shape), inverse)
    return found


def _aliases(node: Node) -> bool:
    op = node.op
    return getattr(op, "view", False) or getattr(op, "kind", "") in _ALIASING_KINDS or \
        getattr(op, "may_alias", False)


def alias_roots(program: Program) -> dict:
    """{value: the value whose buffer it may share} (views of views included)."""
    root: dict = {}
    for n in program.nodes:
        first = next((a for a in n.inputs if isinstance(a, Value)), None)
        root[n.out] = root.get(first, first) if (_aliases(n) and first is not None) else n.out
    return root


def _last_uses(program: Program, root: dict) -> dict:
    """{buffer root: index of the last node reading it or any of its views}."""
    last_use: dict = {}
    for i, n in enumerate(program.nodes):
        for a in n.inputs:
            if isinstance(a, Value):
                last_use[root.get(a, a)] = i
    return last_use


def plan_memory(program: Program, capable: set, elementwise: set = frozenset(),
                read_until: dict | None = None, root: dict | None = None) -> tuple[dict, dict]:
    """Assign the values of `capable` nodes to reusable byte buffers (slots).

    A slot is reused only after the last use of every value that may alias it
    (views of views included); values that escape as outputs get no slot. Slots
    hold bytes, not shapes: a value takes the smallest free slot large enough, or
    grows the largest free one, so values of any shape and dtype share memory and
    the planned total stays near the peak of live bytes. The value of an
    `elementwise` node (each element written after its own inputs are read) takes
    over the slot of an input read for the last time there, with the same shape and
    dtype and no other view of it among the node's inputs: computed in place.
    `read_until` {value: node index} keeps values alive at least that long (a row
    group reads its inputs where its last member stands).
    Returns (value -> view index, statistics with `views` [(slot, shape, dtype)] and
    `slot_bytes`).
    """
    root = alias_roots(program) if root is None else root
    escaping = {root.get(o, o) for o in program.outputs if isinstance(o, Value)}
    last_use = _last_uses(program, root)
    for v, i in (read_until or {}).items():
        r = root.get(v, v)
        last_use[r] = max(last_use.get(r, -1), i)
    free: list = []                     # free slot ids
    release: dict = defaultdict(list)
    slot_bytes: list = []
    views: list = []
    index: dict = {}
    for i, n in enumerate(program.nodes):
        free.extend(release.pop(i - 1, []))
        if n.out not in capable or n.out in escaping or n.out not in last_use:
            continue
        need = _nbytes(n.out.shape, n.out.dtype)
        fits = [s for s in free if slot_bytes[s] >= need]
        donor = _in_place_donor(n, i, index, root, last_use) if n.out in elementwise else None
        if donor is not None:
            slot = views[index[donor]][0]
            release[i].remove(slot)          # the slot lives on as this node's value
        elif fits:
            slot = min(fits, key=lambda s: slot_bytes[s])
        elif free:
            slot = max(free, key=lambda s: slot_bytes[s])
            slot_bytes[slot] = need
        else:
            slot = len(slot_bytes)
            slot_bytes.append(need)
        if slot in free:
            free.remove(slot)
        index[n.out] = len(views)
        views.append((slot, n.out.shape, n.out.dtype))
        release[last_use[n.out]].append(slot)
    stats = dict(buffers=len(slot_bytes), planned_values=len(views), reused=len(views) - len(slot_bytes),
                 buffer_bytes=int(sum(slot_bytes)))
    return index, dict(stats, views=views, slot_bytes=slot_bytes)


def _in_place_donor(n: Node, i: int, index: dict, root: dict, last_use: dict) -> Value | None:
    """An input of node `i` whose slot its output can reuse in place (see plan_memory)."""
    values = [a for a in n.inputs if isinstance(a, Value)]
    for a in values:
        if (a in index and root.get(a, a) is a and last_use.get(a) == i and a.shape == n.out.shape
                and a.dtype == n.out.dtype
                and all(b is a or root.get(b, b) is not a for b in values)):
            return a
    return None


def _nbytes(shape: tuple, dtype: Any) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _donations(program: Program, capable: dict, root: dict) -> dict:
    """Writeback outputs computed straight into the buffer they replace: {output value:
    the input or capture it overwrites}. Only elementwise writers (each element read
    before it is written), only after the old value's last use (its views included),
    and never when the old value is itself returned."""
    last_use = _last_uses(program, root)
    position = {n.out: i for i, n in enumerate(program.nodes)}
    outputs = [o for o in program.outputs if isinstance(o, Value)]
    returned = {root.get(o, o) for o in outputs}
    donated: dict = {}
    for index, src in program.meta.get("donations", {}).items():
        out = program.outputs[index]
        kind = capable.get(out, ("",))[0]
        if (kind in ("ufunc", "group", "ckernel") and outputs.count(out) == 1
                and out.shape == src.shape and out.dtype == src.dtype and src not in returned
                and last_use.get(src, -1) <= position[out] and src not in donated.values()):
            donated[out] = src
    return donated


class Generated:
    """The compiled function with its namespace, buffers and source.

    The planned buffers are a set carved once and reused by later calls; concurrent
    calls (threads) each take a set of their own from a pool, so a program is
    re-entrant and no call writes into buffers another call is reading."""

    def __init__(self, source: str, namespace: dict, views: list, slot_bytes: list, backend: Any,
                 stats: dict) -> None:
        self.source = source
        self.namespace = namespace
        self.views = views
        self.slot_bytes = slot_bytes
        self.backend = backend
        self.stats = stats
        self._pool: list[list] = []           # buffer sets not in use (list ops are atomic)
        exec(compile(source, "<engine.jit>", "exec"), namespace)
        self.fn = namespace["program"]

    def _carve(self) -> list:
        """One byte buffer per slot, and each planned value as a typed view into its slot."""
        slots = [self.backend.full((max(n, 1),), 0, np.uint8) for n in self.slot_bytes]
        return [slots[s][:_nbytes(shape, dtype)].view(dtype).reshape(shape)
                for s, shape, dtype in self.views]

    def release(self) -> None:
        """Drop the idle buffer sets (a later call carves new ones); a set in use by a
        running call stays with that call."""
        self._pool.clear()

    def __call__(self, inputs: list, captures: list) -> list:
        pool = self._pool
        buffers = pool.pop() if pool else self._carve()
        try:
            return self.fn(inputs, captures, buffers)
        finally:
            pool.append(buffers)


def generate(program: Program, backend: Any, plan: bool = True) -> Generated:
    ns: dict = {"_consts": [], "np": np}
    lines: list[str] = []
    names: dict = {}

    def name(v: Any) -> str:
        return names[v] if isinstance(v, Value) else literal(v, ns)

    for i, v in enumerate(program.inputs):
        names[v] = f"x{v.id}"
    for v, _ in program.captures:
        names[v] = f"c{v.id}"
    for j, (v, arr) in enumerate(program.constants.items()):
        names[v] = f"k{v.id}"
        ns["_consts"].append(arr)
        lines.append(f"    k{v.id} = _consts[{j}]")

    capable: dict = {}
    kernels: list[str] = []
    planned: dict = {}
    if backend.name == "cpu":
        for n in program.nodes:
            if isinstance(n.op, FusedElementwise):
                k = ckernels.plan_group(n.op, n.inputs, n.out)
            elif isinstance(n.op, FusedReduction):
                k = ckernels.plan_reduction(n.op, n.inputs, n.out)
            elif isinstance(n.op, FusedRowOp):
                k = ckernels.plan_row(n.op, n.inputs, n.out)
            elif isinstance(n.op, ElementwiseOp) and n.out.dtype.kind == "f":
                k = ckernels.plan_group(*single_group(n), n.out)
            elif getattr(n.op, "reduction", None) == "sum" and isinstance(n.inputs[0], Value):
                # A plain sum as a reduction of the empty group (vectorised C loop).
                plain = FusedReduction(FusedElementwise([], 1), n.params["axis"], n.params["keepdims"],
                                       n.inputs[0].shape)
                k = ckernels.plan_reduction(plain, n.inputs, n.out)
            else:
                continue
            if k is not None:
                planned[n.out] = k
    roots = alias_roots(program)
    row_groups = {}                     # last member index -> RowGroup
    if backend.name == "cpu" and plan:
        for g in find_row_groups(program, roots):
            k = ckernels.plan_row_group(g)
            if k is not None:
                row_groups[g.members[-1]] = g
                planned[("rows", g.members[-1])] = k
    runners = ckernels.build(list(planned.values())) or []
    c_runner = dict(zip(planned, runners))
    kernels += [k.source for v, k in planned.items() if v in c_runner]
    for n in program.nodes:
        if n.out in c_runner:
            capable[n.out] = ("ckernel", c_runner[n.out])
        elif isinstance(n.op, FusedElementwise):
            compiled = gpu_group_kernel(n.op, n.inputs, n.out, backend) if backend.name != "cpu" else None
            fns = _group_ufuncs(n.op, backend, n.out)
            if compiled is not None:
                capable[n.out] = ("ckernel", compiled[0])
                kernels.append(compiled[1])
            elif fns is not None:
                capable[n.out] = ("group", fns)
        elif isinstance(n.op, FusedReduction):
            compiled = gpu_reduction_kernel(n.op, n.inputs, n.out, backend) if backend.name != "cpu" else None
            if compiled is not None:
                capable[n.out] = ("ckernel", compiled[0])
                kernels.append(compiled[1])
        elif _ufunc(n.op, backend, n.inputs, n.out) is not None:
            capable[n.out] = ("ufunc", _ufunc(n.op, backend, n.inputs, n.out))
        elif isinstance(n.op, BandedMatmul):
            capable[n.out] = ("matmul", functools.partial(n.op.run, backend))
        elif getattr(n.op, "contraction", False) and hasattr(backend, "matmul_out"):
            capable[n.out] = ("matmul", backend.matmul_out)
    donated = _donations(program, capable, roots) if plan else {}
    row_groups = {last: g for last, g in row_groups.items() if ("rows", last) in c_runner
                  and _donations_stream(g, donated, roots)}
    in_group = {i: last for last, g in row_groups.items() for i in g.members}
    locals_ = {s.out for g in row_groups.values() for s in g.steps if s.out not in g.stored}
    members_ = {s.out for g in row_groups.values() for s in g.steps}
    read_until = {v: last for last, g in row_groups.items() for v in g.inputs}
    elementwise = {n.out for n in program.nodes if capable.get(n.out, ("",))[0] in ("ufunc", "group", "ckernel")
                   and (isinstance(n.op, (FusedElementwise, ElementwiseOp)))
                   and n.out not in members_}
    slots, mem = plan_memory(program, set(capable) - locals_, elementwise, read_until, roots) if plan else \
        ({}, dict(buffers=0, views=[], slot_bytes=[]))

    group_temps: list = []
    dead_after = _dead_after(program)
    transposed = _transposed_outputs(program) if getattr(backend, "array_methods", False) else {}
    deferred: list = []                 # names dying inside a row group, dropped after it
    for k, n in enumerate(program.nodes):
        out = f"v{n.out.id}"
        names[n.out] = out
        args = [name(a) for a in n.inputs]
        dest = f"_b[{slots[n.out]}]" if n.out in slots else \
            (names[donated[n.out]] if n.out in donated else None)
        kind = capable.get(n.out)
        if k in in_group:
            deferred += dead_after.pop(k, [])
            if in_group[k] == k:
                lines += _row_group_lines(row_groups[k], c_runner[("rows", k)], k, names, name, slots, ns,
                                          deferred, donated)
                deferred = []
            continue
        if kind and kind[0] == "ckernel":
            ns[f"_f{k}"] = kind[1]
            arrays = [name(a) for a in n.inputs if isinstance(a, Value)]   # constants live in the kernel
            lines.append(f"    {out} = _f{k}({', '.join(arrays)}{', out=' + dest if dest else ''})  # C: {_comment(n.op.name)}")
        elif kind and kind[0] == "group":
            lines += _group_lines(n, kind[1], args, out, dest, ns, group_temps, k)
        elif kind and kind[0] == "ufunc":
            ns[f"_f{k}"] = kind[1]
            lines.append(f"    {out} = _f{k}({', '.join(args)}{', out=' + dest if dest else ''})")
        elif kind and kind[0] == "matmul":
            ns[f"_f{k}"] = kind[1]
            if dest and n.out in transposed:          # write in the layout its reader wants
                shape, inverse = transposed[n.out]
                dest = f"{dest}.reshape({literal(shape, ns)}).transpose({literal(inverse, ns)})"
            lines.append(f"    {out} = _f{k}({', '.join(args)}, {dest or 'None'})")
        elif getattr(backend, "array_methods", False) and getattr(n.op, "method", None):
            (param,) = n.params.values()          # a method op has exactly one parameter
            lines.append(f"    {out} = {args[0]}.{n.op.method}({literal(param, ns)})")
        else:
            ns[f"_f{k}"] = functools.partial(n.op.forward, backend, **n.params)
            lines.append(f"    {out} = _f{k}({', '.join(args)})")
        if k in dead_after:
            lines.append(f"    del {', '.join(names[v] for v in dead_after[k])}")
    ns["_temps"] = group_temps
    ins = ", ".join(names[v] for v in program.inputs)
    caps = ", ".join(names[v] for v, _ in program.captures)
    head = ["def program(inputs, captures, _b):",
            f"    ({ins}{',' if program.inputs else ''}) = inputs",
            f"    ({caps}{',' if program.captures else ''}) = captures"]
    ret = f"    return [{', '.join(name(o) for o in program.outputs)}]"
    source = "\n".join(head + lines + [ret]) + "\n"
    stats = dict(mem, temps=len(group_temps), c_kernels=len(kernels), donated=len(donated))
    stats.pop("views", None)
    stats.pop("slot_bytes", None)
    generated = _with_temps(source, ns, mem, group_temps, backend, stats)
    generated.kernel_sources = kernels
    return generated


def _with_temps(source: str, ns: dict, mem: dict, temps: list, backend: Any, stats: dict) -> Generated:
    """Group temporaries live in the same buffer list, after the planned values, each
    in a slot of its own."""
    offset = len(mem["views"])
    source = source.replace("_T[", "_b[").replace("_TOFF", str(offset))
    first = len(mem["slot_bytes"])
    views = mem["views"] + [(first + k, shape, dtype) for k, (shape, dtype) in enumerate(temps)]
    slot_bytes = mem["slot_bytes"] + [_nbytes(shape, dtype) for shape, dtype in temps]
    return Generated(source, ns, views, slot_bytes, backend, stats)


def _group_lines(n: Node, fns: list, args: list, out: str, dest: str | None, ns: dict,
                 temps: list, k: int) -> list[str]:
    """A fused group as in-place ufunc calls: each step writes over a dead operand's
    buffer when it can, else into a group temporary; the last step into `dest`."""
    group: FusedElementwise = n.op
    lines = []
    step_loc: list[str] = []
    owned: list[bool] = []             # does step j's value live in a temp we may overwrite?
    free_temps: list[str] = []
    local_temps = 0
    for j, ((op, sargs), fn) in enumerate(zip(group.steps, fns)):
        ns[f"_g{k}_{j}"] = fn
        operands = []
        reuse = None
        for a in sargs:
            if isinstance(a, tuple) and a[0] == "step":
                operands.append(step_loc[a[1]])
                if owned[a[1]] and reuse is None:
                    reuse = step_loc[a[1]]
                elif owned[a[1]]:
                    free_temps.append(step_loc[a[1]])
            elif isinstance(a, tuple):
                operands.append(args[a[1]])
            else:
                operands.append(literal(a, ns))
        last = j == len(group.steps) - 1
        if last:
            target = dest
            if reuse is not None:
                free_temps.append(reuse)
        elif reuse is not None:
            target = reuse
        elif free_temps:
            target = free_temps.pop()
        else:
            target = f"_T[_TOFF+{len(temps) + local_temps}]"
            local_temps += 1
        call = f"_g{k}_{j}({', '.join(operands)}{', out=' + target if target else ''})"
        loc = out if last else f"t{k}_{j}"
        lines.append(f"    {loc} = {call}")
        step_loc.append(loc)
        owned.append(not last)
    temps.extend([(n.out.shape, n.out.dtype)] * local_temps)
    return lines
