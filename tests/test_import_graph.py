"""The package import graph has no cycles, and supervisor/ stands alone.

Dependencies are meant to point one way (DESIGN.md); a cycle is where that silently
stops being true, and it is also what forces imports into functions or under
TYPE_CHECKING. The walk reads the source with ``ast`` (nothing is imported), resolves
relative imports and sorts every import into one of three kinds:

* ``module``: runs when the module is imported;
* ``deferred``: inside a function, runs at the first call. Still a runtime edge: a
  cycle closed by a deferred import is a cycle that was only hidden;
* ``typing``: under ``if TYPE_CHECKING:``. Never runs, so it cannot make a runtime
  cycle; it is left out of the cycle check (the type checker copes with such cycles).

An import names the most specific module it reaches: ``from a.b import c`` is an edge
to ``a.b.c`` when that is a module, else to ``a.b``. The packages above a target are not
counted as edges, so a package ``__init__`` may re-export its submodules.
"""

from __future__ import annotations

import ast
import enum
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("payments", "supervisor")


class Kind(enum.Enum):
    MODULE = "module"
    DEFERRED = "deferred"
    TYPING = "typing"


@attrs.frozen
class Edge:
    source: str
    target: str
    kind: Kind
    line: int


def module_names(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Every module under the packages, by dotted name (``a/__init__.py`` is ``a``)."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, Kind]]:
    """Each import statement with its kind; the innermost enclosing reason wins."""

    def walk(node: ast.AST, kind: Kind) -> Iterator[tuple[ast.Import | ast.ImportFrom, Kind]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, kind
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for statement in child.body:
                    yield from walk(ast.Module(body=[statement], type_ignores=[]), Kind.TYPING)
                for statement in child.orelse:
                    yield from walk(ast.Module(body=[statement], type_ignores=[]), kind)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from walk(child, Kind.TYPING if kind is Kind.TYPING else Kind.DEFERRED)
            else:
                yield from walk(child, kind)

    yield from walk(tree, Kind.MODULE)


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module ``from <...> import`` names, relative levels resolved."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    anchor = package[: len(package) - (node.level - 1)]
    return ".".join([*anchor, node.module] if node.module else anchor)


def edges(modules: Mapping[str, Path]) -> list[Edge]:
    """Every import from one of ``modules`` to another (outside ones are dropped)."""
    found: list[Edge] = []
    for source, path in modules.items():
        is_package = path.name == "__init__.py"
        for node, kind in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _base(source, is_package, node)
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.append(submodule if submodule in modules else base)
            found.extend(
                Edge(source, target, kind, node.lineno)
                for target in dict.fromkeys(targets)
                if target in modules and target != source
            )
    return found


def cycles(graph_edges: Iterable[Edge]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module,
    as the list of modules from the first back to it (Tarjan, then a shortest loop)."""
    graph: dict[str, set[str]] = {}
    for edge in graph_edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: set[str] = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_loop(graph, component) for component in components]


def _loop(graph: Mapping[str, set[str]], component: set[str]) -> list[str]:
    """The shortest way from the component's first module back to itself."""
    start = min(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no loop in a strongly connected component {component}")


def _describe(loops: list[list[str]]) -> str:
    return "\n".join(" -> ".join(loop) for loop in loops)


# --- the project --------------------------------------------------------------------


MODULES = module_names(ROOT, PACKAGES)
EDGES = edges(MODULES)


def test_the_walk_sees_the_whole_project() -> None:
    # A walk that found nothing would pass every check below.
    assert {"payments.service", "payments.storage.database", "supervisor.supervisor"} <= set(
        MODULES
    )
    kinds = {edge.kind for edge in EDGES}
    assert {Kind.MODULE, Kind.DEFERRED} <= kinds, kinds
    assert len(EDGES) > 100


def test_no_import_cycles_at_runtime() -> None:
    runtime = [edge for edge in EDGES if edge.kind is not Kind.TYPING]
    loops = cycles(runtime)
    assert not loops, "import cycles (module-level and deferred imports):\n" + _describe(loops)


def test_supervisor_imports_nothing_from_payments() -> None:
    # Every kind counts here, TYPE_CHECKING included: the supervisor is a generic runtime.
    leaks = [
        f"{edge.source}:{edge.line} -> {edge.target}"
        for edge in EDGES
        if edge.source.startswith("supervisor") and edge.target.startswith("payments")
    ]
    assert not leaks, leaks


def test_the_storage_contract_loads_no_backend() -> None:
    # The service and the jobs import the contract; a backend is the runtime's choice.
    code = (
        "import sys, payments.storage.database, payments.service\n"
        "print(sorted(m for m in sys.modules if m in "
        "('payments.storage.pool', 'payments.storage.sqlite', 'trio_mysql', 'sqlite3')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "[]", result.stdout


# --- the walker itself, on a package made for it ------------------------------------


def _write(root: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_walker_resolves_each_kind_and_finds_the_loop(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from . import b\nfrom .sub import c\n",
            "pkg/b.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from pkg import a\n"
                "def later():\n    from ..pkg.sub.c import thing\n"
            ),
            "pkg/sub/__init__.py": "from .c import thing\n",
            "pkg/sub/c.py": "import pkg.a\nimport os\nthing = 1\n",
        },
    )
    modules = module_names(tmp_path, ["pkg"])
    assert set(modules) == {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"}
    found = {(edge.source, edge.target, edge.kind) for edge in edges(modules)}
    assert found == {
        ("pkg.a", "pkg.b", Kind.MODULE),
        ("pkg.a", "pkg.sub.c", Kind.MODULE),
        ("pkg.b", "pkg.a", Kind.TYPING),
        ("pkg.b", "pkg.sub.c", Kind.DEFERRED),
        ("pkg.sub", "pkg.sub.c", Kind.MODULE),
        ("pkg.sub.c", "pkg.a", Kind.MODULE),
    }
    runtime = [edge for edge in edges(modules) if edge.kind is not Kind.TYPING]
    assert cycles(runtime) == [["pkg.a", "pkg.sub.c", "pkg.a"]]


def test_walker_names_a_loop_closed_by_a_deferred_import(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/config.py": "def parse():\n    from pkg.signing import parse\n",
            "pkg/signing.py": "from pkg.config import Error\n",
            "pkg/alone.py": "import pkg.config\n",
        },
    )
    loops = cycles(edges(module_names(tmp_path, ["pkg"])))
    assert loops == [["pkg.config", "pkg.signing", "pkg.config"]]
    assert _describe(loops) == "pkg.config -> pkg.signing -> pkg.config"
