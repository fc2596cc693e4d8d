"""The house rules, read from the source with ``ast`` (nothing is imported): three layers that import
downward only (``freecustom_core`` <- ``stages`` <- ``pipeline``; Ray never in the core), no import cycle
among the project's modules, every module under 500 lines, the phases of ``stages/`` importing only earlier
phases (and the output folder every phase writes through), and each phase saying in its
``__init__`` docstring what enters it (``In:``) and what leaves it (``Out:``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("freecustom_core", "stages", "pipeline")
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for layer in LAYERS for p in sorted((REPO / layer).rglob("*.py"))}


def imported(name: str, path: Path, *, module_level: bool) -> set[str]:
    """The absolute names ``name`` (at ``path``) imports: every ``import`` anywhere in the file, or only
    those that run when the module is imported (``module_level``: not inside a function, where they
    run at call time, and not under ``if TYPE_CHECKING:``, where they never run)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if module_level and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(ast.Module(body=child.orelse, type_ignores=[]))
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - (child.level - 1)] if child.level else []
                target = ".".join([*base, *([child.module] if child.module else [])])
                found.add(target)
                # `from package import module` imports that module too
                found.update(f"{target}.{alias.name}" for alias in child.names if f"{target}.{alias.name}" in MODULES)
            visit(child)

    visit(tree)
    return found


def in_layer(names: set[str], *layers: str) -> list[str]:
    return sorted(n for n in names if n.split(".")[0] in layers)


def test_the_modules_are_found():
    assert {"freecustom_core.generator", "stages.base", "pipeline.cli"} <= set(MODULES)


def test_the_core_imports_neither_stages_nor_pipeline_nor_ray():
    wrong = {name: in_layer(imported(name, path, module_level=False), "stages", "pipeline", "ray")
             for name, path in MODULES.items() if name.startswith("freecustom_core")}
    assert {name: found for name, found in wrong.items() if found} == {}


def test_stages_import_nothing_from_pipeline():
    wrong = {name: in_layer(imported(name, path, module_level=False), "pipeline")
             for name, path in MODULES.items() if name.startswith("stages")}
    assert {name: found for name, found in wrong.items() if found} == {}


def test_no_import_cycle():
    # Module-level imports only: an import inside a function runs when the function is called, after
    # every module is loaded, so it cannot close a cycle at import time (and the style keeps the
    # project's own imports at the top anyway).
    graph = {name: sorted(n for n in imported(name, path, module_level=True) if n in MODULES and n != name)
             for name, path in MODULES.items()}
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every edge is explored

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, iter(graph[start]))]
        path = [start]
        state[start] = "open"
        while stack:
            node, edges = stack[-1]
            nxt = next(edges, None)
            if nxt is None:
                state[node] = "done"
                stack.pop()
                path.pop()
            elif state.get(nxt) == "open":
                return [*path[path.index(nxt):], nxt]
            elif nxt not in state:
                state[nxt] = "open"
                stack.append((nxt, iter(graph[nxt])))
                path.append(nxt)
        return None

    for name in graph:
        if name not in state:
            cycle = cycle_from(name)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_is_under_500_lines():
    lines = {str(path.relative_to(REPO)): path.read_text().count("\n") for path in MODULES.values()}
    assert {path: n for path, n in lines.items() if n >= MAX_LINES} == {}


PHASES = sorted(p.parent.name for p in (REPO / "stages").glob("*/__init__.py"))


def test_stages_are_grouped_into_phases():
    assert PHASES == ["generation", "inputs", "masks", "output", "reference", "scoring"]


def test_a_phase_imports_only_the_phases_before_it_and_the_output_folder():
    order = ["inputs", "masks", "reference", "generation", "scoring", "output"]
    folder = {"stages.output.layout", "stages.output.locations", "stages.output.folder"}  # every phase writes OUT
    wrong = {}
    for name, path in MODULES.items():
        parts = name.split(".")
        if parts[0] != "stages" or len(parts) < 3:
            continue
        later = [n for n in imported(name, path, module_level=False) if n.split(".")[0] == "stages"
                 and len(n.split(".")) > 2 and order.index(n.split(".")[1]) > order.index(parts[1]) and n not in folder]
        if later:
            wrong[name] = sorted(later)
    assert wrong == {}


@pytest.mark.parametrize("phase", PHASES)
def test_each_phase_says_what_enters_and_what_leaves(phase):
    doc = ast.get_docstring(ast.parse((REPO / "stages" / phase / "__init__.py").read_text()))
    assert doc and "In:" in doc and "Out:" in doc, f"stages/{phase}/__init__.py: a docstring with In: and Out:"
