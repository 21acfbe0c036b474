"""The package layout is the data flow: datasets -> trainables -> search, no import runs back up and no
two modules import each other (directly or round a longer circle). Imports inside functions count too:
a lazy import is still a dependency."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("datasets", "trainables", "search")  # each may import only itself and the ones before it


def project_modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p
            for pkg in LAYERS for p in sorted((ROOT / pkg).glob("*.py")) if p.name != "__init__.py"}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # from search import tracking
    return {m for m in found if m in known}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(p, set(modules)) - {m} for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_lazy_and_package_relative_imports():
    graph = import_graph()
    assert "datasets.cache" in graph["datasets.prepare"]          # module level
    assert "datasets.kaggle" in graph["datasets.cache"]           # inside a function, `from datasets import kaggle`
    assert "trainables.train" in graph["search.tuner"]            # inside a function, `from trainables.train import`


def test_no_import_circle():
    found = cycles(import_graph())
    assert not found, "import circles (move the shared piece into a module both import): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_no_import_runs_up_a_layer():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = [f"{m} imports {d}" for m, deps in import_graph().items() for d in sorted(deps)
              if rank[d.split(".")[0]] > rank[m.split(".")[0]]]
    assert not upward, "imports against the data flow datasets -> trainables -> search: " + "; ".join(upward)


def test_the_circle_finder_finds_circles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_refit_reads_the_shared_defaults_without_starting_on_ray():
    """refit_best finds the results root in datasets.defaults: importing it pulls in neither search.run nor Ray."""
    import subprocess
    import sys

    code = ("import sys, search.refit_best; "
            "print(sorted(m for m in ('ray', 'search.run') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
