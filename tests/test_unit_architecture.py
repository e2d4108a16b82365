"""The layout of docs/architecture.md, checked against the code's imports.

Every import of ``worker`` and ``producers`` (module level, inside functions, and under
``TYPE_CHECKING`` alike) must point at the same layer or one below it, and no group of
modules may import each other in a circle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("worker", "producers")

ARCHITECTURE = ROOT / "docs" / "architecture.md"
#: Packages that only use the others: never imported by ``worker`` or ``producers``.
USERS_ONLY = ("sandbox", "bench")
_ROW = re.compile(r"^\| (\d+) \| ([^|]+) \|", re.M)


def layers() -> list[tuple[str, ...]]:
    """The layer table of docs/architecture.md, top to bottom: each row's places as module
    names; a folder (``worker/policies/``) as ``worker.policies.`` (every module in it), a
    file as its module (``worker/app.py`` -> ``worker.app``)."""
    rows: dict[int, list[str]] = {}
    for number, places in _ROW.findall(ARCHITECTURE.read_text()):
        for place in re.findall(r"`([^`]+)`", places):
            if place.endswith("/"):
                name = place.replace("/", ".")
            else:
                name = place.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            rows.setdefault(int(number), []).append(name)
    assert rows, "docs/architecture.md has no layer table"
    return [tuple(rows[number]) for number in sorted(rows)]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """Every module ``path`` imports (``from a import b`` names ``a.b`` when that is a
    project module, else ``a``); relative imports are refused."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import"
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else str(node.module))
    return found


def imported(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports."""
    return {name for name in imports(path, known) if name in known}


def layer_of(module: str) -> int:
    """The row of the table that names ``module``, or the folder holding it (the nearest;
    a package's own module is in its folder)."""
    best, best_len = None, -1
    for index, places in enumerate(layers()):
        for place in places:
            in_folder = place.endswith(".") and f"{module}.".startswith(place)
            named = module == place or in_folder
            if named and len(place) > best_len:
                best, best_len = index, len(place)
    if best is None:
        raise AssertionError(f"{module} is in no layer of docs/architecture.md")
    return best


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imported(path, known) - {name} for name, path in found.items()}


def test_worker_and_producers_never_import_the_sandbox_or_the_benchmark() -> None:
    known = set(modules())
    found = [
        f"{module} -> {target}"
        for module, path in modules().items()
        for target in sorted(imports(path, known))
        if target.split(".")[0] in USERS_ONLY
    ]
    assert found == []


def test_every_module_has_a_layer() -> None:
    for module in modules():
        layer_of(module)


def test_every_import_points_down() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in graph().items()
        for target in sorted(targets)
        if layer_of(target) < layer_of(module)
    ]
    assert upward == []


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("package", ["worker"])
def test_the_top_level_stays_small(package: str) -> None:
    top = [p for p in (ROOT / package).glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= 15, sorted(p.name for p in top)
