"""The floors of the house: who may import whom, read from the source with ``ast``.

Every import counts: at module level, inside ``if TYPE_CHECKING:`` and inside
functions. A circle within a package means a component knows too much about its owner;
a floor importing from above it means the layering is broken. Each failure prints the
import graph it found.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGES = ("schemas", "broker", "clients", "simulator")
PROJECT = (*PACKAGES, "bench", "examples", "tests")
"""Top-level names that belong to the project (anything else is a dependency)."""

Graph = dict[str, set[str]]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str) -> str:
    """The project module ``name`` refers to: itself if it is a module, else its package."""
    parts = name.split(".")
    while parts:
        base = ROOT.joinpath(*parts)
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return name


def _imports(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every project module ``source`` (of ``module``) imports, wherever the statement is."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        names: Iterable[str]
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            # ``from pkg import mod`` imports the module pkg.mod when there is one.
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PROJECT:
                found.add(_resolve(name))
    found.discard(module)
    return found


def _graph() -> Graph:
    graph: Graph = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = _module_name(path)
            source = path.read_text(encoding="utf-8")
            graph[module] = _imports(source, module, is_package=path.name == "__init__.py")
    return graph


GRAPH = _graph()


def _show(graph: Graph, modules: Iterable[str]) -> str:
    return "\n".join(
        f"  {module} -> {', '.join(sorted(graph[module])) or '(nothing)'}"
        for module in sorted(modules)
    )


def _cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in graph:
                continue
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _within(package: str) -> Graph:
    inside = {m for m in GRAPH if m == package or m.startswith(f"{package}.")}
    return {m: {d for d in GRAPH[m] if d in inside} for m in inside}


def _top(module: str) -> str:
    return module.split(".", maxsplit=1)[0]


def _violations(package: str, forbidden: set[str]) -> dict[str, set[str]]:
    return {
        module: bad
        for module, deps in GRAPH.items()
        if _top(module) == package and (bad := {d for d in deps if _top(d) in forbidden})
    }


SAMPLE = """
from __future__ import annotations
from typing import TYPE_CHECKING
import zmq
from schemas.bus import encode
from broker import ports
from . import topics
from .subscriptions import carries
if TYPE_CHECKING:
    from broker.app import Broker
def later() -> None:
    import clients.errors
"""


def test_every_kind_of_import_is_an_edge() -> None:
    assert _imports(SAMPLE, "broker.sample") == {
        "schemas.bus",
        "broker.ports",
        "broker.topics",
        "broker.subscriptions",
        "broker.app",
        "clients.errors",
    }


def test_the_graph_covers_every_package() -> None:
    assert "broker.app" in GRAPH["broker.cli"], "an import inside a function"
    assert {_top(m) for m in GRAPH} == set(PACKAGES)


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(
    "package",
    [
        "schemas",
        "broker",
        "clients",
    ],
)
def test_no_import_circle_within_a_package(package: str) -> None:
    graph = _within(package)
    cycles = _cycles(graph)
    assert not cycles, (
        f"import circles in {package}: {cycles}\nimport graph of {package}:\n" + _show(graph, graph)
    )


def test_schemas_import_nothing_of_the_project() -> None:
    bad = _violations("schemas", set(PROJECT) - {"schemas"})
    assert not bad, "schemas must stand on nothing of the project:\n" + _show(GRAPH, bad)


def test_clients_import_nothing_from_the_broker() -> None:
    bad = _violations("clients", {"broker"})
    assert not bad, "clients must not import the broker:\n" + _show(GRAPH, bad)


def test_the_simulator_imports_neither_the_broker_nor_the_clients() -> None:
    bad = _violations("simulator", {"broker", "clients"})
    assert not bad, "the simulator is an independent Upbit:\n" + _show(GRAPH, bad)


def test_no_broker_component_imports_the_wiring() -> None:
    bad = {m: {"broker.app"} for m, deps in GRAPH.items() if "broker.app" in deps}
    del bad["broker.cli"]  # the CLI sits on top of the wiring and runs it
    assert not bad, "only the CLI may import broker.app:\n" + _show(GRAPH, bad)
