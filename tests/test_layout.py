"""The package layout cannot decay: a stage imports only stages below it, and no modules import each other in a circle.

Stages, lowest first: model < selfcontrol < prefix, analysis, preference (siblings:
none imports another) < evaluation < distributed < cli. Shared ground (errors, store,
plotting, display) imports no stage. Every import counts for the stage rule, also
lazy ones inside functions and ``if TYPE_CHECKING:`` ones; the circle check
is on imports that run when a module is imported (module level, not under
``TYPE_CHECKING``), since only those can deadlock an import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "workbench"
RANK = {"model": 0, "selfcontrol": 1, "prefix": 2, "analysis": 2, "preference": 2, "evaluation": 3, "distributed": 4, "cli": 5}
SHARED = {"errors", "store", "plotting", "display"}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = ["workbench", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, root: Path = PACKAGE) -> list[tuple[str, bool]]:
    """(absolute module imported, runs at import time) for every workbench import in ``path``."""
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, eager: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            eager = False
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            eager = False
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("workbench"):
                # `from . import plotting` names a module, `from .x import y` a module x
                names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
                found.extend((n, eager) for n in names)
        elif isinstance(node, ast.Import):
            found.extend((a.name, eager) for a in node.names if a.name.startswith("workbench"))
        for child in ast.iter_child_nodes(node):
            visit(child, eager)

    visit(ast.parse(path.read_text()), True)
    return found


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layout_violations(root: Path = PACKAGE) -> list[str]:
    """Every import against the stage rule, and every import circle, as readable lines."""
    problems = []
    graph: dict[str, set[str]] = {}
    modules = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    for name, path in modules.items():
        me = stage_of(name)
        for target, eager in imports(path, root):
            other = stage_of(target)
            if me in SHARED and other in RANK:
                problems.append(f"{name} (shared ground) imports the stage {target}")
            elif me in RANK and other in RANK and other != me and RANK[other] >= RANK[me]:
                problems.append(f"{name} ({me}) imports {target} ({other}), which is not below it")
            if eager:
                # `from workbench.x import y` may name a module y or an attribute of x
                node = target if target in modules else target.rsplit(".", 1)[0]
                if node in modules and node != name:
                    graph.setdefault(name, set()).add(node)
    problems += [f"import circle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative path per cycle, by depth-first search."""
    cycles, state = [], {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    return cycles


def test_the_package_follows_the_layout():
    assert layout_violations() == []


def test_every_stage_is_a_subpackage_with_a_docstring_saying_what_it_may_import():
    for stage in RANK:
        init = PACKAGE / stage / "__init__.py"
        assert init.is_file(), f"{stage}/ is not a subpackage"
        doc = " ".join((ast.get_docstring(ast.parse(init.read_text())) or "").split())
        assert "May import" in doc, f"{init} does not say what the stage may import"


@pytest.mark.parametrize(("module", "source"), [
    ("model/chat_model.py", "from ..selfcontrol.control import Control\n"),
    ("model/generation.py", "def f():\n    from ..selfcontrol import search\n"),
    ("selfcontrol/search.py", "from ..analysis.norms import analyze_norms\n"),
    ("analysis/norms.py", "from ..prefix.controller import PrefixController\n"),
    ("store.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .model.chat_model import HookedChatModel\n"),
])
def test_an_upward_import_is_caught(tmp_path, module, source):
    tree = _copy(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + "\n" + source)
    assert any(module_name(path, tree) in line for line in layout_violations(tree))


def test_a_circle_is_caught(tmp_path):
    tree = _copy(tmp_path)
    path = tree / "model" / "chat_model.py"
    path.write_text(path.read_text() + "\nfrom .generation import Generation\n")
    assert any("import circle" in line and "workbench.model.generation" in line for line in layout_violations(tree))


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "workbench"
    for path in PACKAGE.rglob("*.py"):
        target = tree / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    return tree
