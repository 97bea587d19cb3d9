"""The client library stands on schemas alone: no broker import, no import circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

CLIENTS = ROOT / "clients"


def imports_of(path: Path) -> list[str]:
    """Every module ``path`` imports, anywhere in it (TYPE_CHECKING blocks, functions)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                # ``from clients import sockets`` imports the submodule clients.sockets;
                # ``from clients import BrokerClient`` needs the package's __init__.
                sub = f"{node.module}.{alias.name}"
                names.append(sub if is_module(sub) else node.module)
    return names


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def module_name(path: Path) -> str:
    return "clients" if path.name == "__init__.py" else f"clients.{path.stem}"


def test_importing_every_client_module_loads_no_broker_module() -> None:
    modules = sorted(module_name(p) for p in CLIENTS.glob("*.py"))
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
        "bad = sorted(m for m in sys.modules if m == 'broker' or m.startswith('broker.')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_client_module_imports_broker_even_lazily() -> None:
    found = {
        p.name: [n for n in imports_of(p) if n == "broker" or n.startswith("broker.")]
        for p in CLIENTS.glob("*.py")
    }
    assert {name: mods for name, mods in found.items() if mods} == {}


def test_the_scan_sees_imports_hidden_in_type_checking_and_functions(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from broker.app import Broker\n"
        "def f() -> None:\n    import broker.config\n"
    )
    assert {"broker.app", "broker.config"} <= set(imports_of(sample))


def test_client_modules_import_each_other_without_a_circle() -> None:
    modules = {module_name(p): p for p in CLIENTS.glob("*.py")}
    graph = {
        name: {m for m in imports_of(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    # The package's __init__ re-exports everything; a module importing the package
    # itself would close a circle through it, so "clients" stays in the graph.
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, "import circle: " + " -> ".join((*path, name))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())
