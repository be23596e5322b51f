"""The shape of the code: one-way dependencies, no import cycles, modules of a readable size.

Read from the source (no imports run), so a violation fails here even when it would only show at
run time through a local import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "converter")
MAX_LINES = 500


def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for top in PACKAGES:
        for path in sorted((REPO / top).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST) -> Iterator[str]:
    """Every module imported anywhere in the file (also inside functions), except under
    ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_block(node):
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            # `from agent.serving import npy` imports the module agent.serving.npy
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = {m for m in _imports(ast.parse(path.read_text())) if m in mods and m != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, or None (iterative depth-first search)."""
    colour: dict[str, int] = {}  # 1 on the stack, 2 done
    for root in sorted(graph):
        if colour.get(root):
            continue
        path: list[str] = []
        todo: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        colour[root] = 1
        path.append(root)
        while todo:
            node, children = todo[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                path.pop()
                todo.pop()
            elif colour.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif not colour.get(child):
                colour[child] = 1
                path.append(child)
                todo.append((child, iter(sorted(graph.get(child, ())))))
    return None


def package_of(module: str) -> str:
    """``agent.delivery`` for ``agent.delivery.chunks``; a top-level module stands for itself."""
    parts = module.split(".")
    candidate = ".".join(parts[:2])
    return candidate if (REPO / Path(*parts[:2])).is_dir() else module


def test_no_import_cycle_between_modules() -> None:
    # package __init__ files that re-export lazily (agent/__init__.py serves agent.load_model)
    # are facades, not parts of a layer: leave them out
    graph = {m: {d for d in deps if d not in PACKAGES} for m, deps in import_graph().items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_no_cycle_between_packages() -> None:
    graph: dict[str, set[str]] = {}
    for mod, deps in import_graph().items():
        if mod in PACKAGES or mod.endswith("__main__"):
            continue  # the facades and entry points sit above every package
        src = package_of(mod)
        graph.setdefault(src, set()).update(
            package_of(d) for d in deps if package_of(d) != src and d not in PACKAGES
        )
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_device_side_never_imports_the_host_side() -> None:
    for mod, deps in import_graph().items():
        if mod.startswith("agent"):
            assert not [d for d in deps if d.startswith("converter")], mod
    for name, path in modules().items():
        if name.startswith("agent"):
            heavy = {m.split(".")[0] for m in _imports(ast.parse(path.read_text()))}
            assert not heavy & {"tensorflow", "keras", "prometheus_client"}, name


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_is_of_a_readable_size(name: str) -> None:
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines (split it by job)"


def test_the_checker_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
