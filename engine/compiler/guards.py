"""Guards: what a traced program assumed about the Python state it read, checked at each call.

A trace reads tensors it reached through Python objects (closure cells, globals,
module attributes, list and dict entries, optimizer state) and Python values next
to them (module flags such as `training`, sizes, options). `find_sources` walks
those objects from the function's roots and records how each captured tensor was
reached (a path of attribute, item and cell steps). `build_guard` turns the paths
into one generated function of straight-line `is` comparisons:

- every object on a path to a captured tensor is the same object as when traced
  (a rebound parameter, a swapped submodule, a replaced list element, a reloaded
  optimizer state dict or step tensor fail here);
- every container or object on such a path has the same entries: its length, and
  each entry the same object (tensors), the same type and value (bool, int, str,
  None: `module.training` set directly, a parameter added after tracing), or, for
  a tensor the trace did not read, the same None-ness of its `.grad`;
- captured tensors keep their shape, dtype, device and requires_grad, and the
  None-ness of `.grad` the trace started from (backward accumulates into an
  existing .grad, so a program traced without one cannot run with one);
- tensors whose values the trace read on the host (`.item()`, `bool()`) keep the
  version they had (their value was frozen into the program).

Python floats are not guarded: a float read while tracing is frozen into the
program (keep values that change between calls in tensors, e.g. a tensor lr).
"""
from __future__ import annotations

import types
from collections import deque
from typing import Any, Callable

from ..tensor import Tensor

_LIBRARY = ("engine", "nn", "ops", "backends", "numpy", "sympy", "builtins", "typing",
            "functools", "collections", "threading", "contextlib", "math")
_VALUE_TYPES = (bool, int, str, bytes, type(None))
_MAX_OBJECTS = 200_000           # stop walking huge object graphs (what is found is guarded)


