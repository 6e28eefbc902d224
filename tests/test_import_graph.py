"""fleet's modules import each other without a cycle.

The graph is read from the source with ``ast`` (fleet itself is never imported, so this
is fast): every import of a fleet module anywhere in a module counts, at the top level or
inside a function, except under ``if TYPE_CHECKING:``. ``from fleet.x import y`` is an
edge to ``fleet.x.y`` when that is a module, else to ``fleet.x``; relative imports
resolve the same way, and a package's ``__init__`` importing its submodules counts.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fleet"


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """``{module name: path}`` for every module of ``package`` under ``root``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, but those only made for type checking."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
        return
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:  # the else branch runs
                yield from _imports(stmt)
            continue
        yield from _imports(child)


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that module ``name`` (at ``path``) imports."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                # ``from . import x`` in a package's __init__ is relative to the package
                # itself; in a plain module, to the package that contains it.
                parts = name.split(".")
                parts = parts[: len(parts) + is_package - node.level]
                base = ".".join([*parts, node.module] if node.module else parts)
            else:
                base = node.module or ""
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        for target in targets:
            # ``import fleet.x.y`` of something that is not a module: its nearest module.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """``{module: the package's modules it imports}``."""
    files = module_files(root, package)
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles (``[a, b, ..., a]``) that between them pass through every module in a cycle.

    The modules in cycles are the graph's strongly connected components of more than one
    module (Tarjan's algorithm, iterative). Within one, a breadth-first search from a
    module back to itself gives a shortest cycle through it; that is done for each module
    that no cycle found so far passes through.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    cycles = []
    for component in sorted(components):
        covered: set[str] = set()
        for module in component:
            if module not in covered:
                cycles.append(_shortest_cycle(graph, module, set(component)))
                covered.update(cycles[-1])
    return cycles


def _shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & within):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is in no cycle")  # unreachable for a component


def test_the_cycle_finder_reports_each_cycle_as_a_chain():
    graph = {
        "a": {"b"},
        "b": {"c"},
        "c": {"a", "d"},
        "d": set(),
        "e": {"f", "h"},
        "f": {"e"},
        "g": {"a"},
        "h": {"e"},
    }
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"], ["h", "e", "h"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_imports_resolve_to_modules_and_skip_type_checking_only_ones(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.sub import leaf\n")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import thing\n")
    (pkg / "sub" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from pkg import other\n"
        "else:\n"
        "    import pkg.helpers\n"
        "def f():\n"
        "    from .. import other\n"
        "    from pkg.other import name\n"
    )
    (pkg / "other.py").write_text("import pkg.sub.leaf.thing\n")
    (pkg / "helpers.py").write_text("")
    assert import_graph(tmp_path, "pkg") == {
        "pkg": {"pkg.sub.leaf"},
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": {"pkg.other", "pkg.helpers"},
        "pkg.other": {"pkg.sub.leaf"},
        "pkg.helpers": set(),
    }


def test_fleet_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50, "the fleet package was not found"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in fleet:\n" + "\n".join(" -> ".join(c) for c in cycles)
