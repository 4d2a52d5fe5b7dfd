"""The import graph of alignkit points one way: no circles, each package imports only its own floor
or lower ones, and no recipe imports another recipe.

The graph is read with `ast` from the source (every import, function-local ones included, since a
local import is still an arrow), so nothing is imported here. Floors, from the top:

    4  cli, demo                                 entry points
    3  recipes                                   one file per algorithm
    2  training, rewards, evaluation, serving    plumbing and services the recipes call
    1  models, data, generation, diffusion       models, datasets, sampling
    0  tasks, losses, config                     leaves: the task world, pure maths, the config schema

Imports within a floor are allowed (no circles). `alignkit.recipes` (the recipe table) is read by
the entry points only.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "alignkit"

FLOORS = {
    "cli": 4,
    "demo": 4,
    "recipes": 3,
    "training": 2,
    "rewards": 2,
    "evaluation": 2,
    "serving": 2,
    "models": 1,
    "data": 1,
    "generation": 1,
    "diffusion": 1,
    "tasks": 0,
    "losses": 0,
    "config": 0,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The alignkit modules an import statement names (`from P import m` names module P.m when it is one)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "alignkit"]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolve against this module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    if base.split(".")[0] != "alignkit":
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """{module: the alignkit modules it imports}, over every module of alignkit/."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = {
            target
            for node in ast.walk(tree)
            for target in _imported(node, name, is_package, set(modules))
            if target != name
        }
    return graph


def _package(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _report(title: str, lines: list[str]) -> str:
    return f"{title} ({len(lines)}):\n  " + "\n  ".join(lines)


def test_every_package_has_a_floor():
    unplaced = sorted({_package(m) for m in import_graph()} - set(FLOORS) - {"alignkit"})
    assert not unplaced, f"packages without a floor in FLOORS: {unplaced}"


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, _report("import cycles", [" <-> ".join(c) for c in cycles])


def test_imports_point_down_the_floors():
    graph = import_graph()
    upward = []
    for module, targets in sorted(graph.items()):
        floor = FLOORS.get(_package(module))
        for target in sorted(targets):
            target_floor = FLOORS.get(_package(target))
            if floor is not None and target_floor is not None and target_floor > floor:
                upward.append(f"{module} (floor {floor}) imports {target} (floor {target_floor})")
    assert not upward, _report("upward imports", upward)


def test_recipes_do_not_import_recipes():
    graph = import_graph()
    wrong = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if _package(target) != "recipes":
                continue
            if module.startswith("alignkit.recipes."):
                wrong.append(f"{module} imports {target}: a recipe imports a recipe")
            elif target == "alignkit.recipes" and _package(module) not in ("cli", "demo"):
                wrong.append(f"{module} imports the recipe table {target}: only cli and demo read it")
    assert not wrong, _report("recipe imports", wrong)
