"""The package's import graph has no cycle, and its packages form layers.

The graph is read from the source with `ast`, never by importing: one node per module of
`policyroute/`, one edge per import of another module of the package (relative imports
resolved; `from pkg import name` is an edge to `pkg.name` when that is a module, else to
`pkg`). A package's `__init__` is no edge of its submodules. Two graphs are checked:

- `load`: module-level imports only. Imports inside functions, and under
  `if TYPE_CHECKING:`, do not count: this is what Python runs when the package loads,
  where a cycle makes import order matter.
- `all`: every import, wherever it is, deferred and type-only ones included. A cycle
  that only a function-level or `TYPE_CHECKING` import hides is still two modules that
  each need the other; that is how the engine, the event relay and the fused state step
  were tied to their parts before, so this graph is the one that keeps them apart.

A failure names each cycle, `a -> b -> ... -> a`.

The layers (README, "Architecture") are checked on the `all` graph too: a module imports
modules of its own layer or of layers below it, never above.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "policyroute"

Graph = dict[str, set[str]]

# The packages from the top down. Top-level modules not named here (errors, config,
# principal, crypto, _types, _ids, _version) are the shared vocabulary under them all.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("policyroute", "testing", "__main__"),  # the public API, and `python -m policyroute`
    ("cli",),
    ("engine",),
    ("review", "admin"),
    ("steps",),
    ("identity", "resilience", "events"),
    ("asgi",),
    ("observability",),
    ("compile",),
    ("language", "backends"),
)


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, whether it is a package's __init__)."""
    found: dict[str, tuple[Path, bool]] = {}
    for file in sorted(root.rglob("*.py")):
        parts = list(file.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = (file, is_package)
    return found


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module loads (not in functions or classes, not type-only)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _type_checking(node.test):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse):
                yield from _module_level(block)
            yield from _module_level(node.finalbody)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)


def _everywhere(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    return (n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom))


def _owner(name: str, modules: dict[str, tuple[Path, bool]]) -> str | None:
    """The module `name` is or lives in, when it is one of the package's."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _targets(
    node: ast.Import | ast.ImportFrom,
    name: str,
    is_package: bool,
    modules: dict[str, tuple[Path, bool]],
) -> Iterator[str]:
    """The package's modules one import statement of module `name` depends on."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            found = _owner(alias.name, modules)
            if found is not None:
                yield found
        return
    if node.level:
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join([*base, *([node.module] if node.module else [])])
    else:
        source = node.module or ""
    owner = _owner(source, modules)
    if owner is None:
        return
    for alias in node.names:
        yield source + "." + alias.name if source + "." + alias.name in modules else owner


def import_graph(kind: str, root: Path = PACKAGE) -> Graph:
    """Module -> the package's modules it imports (`load`: module level; `all`: any)."""
    modules = _modules(root)
    graph: Graph = {}
    for name, (file, is_package) in modules.items():
        tree = ast.parse(file.read_text(encoding="utf-8"), str(file))
        nodes = _module_level(tree.body) if kind == "load" else _everywhere(tree)
        graph[name] = {t for n in nodes for t in _targets(n, name, is_package, modules)} - {name}
    return graph


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Groups of two or more modules that reach each other (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def shortest_cycle(graph: Graph, group: list[str], start: str) -> list[str]:
    """One shortest cycle through `start`, a module of a strongly connected group."""
    members = set(group)
    came: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph[node] & members):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(came[path[-1]])
                return [*reversed(path), start]
            if nxt not in came:
                came[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{group} is not strongly connected")


def cycles(kind: str, root: Path = PACKAGE) -> list[str]:
    """Cycles of the graph as `a -> b -> ... -> a`: for each group of modules that reach
    each other, shortest cycles until every module of the group is on one."""
    graph = import_graph(kind, root)
    out: list[str] = []
    for group in strongly_connected(graph):
        covered: set[str] = set()
        for start in group:
            if start not in covered:
                cycle = shortest_cycle(graph, group, start)
                covered.update(cycle)
                out.append(" -> ".join(cycle))
    return out


@pytest.mark.parametrize("kind", ["load", "all"])
def test_the_package_has_no_import_cycle(kind: str) -> None:
    found = cycles(kind)
    assert not found, f"import cycles ({kind} imports):\n" + "\n".join(found)


def test_the_graph_sees_relative_deferred_and_type_only_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import x\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\nx = 1\n"
    )
    assert strongly_connected(import_graph("load", pkg)) == []
    assert import_graph("load", pkg)["pkg.a"] == {"pkg.sub.b"}
    assert cycles("all", pkg) == ["pkg.a -> pkg.sub.b -> pkg.c -> pkg.a"]


def layer_of(module: str) -> int:
    """The index of a module's layer in LAYERS (len(LAYERS): the shared top-level modules)."""
    parts = module.split(".")
    name = parts[0] if len(parts) == 1 else parts[1]
    for index, layer in enumerate(LAYERS):
        if name in layer:
            return index
    return len(LAYERS)


def test_every_package_has_a_layer() -> None:
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    placed = {name for layer in LAYERS for name in layer}
    assert packages <= placed, f"add {sorted(packages - placed)} to LAYERS (and the README)"


def test_no_module_imports_a_layer_above_its_own() -> None:
    graph = import_graph("all")
    upward = [
        f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a]) if layer_of(b) < layer_of(a)
    ]
    assert not upward, "imports of a layer above:\n" + "\n".join(upward)
