"""The packages import in a dependency order (docs/design.md, "Layering"): the graph of
module-level imports, read with ast, has no cycle, and an import inside a function is
only ever an optional dependency, loaded when first asked for. The finders are
themselves tested on small sources that break each rule."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "ops", "nn", "backends")

# Imports allowed inside a function: optional libraries, each imported where it is
# first needed so that the engine imports and runs without it.
OPTIONAL_LIBRARIES = {
    "cupy": "GPU arrays (the [cuda] extra)",
    "mpi4py": "multi-process training (the [dist] extra)",
    "matplotlib": "nn.plot_losses (the [plot] extra)",
}
# Project modules allowed inside a function, per importing module.
LAZY_PROJECT_IMPORTS = {
    ("backends", "backends.cupy_backend"): "the CUDA backend's factory: it imports CuPy",
    ("engine", "nn"): "`from engine import nn`: nn is built on engine, so engine names it "
                      "only when asked (engine.__getattr__)",
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def _targets(mods: dict, mod: str, node: ast.AST) -> list[str]:
    """The modules an import statement names (a project module where it is one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        is_package = mods[mod].name == "__init__.py" if mod in mods else False
        pkg = mod.split(".") if is_package else mod.split(".")[:-1]
        pkg = pkg[:len(pkg) - node.level + 1]
        base = ".".join(pkg + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]


def split_imports(tree: ast.AST) -> tuple[list, list]:
    """(module-level, function-level) import statements of a module: module level is
    everything that runs on import (class bodies and `if` blocks included)."""
    top, inner = [], []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (inner if in_function else top).append(child)
            visit(child, in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, inner


def _with_parents(target: str, mods: dict, importer: str) -> set[str]:
    """`target` and the packages Python imports before it (not the importer's own)."""
    parts = target.split(".")
    names = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return {n for n in names if n in mods and n != importer and not importer.startswith(n + ".")}


def import_graph(sources: dict[str, str] | None = None) -> dict[str, set[str]]:
    """module -> the project modules its module-level statements import. `sources`
    (name -> text) replaces the packages' files, for testing the finder."""
    mods = _modules() if sources is None else {m: Path(f"{m}.py") for m in sources}
    graph = {}
    for mod, path in mods.items():
        text = path.read_text(encoding="utf-8") if sources is None else sources[mod]
        top, _ = split_imports(ast.parse(text))
        graph[mod] = {p for node in top for t in _targets(mods, mod, node)
                      for p in _with_parents(t, mods, mod)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def cycle_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One import cycle through `component`, as a -> b -> ... -> a."""
    start = min(component)
    previous = {start: None}
    frontier = [start]
    while frontier:                                   # breadth first: a shortest cycle
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, v, start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


def function_level_imports(sources: dict[str, str] | None = None) -> list[tuple[str, int, str]]:
    """(module, line, imported module) for every import inside a function that the
    allow-lists above do not name."""
    mods = _modules() if sources is None else {m: Path(f"{m}.py") for m in sources}
    found = []
    for mod, path in sorted(mods.items()):
        text = path.read_text(encoding="utf-8") if sources is None else sources[mod]
        _, inner = split_imports(ast.parse(text))
        for node in inner:
            for target in _targets(mods, mod, node):
                if target.split(".")[0] in OPTIONAL_LIBRARIES or (mod, target) in LAZY_PROJECT_IMPORTS:
                    continue
                found.append((mod, node.lineno, target))
    return found


def dynamic_imports(sources: dict[str, str] | None = None) -> list[tuple[str, int]]:
    """(module, line) of importlib.import_module / __import__ calls: imports the other
    two checks could not see."""
    mods = _modules() if sources is None else {m: Path(f"{m}.py") for m in sources}
    found = []
    for mod, path in sorted(mods.items()):
        text = path.read_text(encoding="utf-8") if sources is None else sources[mod]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name in ("import_module", "__import__"):
                    found.append((mod, node.lineno))
    return found


# -- the finders, on sources that break each rule ---------------------------------------------

def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [{"a", "b", "c"}]
    assert cycle_path(graph, {"a", "b", "c"}) == ["a", "b", "c", "a"]


def test_the_graph_sees_imports_in_class_bodies_and_relative_imports():
    graph = import_graph({"p": "", "p.a": "from . import b\n", "p.b": "class K:\n    from .a import x\n"})
    assert graph["p.a"] == {"p.b"} and graph["p.b"] == {"p.a"}
    assert cycles(graph) == [{"p.a", "p.b"}]


def test_the_graph_counts_the_packages_an_import_runs():
    graph = import_graph({"p": "from . import a\n", "p.a": "import q.b\n", "q": "import p.a\n", "q.b": ""})
    assert graph["p.a"] == {"q", "q.b"}                 # q/__init__ runs before q.b
    assert cycles(graph) == [{"p.a", "q"}]


def test_the_function_level_finder_finds_project_imports_and_spares_optional_ones():
    sources = {"m": "import os\n", "m.x": "def f():\n    from . import y\n    import cupy\n",
               "m.y": "class C:\n    def g(self):\n        import numpy\n"}
    assert function_level_imports(sources) == [("m.x", 2, "m.y"), ("m.y", 3, "numpy")]
    assert dynamic_imports({"m": "import importlib\ndef f():\n    return importlib.import_module('m')\n"}) \
        == [("m", 3)]


# -- the packages -----------------------------------------------------------------------------

def test_no_import_cycles():
    graph = import_graph()
    found = [" -> ".join(cycle_path(graph, c)) for c in cycles(graph)]
    assert not found, "module-level import cycles: " + "; ".join(found)


def test_imports_inside_functions_are_only_optional_dependencies():
    found = function_level_imports()
    assert not found, "imports inside functions (move them to module level, in the layering " \
        "order of docs/design.md): " + ", ".join(f"{m}:{line} {t}" for m, line, t in found)


def test_no_dynamic_imports():
    assert not dynamic_imports(), dynamic_imports()
