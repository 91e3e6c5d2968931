"""fedit's modules import each other without a circle (issue 27): read from the source, lazy
imports inside functions included, `if TYPE_CHECKING:` imports excepted."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def module_names(src: Path) -> dict[str, Path]:
    names = {}
    for path in src.rglob("*.py"):
        name = ".".join(path.relative_to(src).with_suffix("").parts)
        names[name.removesuffix(".__init__")] = path
    return names


class _Imports(ast.NodeVisitor):
    """The fedit names a module imports, wherever in it, but under `if TYPE_CHECKING:`."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def visit_If(self, node: ast.If) -> None:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module and node.module.split(".")[0] == "fedit":
            self.found += [f"{node.module}.{alias.name}" for alias in node.names]

    def visit_Import(self, node: ast.Import) -> None:
        self.found += [a.name for a in node.names if a.name.split(".")[0] == "fedit"]


def import_graph(src: Path) -> dict[str, set[str]]:
    """{module: the modules importing it runs}: the module named and every package above it,
    but the packages the importer is itself inside (Python is already running those)."""
    names = module_names(src)
    graph: dict[str, set[str]] = {}
    for module, path in names.items():
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text()))
        graph[module] = set()
        for name in visitor.found:
            parts = name.split(".")
            for end in range(2, len(parts) + 1):
                target = ".".join(parts[:end])
                if target in names and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    return graph


def import_circle(src: Path) -> list[str] | None:
    try:
        TopologicalSorter(import_graph(src)).prepare()
    except CycleError as error:
        return error.args[1]
    return None


def test_no_module_of_fedit_imports_itself_through_others() -> None:
    assert import_circle(SRC) is None, " -> ".join(import_circle(SRC) or [])


def test_the_check_finds_a_circle() -> None:
    """A lazy import inside a function counts: the circle config -> registry -> config that
    fedit.plugins removed would be found."""
    graph = import_graph(SRC)
    assert "fedit.config" in graph["fedit.server.strategies"]
    graph["fedit.config"].add("fedit.server.strategies")
    try:
        TopologicalSorter(graph).prepare()
    except CycleError:
        return
    raise AssertionError("the circle config -> strategies -> config was not found")
