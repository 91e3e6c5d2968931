"""fedit's modules import each other without a circle, and only down the layers (issue 27):
read from the source, lazy imports inside functions included, `if TYPE_CHECKING:` imports
excepted."""

from __future__ import annotations

import ast
from collections.abc import Iterable
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


# The layering of issue 27: a module imports only from a package of a lower rank or from
# inside its own package. The modules right under fedit (errors, types, plugins, ...) are the
# root, rank 0. Every package must be named here, so a new one is placed on purpose.
RANKS = {
    "fedit": 0,
    "config": 1,
    "ops": 2,
    "data": 2,
    "models": 2,
    "compression": 3,
    "fleet": 4,
    "privacy": 5,
    "attacks": 6,
    "client": 7,
    "server": 7,  # client and server are peers: neither imports the other
    "protocol": 8,
    "eval": 8,
    "engine": 9,
    "deploy": 10,
    "experiments": 10,
    "serve": 11,
    "cli": 12,
}


def layer(module: str, modules: Iterable[str]) -> str:
    """The package of fedit `module` is in ("config" also while it is one file), or "fedit"
    for a module right under fedit."""
    parts = module.split(".")
    if len(parts) == 1:
        return "fedit"
    if len(parts) > 2 or parts[1] in RANKS or any(m.startswith(module + ".") for m in modules):
        return parts[1]
    return "fedit"


def layer_violations(graph: dict[str, set[str]], ranks: dict[str, int]) -> list[str]:
    """Every package missing from `ranks`, then every import between two packages whose
    target does not rank below its source, as "source -> target (ranks)"."""
    layers = {module: layer(module, graph) for module in graph}
    unranked = sorted(set(layers.values()) - ranks.keys())
    found = [f"package fedit.{name} is not in the layering" for name in unranked]
    for source, targets in sorted(graph.items()):
        high = layers[source]
        # importing fedit.ops.aggregation runs fedit.ops too: name the module, not both
        named = [t for t in sorted(targets) if not any(o.startswith(t + ".") for o in targets)]
        for target in named:
            low = layers[target]
            if {low, high} <= ranks.keys() and low != high and ranks[low] >= ranks[high]:
                found.append(f"{source} -> {target} ({high} {ranks[high]} -> {low} {ranks[low]})")
    return found


def test_every_import_goes_down_the_layering() -> None:
    found = layer_violations(import_graph(SRC), RANKS)
    assert not found, f"{len(found)} imports against the layering:\n" + "\n".join(found)


def test_the_layer_check_finds_an_unranked_package_and_an_upward_import() -> None:
    """A package the table does not rank fails (a new package is placed on purpose), and so
    does an import between peers; imports down the layers and inside a package do not."""
    graph = {
        "fedit.types": set(),
        "fedit.ops": set(),
        "fedit.ops.aggregation": {"fedit.types"},
        "fedit.server": set(),
        "fedit.server.validation": {"fedit.ops", "fedit.ops.aggregation", "fedit.types"},
        "fedit.client": set(),
        "fedit.client.store": {"fedit.ops", "fedit.ops.aggregation"},
        "fedit.client.session": {"fedit.client.store", "fedit.server", "fedit.server.validation"},
        "fedit.shiny": set(),
        "fedit.shiny.thing": {"fedit.types"},
    }
    assert layer_violations(graph, RANKS) == [
        "package fedit.shiny is not in the layering",
        "fedit.client.session -> fedit.server.validation (client 7 -> server 7)",
    ]
