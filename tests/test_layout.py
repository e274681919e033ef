"""The package's rooms and the one-way rule between them, read from the source (ast).

CONTRIBUTING.md draws the map: each subpackage of charrnn is a room, and a room imports
only the rooms below it. These tests read every `import` in charrnn/ (those inside
functions and under TYPE_CHECKING too: a lazy import is still a dependency) and fail on an
edge the rule does not allow or on any circle between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "charrnn"

# The top-level modules every room may use; cli/ is the door and __init__ the public API.
SHARED = {"errors", "events", "device", "distributed", "atomic", "version", "celltypes", "config"}
BELOW = {
    "shared": set(),
    "data": {"shared"},
    "model": {"shared", "data"},
    "store": {"shared", "data", "model"},
    "infer": {"shared", "data", "model", "store"},
    "training": {"shared", "data", "model", "store", "infer"},
    "serve": {"shared", "data", "model", "store", "infer"},
    "export": {"shared", "data", "model", "store", "infer"},
    "viz": {"shared", "data", "model", "store", "infer"},
    "api": {"shared", "infer", "training"},  # charrnn/__init__.py: charrnn.load and charrnn.train
    "cli": {"shared", "data", "model", "store", "infer", "training", "serve", "export", "viz"},
    "main": {"cli"},
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    if parts[1] == "__main__":
        return "main"
    if parts[1] == "cli":
        return "cli"
    if len(parts) == 2 and parts[1] in SHARED:
        return "shared"
    return parts[1]


def imports(root: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the charrnn modules it imports}, every import in the file, lazy ones included."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    top = root.name
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.split(".")[0] == top}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] == top:
                for alias in node.names:  # `from charrnn.infer import api` imports the module charrnn.infer.api
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in modules else node.module)
        graph[name] = {e for e in edges if e != name and e in modules}
    return graph


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    """The edges from a room to one it may not import (a room's own modules are free)."""
    found = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            if room(target) == "api" and target.count(".") == 0:
                allowed = False  # nothing imports the package's own __init__ (the public API)
            else:
                allowed = room(target) == room(source) or room(target) in BELOW[room(source)]
            if not allowed:
                found.append(f"{source} -> {target} ({room(source)} may import {sorted(BELOW[room(source)])})")
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every module circle, one path each (depth-first search, three colours)."""
    state, found, path = {}, [], []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_every_import_runs_one_way_between_rooms():
    graph = imports()
    assert sum(len(t) for t in graph.values()) > 100  # the reader found the package's imports
    assert wrong_way(graph) == []


def test_no_module_circle_anywhere():
    assert circles(imports()) == []


def test_every_room_says_what_it_holds_and_what_it_may_import():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert "May import" in doc, f"{init.relative_to(PACKAGE.parent)}: its docstring names no import rule"


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "charrnn"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_reader_catches_a_circle_and_inference_importing_training(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "infer/__init__.py": "",
        "infer/sample.py": "def f():\n    from charrnn.training import trainer\n",
        "training/__init__.py": "",
        "training/run.py": "from charrnn.training.trainer import Trainer\n",
        "training/trainer.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                               "    from charrnn.training.run import Plan\n",
    })
    graph = imports(root)
    assert graph["charrnn.infer.sample"] == {"charrnn.training.trainer"}
    assert [e.split(" (")[0] for e in wrong_way(graph)] == ["charrnn.infer.sample -> charrnn.training.trainer"]
    assert [set(c) for c in circles(graph)] == [{"charrnn.training.run", "charrnn.training.trainer"}]
