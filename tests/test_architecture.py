"""The shape of the code: no import cycles between the project's modules, layers that point one way, and no
Python file over 600 lines.

The import graph is read from the source with `ast`, every import counted (module level and inside functions,
relative ones resolved): `import a.b` is an edge to `a.b`; `from pkg import name` an edge to `pkg.name` when that
is a module, else to `pkg`. A package `__init__` importing its submodules is an edge `pkg -> pkg.sub`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Import name -> folder of each top-level package of the project.
PACKAGES = {"seer_finetune": ROOT / "seer_finetune", "seer_kernels": ROOT / "kernels" / "seer_kernels"}
LINE_LIMIT = 600
LIMITED_FOLDERS = ("seer_finetune", "kernels", "benchmarks", "tests", "tools", "launch")


def discover_modules(packages: dict[str, Path]) -> dict[str, Path]:
    """Every module of the given packages: dotted name -> file (a package is its `__init__.py`)."""
    modules = {}
    for name, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of `from <level dots><target> import ...` written in `module`."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join([*base, *([target] if target else [])])


def _known_prefix(name: str, modules: dict[str, Path]) -> str | None:
    """The longest dotted prefix of `name` that is a project module (None for outside imports)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Edges module -> project modules it imports, anywhere in its source."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve_relative(name, is_package, node.level, node.module) if node.level else node.module
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    targets.append(submodule if submodule in modules else source)
            for target in targets:
                known = _known_prefix(target, modules)
                if known is not None and known != name:
                    graph[name].add(known)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as `[a, b, ..., a]`, or None when the graph has none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# -- the checks' own tests: they must be able to fail -------------------------------------------------------------


def test_cycle_finder_finds_a_cycle_and_only_a_real_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    assert find_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"x"}}) == ["x", "y", "y2", "x"]


def test_graph_reads_every_import_kind_of_a_package(tmp_path):
    """A package whose cycle hides in a function-level relative import and a `from pkg import name`."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .core import run\n")
    (pkg / "core.py").write_text("import os\n\ndef run():\n    from .sub import tool\n    return tool.go()\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "tool.py").write_text("from ..helpers import VALUE\n\ndef go():\n    return VALUE\n")
    (pkg / "helpers.py").write_text("VALUE = 1\n\ndef again():\n    from pkg import core\n    return core\n")
    modules = discover_modules({"pkg": pkg})
    graph = import_graph(modules)
    assert graph["pkg"] == {"pkg.core"}
    assert graph["pkg.core"] == {"pkg.sub.tool"}
    assert graph["pkg.sub.tool"] == {"pkg.helpers"}
    assert graph["pkg.helpers"] == {"pkg.core"}
    assert find_cycle(graph) == ["pkg.core", "pkg.sub.tool", "pkg.helpers", "pkg.core"]
    # A name that is not a module is an edge to its package; this __init__ imports `core`, so the cycle runs
    # through the package itself.
    (pkg / "helpers.py").write_text("VALUE = 1\n\ndef again():\n    from pkg import run\n    return run\n")
    graph = import_graph(discover_modules({"pkg": pkg}))
    assert graph["pkg.helpers"] == {"pkg"} and find_cycle(graph) == ["pkg", "pkg.core", "pkg.sub.tool", "pkg.helpers", "pkg"]
    (pkg / "helpers.py").write_text("VALUE = 1\n")
    assert find_cycle(import_graph(discover_modules({"pkg": pkg}))) is None


# -- the project --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project_graph() -> dict[str, set[str]]:
    return import_graph(discover_modules(PACKAGES))


def test_no_import_cycles(project_graph):
    cycle = find_cycle(project_graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_point_one_way(project_graph):
    """Jobs sit on top (only the command line imports them); the seer plug-in never reaches the trainer or jobs."""
    importers_of_jobs = {m for m, targets in project_graph.items() if "seer_finetune.jobs" in targets}
    assert importers_of_jobs == {"seer_finetune.__main__"}
    for module in project_graph:
        if module == "seer_finetune.seer" or module.startswith("seer_finetune.seer."):
            above = reachable(project_graph, module) & {"seer_finetune.trainer", "seer_finetune.jobs", "seer_finetune.__main__"}
            assert not above, f"{module} reaches {sorted(above)}"
    core = [m for m in project_graph if m.startswith("seer_finetune.") and not m.startswith(("seer_finetune.seer", "seer_finetune.jobs", "seer_finetune.__main__"))]
    for module in core:
        assert not any(t.startswith("seer_finetune.seer") for t in reachable(project_graph, module)), module


def test_importing_the_core_leaves_the_seer_package_unloaded():
    """The extension registry imports built-in plug-ins on first lookup only."""
    probe = (
        "import sys, seer_finetune.trainer, seer_finetune.jobs, seer_finetune.__main__, seer_finetune.deepspeed_engine; "
        "print(sorted(m for m in sys.modules if m.startswith('seer_finetune.seer')))"
    )
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert shown.stdout.strip() == "[]"


def test_no_python_file_over_the_line_limit():
    too_long = []
    for folder in LIMITED_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            lines = len(path.read_text().splitlines())
            if lines > LINE_LIMIT:
                too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not too_long, f"over {LINE_LIMIT} lines: " + ", ".join(too_long)
