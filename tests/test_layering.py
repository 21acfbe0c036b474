"""The package layout is the data flow: datasets -> trainables -> search, no import runs back up and no
two modules import each other (directly or round a longer circle). Inside search/, the search core (search.*)
comes first, then the refit and serving side (search.refit), then the measurements (search.bench); only the
documented commands at search/'s top that drive a subpackage (COMMANDS) stand above all three. Imports inside
functions count too: a lazy import is still a dependency. docs/architecture.md draws the same layout."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("datasets", "trainables", "search")  # each may import only itself and the ones before it
# Inside search/: each part may import itself and the parts before it (the core never imports the refit).
SEARCH_PARTS = ("search", "search.refit", "search.bench")
# Documented commands kept at search/'s top (README, docs/*.md, Makefile): they drive the subpackages.
COMMANDS = {"search.refit_best": "search.refit.best", "search.predict": "search.refit.predict", "search.demo": None}
MAX_LINES = 350  # the developers' guide: about 300 lines a module, a longer one says why, never over 350


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module of the three packages, subpackages included (a package's __init__ under its own name)."""
    return {module_name(p): p for pkg in LAYERS for p in sorted((ROOT / pkg).rglob("*.py"))}


def part_of(module: str) -> str:
    """The layer, or inside search/ the part (core, refit, bench; a command is above them all)."""
    if module in COMMANDS:
        return "command"
    for part in SEARCH_PARTS[:0:-1]:
        if module == part or module.startswith(part + "."):
            return part
    return module.split(".")[0]


RANK = {name: i for i, name in enumerate(LAYERS[:-1] + SEARCH_PARTS + ("command",))}


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


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} imports {d}" for m, deps in graph.items() for d in sorted(deps) if RANK[part_of(d)] > RANK[part_of(m)]]


def test_no_import_runs_up_a_layer():
    upward = upward_imports(import_graph())
    assert not upward, ("imports against the data flow datasets -> trainables -> search core -> search.refit -> "
                        "search.bench: " + "; ".join(upward))


def test_the_layer_rule_sees_subpackages():
    graph = import_graph()
    assert {"search.refit.best", "search.refit", "search.bench.record", "search.bench.__main__"} <= set(graph)
    assert "search.bench.replay" in graph["search.bench.sim"]
    assert part_of("search.refit.train") == "search.refit" and part_of("search.holdout") == "search"
    assert part_of("search.bench.cli") == "search.bench" and part_of("search.refit_best") == "command"
    assert upward_imports({"search.holdout": {"search.refit.train"}, "search.refit.train": set()}) == [
        "search.holdout imports search.refit.train"]
    assert upward_imports({"search.refit.best": {"search.bench.sim"}, "search.bench.sim": set()})
    assert upward_imports({"search.bench.sim": {"search.refit.ensemble", "search.report"},
                           "search.refit.ensemble": set(), "search.report": set()}) == []


def test_a_command_kept_at_its_documented_path_only_starts_its_subpackage():
    """search/refit_best.py and search/predict.py hold no code of their own: one import of the real main."""
    for command, target in COMMANDS.items():
        if target is None:  # search.demo: the whole job (a search, then its refit), a module of its own
            continue
        tree = ast.parse(project_modules()[command].read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert [(n.module, [a.name for a in n.names]) for n in imports] == [(target, ["main"])], command
        assert not defs, f"{command}: the code belongs in {target}"


def test_no_module_passes_the_line_limit():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in project_modules().values()}
    over = sorted(f"{path} ({n} lines)" for path, n in lengths.items() if n > MAX_LINES)
    assert not over, f"modules over {MAX_LINES} lines (split by phase): " + ", ".join(over)


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


@pytest.mark.parametrize("command, prog", [
    ("search.refit_best", "python -m search.refit_best"), ("search.predict", "python -m search.predict"),
    ("search.bench", "python -m search.bench"), ("search.bench record", "python -m search.bench record"),
    ("search.bench --recorded x", "python -m search.bench --recorded FILE"),
])
def test_the_documented_commands_keep_their_names(command, prog):
    """Whatever moved behind them, the commands of README, docs/*.md and the Makefile start as documented."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", *command.split(), "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {prog} "), proc.stderr[-2000:]