def _code_names(code: types.CodeType, out: set) -> None:
    out.update(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            _code_names(c, out)


class Root:
    """Where a trace starts reading state: a closure cell, a globals dict (only the
    names the code reads), or an object (bound self, a static argument, a callable)."""

    __slots__ = ("obj", "kind", "names")

    def __init__(self, obj: Any, kind: str, names: tuple = ()) -> None:
        self.obj, self.kind, self.names = obj, kind, names


def find_sources(fn: Callable, statics: list, targets: set | None = None) -> tuple[list, dict]:
    """Walk from `fn`'s roots (closure cells, globals it names, bound self, static
    arguments, and the same for the user functions and methods reached) to the
    tensors whose ids are in `targets`.

    Returns (roots, {id: (root index, steps)}), the shortest path to each target and
    to each object with attributes (a module, an optimizer: a trace reads their flags
    even where it captures no tensor, e.g. `training`), or to every tensor found when
    `targets` is None;
    a step is ("cell", None), ("item", key) or ("attr", name)."""
    roots: list[Root] = []
    paths: dict = {}
    seen: set = set()
    queue: deque = deque()
    names_read: set = set()
    functions_seen: set = set()

    def add_root(root: Root) -> None:
        roots.append(root)
        i = len(roots) - 1
        if root.kind == "cell":
            try:
                queue.append((root.obj.cell_contents, i, (("cell", None),)))
            except ValueError:                      # an empty cell
                pass
        elif root.kind == "globals":
            for n in root.names:
                queue.append((root.obj[n], i, (("item", n),)))
        else:
            queue.append((root.obj, i, ()))

    def add_function(f: Any) -> None:
        if isinstance(f, types.MethodType):
            add_root(Root(f.__self__, "object"))
            f = f.__func__
        if not isinstance(f, types.FunctionType):
            if f is not None and not _is_library(type(f)):
                add_root(Root(f, "object"))          # a callable object (e.g. a Module)
            return
        if _is_library(f) or id(f) in functions_seen:
            return
        functions_seen.add(id(f))
        names: set = set()
        _code_names(f.__code__, names)
        names_read.update(names)
        for cell in f.__closure__ or ():
            add_root(Root(cell, "cell"))
        g = f.__globals__
        named = tuple(sorted(n for n in names if n in g))
        if named:
            add_root(Root(g, "globals", named))

    def add_class(cls: type) -> None:
        """Methods of user classes read globals too (a forward using a global tensor)."""
        for klass in cls.__mro__:
            if klass in classes_seen or _is_library(klass):
                continue
            classes_seen.add(klass)
            for v in vars(klass).values():
                v = getattr(v, "__func__", v)            # staticmethod / classmethod
                if isinstance(v, types.FunctionType):
                    add_function(v)

    classes_seen: set = set()
    add_function(fn)
    for s in statics:
        if not isinstance(s, _VALUE_TYPES + (float, complex)):
            add_root(Root(s, "object"))
    while queue and len(seen) < _MAX_OBJECTS:
        obj, root, steps = queue.popleft()
        if isinstance(obj, _VALUE_TYPES + (float, complex)) or id(obj) in seen or len(steps) > 16:
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            if (targets is None or id(obj) in targets) and id(obj) not in paths:
                paths[id(obj)] = (root, steps)
            if obj.grad is not None:
                queue.append((obj.grad, root, steps + (("attr", "grad"),)))
        elif isinstance(obj, dict):
            for k, v in list(obj.items()):
                queue.append((v, root, steps + (("item", k),)))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                queue.append((v, root, steps + (("item", i),)))
        elif isinstance(obj, types.ModuleType):
            if not _is_library(obj) or obj.__name__ == "__main__":
                d = vars(obj)                # only the attributes some walked code names
                for n in sorted(names_read):
                    if n in d:
                        queue.append((d[n], root, steps + (("attr", n),)))
        elif isinstance(obj, (types.FunctionType, types.MethodType)):
            add_function(obj)
        elif isinstance(obj, type):
            continue
        elif hasattr(obj, "__dict__") and (not _is_library(type(obj)) or _is_state_object(obj)):
            if targets is not None:
                paths.setdefault(id(obj), (root, steps))    # its flags: guarded even if unused
            add_class(type(obj))
            for k, v in list(vars(obj).items()):
                queue.append((v, root, steps + (("attr", k),)))
    return roots, paths


def _is_library(obj: Any) -> bool:
    module = obj.__name__ if isinstance(obj, types.ModuleType) else \
        (getattr(obj, "__module__", None) or "")
    return module.split(".")[0] in _LIBRARY


def _is_state_object(obj: Any) -> bool:
    """Objects of the library that hold user state: modules and optimizers."""
    return any(k.__module__.split(".")[0] == "nn" for k in type(obj).__mro__)


def reachable_tensors(fn: Callable, statics: list) -> list:
    """Every tensor `fn` can reach through Python objects (see find_sources)."""
    roots, paths = find_sources(fn, statics)
    found = (follow(roots[root].obj, steps) for root, steps in paths.values())
    return [t for t in found if isinstance(t, Tensor)]


def follow(obj: Any, steps: tuple) -> Any:
    for step in steps:
        obj = _step(obj, step)
    return obj


def _step(obj: Any, step: tuple) -> Any:
    kind, key = step
    if kind == "cell":
        return obj.cell_contents
    if kind == "item":
        return obj[key]
    return obj.grad if key == "grad" and isinstance(obj, Tensor) else \
        (vars(obj)[key] if not isinstance(obj, types.ModuleType) else vars(obj)[key])


class Guard:
    """The generated check: `guard.failed(data)` is 0 when every comparison holds, else
    the number of the first that failed (-1: evaluating a path raised), with `data[i]`
    the array capture i had when last checked (an unchanged array needs no metadata
    look). `explain(n)` names comparison n, for retrace reports."""

    def __init__(self, source: str, namespace: dict, conditions: list) -> None:
        self.source = source
        self.conditions = conditions
        self.count = len(conditions)       # comparisons on the common path (for reports)
        exec(compile(source, "<engine.jit guard>", "exec"), namespace)
        self.failed: Callable[[list], int] = namespace["make"](namespace["K"])

    def explain(self, n: int) -> str:
        return "a guarded path no longer exists" if n < 0 else self.conditions[n - 1]


class _Writer:
    """Straight-line guard source: named intermediate values, constants as k0, k1, ... (cells)."""

    def __init__(self, touched: set) -> None:
        self.touched = touched             # ids of tensors the trace used (their .grad: grad_none)
        self.lines: list[str] = []
        self.consts: list = []
        self.index: dict = {}
        self.conditions: list[str] = []
        self.dicts: dict[str, str] = {}    # variable -> the variable holding its __dict__

    def const(self, x: Any) -> str:
        if id(x) not in self.index:
            self.index[id(x)] = len(self.consts)
            self.consts.append(x)
        return f"k{self.index[id(x)]}"

    def key(self, k: Any) -> str:
        return repr(k) if type(k) in (int, str, bool) else self.const(k)

    def var(self, expr: str) -> str:
        name = f"v{len(self.lines)}"
        self.lines.append(f"    {name} = {expr}")
        return name

    def fail_if(self, cond: str) -> None:
        self.conditions.append(cond)
        self.lines.append(f"    if {cond}: return {len(self.conditions)}")

    def step(self, parent: str, parent_obj: Any, step: tuple) -> str:
        kind, key = step
        if kind == "cell":
            return f"{parent}.cell_contents"
        if kind == "item":
            return f"{parent}[{self.key(key)}]"
        if key == "grad" and isinstance(parent_obj, Tensor):
            return f"{parent}.grad"
        return f"{self.attributes(parent)}[{key!r}]"

    def attributes(self, name: str) -> str:
        """The variable holding `name`'s __dict__, read once per call."""
        if name not in self.dicts:
            self.dicts[name] = self.var(f"{name}.__dict__")
        return self.dicts[name]

    def entry(self, expr: str, value: Any) -> None:
        """`expr` still evaluates to `value`: the same object, or for bool/int/str/None the
        same type and value; a tensor also keeps the None-ness of its .grad; floats are frozen."""
        if value is None or type(value) is bool:
            self.fail_if(f"{expr} is not {value!r}")
        elif type(value) in _VALUE_TYPES:
            self.fail_if(f"type({expr}) is not {type(value).__name__} or {expr} != {value!r}")
        elif type(value) in (float, complex):
            return
        elif isinstance(value, Tensor) and id(value) not in self.touched:
            v = self.var(expr)
            self.fail_if(f"{v} is not {self.const(value)} or "
                         f"({v}.grad is None) is not {value.grad is None}")
        else:
            self.fail_if(f"{expr} is not {self.const(value)}")

    def contents(self, name: str, obj: Any, on_path: set) -> None:
        """Same length and entries as when traced (entries on a path are checked there)."""
        if isinstance(obj, (dict, list, tuple)):
            d, items = name, list(obj.items() if isinstance(obj, dict) else enumerate(obj))
        elif hasattr(obj, "__dict__") and not isinstance(obj, (Tensor, types.ModuleType, type)) \
                and not callable(getattr(obj, "__code__", None)):
            d, items = self.attributes(name), list(vars(obj).items())
        else:
            return
        self.fail_if(f"len({d}) != {len(items)}")
        for k, v in items:
            if k not in on_path:
                self.entry(f"{d}[{self.key(k)}]", v)


def build_guard(roots: list, paths: dict, captures: list, grad_none: list,
                host_reads: list, touched: set) -> Guard:
    """Generate the guard of a trace (see the module docstring).

    captures: (tensor, kind, meta) with kind "tensor" (the tensor itself) or "grad"
    (the .grad of the tensor, read through it at every call) and meta (shape, dtype,
    device, requires_grad); grad_none: (tensor, was .grad None when tracing started);
    host_reads: (tensor, version) of tensors whose values the trace read on the host;
    touched: ids of the tensors the trace read or changed (the rest found next to them
    must keep the None-ness of their .grad: an optimizer would update them once set).
    """
    w = _Writer(touched)
    nodes: dict = {}                     # (root, steps prefix) -> (variable, object)
    children: dict = {}                  # (root, steps prefix) -> keys of steps on a path
    for root, steps in sorted(paths.values(), key=lambda rs: (rs[0], len(rs[1]))):
        obj = roots[root].obj
        name = w.const(obj)
        for n in range(len(steps)):
            parent_key, key = (root, steps[:n]), (root, steps[:n + 1])
            children.setdefault(parent_key, set()).add(steps[n][1])
            if key in nodes:
                name, obj = nodes[key]
                continue
            parent_obj = obj
            obj = _step(obj, steps[n])
            name = w.var(w.step(name, parent_obj, steps[n]))
            nodes[key] = (name, obj)
            w.fail_if(f"{name} is not {w.const(obj)}")
    for (root, prefix), (name, obj) in list(nodes.items()):
        if not isinstance(obj, Tensor):
            w.contents(name, obj, children.get((root, prefix), set()))
    for i, root in enumerate(roots):
        on_path = children.get((i, ()), set())
        if root.kind == "cell":
            if None not in on_path:
                try:
                    w.entry(f"{w.const(root.obj)}.cell_contents", root.obj.cell_contents)
                except ValueError:
                    pass
        elif root.kind == "globals":
            for n in root.names:
                if n not in on_path:
                    w.entry(f"{w.const(root.obj)}[{n!r}]", root.obj[n])
        else:
            w.contents(w.const(root.obj), root.obj, on_path)
    for i, (t, kind, meta) in enumerate(captures):
        v = w.const(t)
        if kind == "grad":
            v = w.var(f"{v}.grad")
            w.fail_if(f"{v} is None")
        w.fail_if(f"{v}._data is not D[{i}] and ({v}.shape, {v}.dtype, {v}.device) != "
                  f"{w.const(meta[:3])}")
        w.fail_if(f"{v}.requires_grad is not {meta[3]!r}")
    for t, was_none in grad_none:
        w.fail_if(f"({w.const(t)}.grad is None) is not {was_none!r}")
    for t, version in host_reads:
        w.fail_if(f"{w.const(t)}._version[0] != {version}")
    body = "\n".join("    " + line for line in w.lines) or "        pass"
    # The constants are the closure's cells (k0, k1, ...): a cell load is cheaper than
    # indexing a list, and the guard runs ~1,000 comparisons at every call.
    unpack = "".join(f"  k{i} = K[{i}]\n" for i in range(len(w.consts)))
    source = (f"def make(K):\n{unpack}  def failed(D):\n    try:\n{body}\n"
              f"    except Exception:\n      return -1\n    return 0\n  return failed\n")
    return Guard(source, {"K": w.consts}, w.conditions)
