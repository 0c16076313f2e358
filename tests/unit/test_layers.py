"""The house is one-way: imports point down the layers, never in a circle.

Read from the source with ``ast``: every ``twisted_mta`` import, at module
level or inside a function, except those under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import twisted_mta

ROOT = Path(twisted_mta.__file__).parent
# Lower numbers sit lower; a module imports only from lower layers, or
# from its own package.
LAYERS = {
    "twisted_mta.mail": 0,
    "twisted_mta.watch": 0,
    "twisted_mta.interfaces": 0,
    "twisted_mta.durations": 0,
    "twisted_mta.systemd": 0,
    "twisted_mta.logs": 0,
    "twisted_mta.storage": 1,
    "twisted_mta.policies": 1,
    "twisted_mta.maillog": 1,
    "twisted_mta.metrics": 1,
    "twisted_mta.directory": 2,
    "twisted_mta.tls": 2,
    "twisted_mta.intake": 3,
    "twisted_mta.auth": 3,
    "twisted_mta.queue": 4,
    "twisted_mta.smtp": 4,
    "twisted_mta.relay": 5,
    "twisted_mta.config": 6,
    "twisted_mta.front": 7,
    "twisted_mta.workers": 8,
    "twisted_mta.service": 9,
    "twisted_mta.cli": 7,
    "twisted_mta.tap": 10,
    "twisted_mta.sendmail": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def imported(path: Path, known: set[str]) -> Iterator[str]:
    """The twisted_mta modules ``path`` imports: ``from A import B`` imports
    ``A``, and ``A.B`` too when that is a module."""
    tree = ast.parse(path.read_text(), str(path))
    for node in _walk_outside_type_checking(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        yield from (name for name in names if name.startswith("twisted_mta") and name in known)


def _walk_outside_type_checking(node: ast.AST) -> Iterator[ast.AST]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            continue
        yield child
        yield from _walk_outside_type_checking(child)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def graph() -> dict[str, set[str]]:
    found = modules()
    del found["twisted_mta"]
    known = set(found)
    return {
        name: {target for target in imported(path, known) if target in known and target != name}
        for name, path in found.items()
    }


def layer(module: str) -> tuple[str, int]:
    for prefix, rank in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return prefix, rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``edges``, as the list of its nodes, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def package_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for source, targets in edges.items():
        here = layer(source)[0]
        packages.setdefault(here, set()).update(
            layer(target)[0] for target in targets if layer(target)[0] != here
        )
    return packages


def closure(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in edges[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_every_module_has_a_layer():
    for name in graph():
        layer(name)


def test_imports_point_down_only():
    wrong = [
        f"{source} -> {target}"
        for source, targets in graph().items()
        for target in sorted(targets)
        if layer(source)[0] != layer(target)[0]
        and layer(target)[1] >= layer(source)[1]
    ]
    assert wrong == []


def test_no_import_cycle_between_modules():
    assert cycle(graph()) is None


def test_no_import_cycle_between_packages():
    assert cycle(package_graph(graph())) is None


def test_the_sendmail_command_needs_only_formats_storage_and_config():
    layers = {layer(module)[0] for module in closure(graph(), "twisted_mta.sendmail")}
    allowed = {"twisted_mta.mail", "twisted_mta.durations", "twisted_mta.storage", "twisted_mta.config"}
    assert layers <= allowed


@pytest.mark.parametrize(
    "edges, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"a"}}, ["a", "a"]),
    ],
)
def test_the_cycle_finder_finds_cycles(edges, expected):
    assert cycle(edges) == expected
