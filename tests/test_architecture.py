"""The floor plan as a test (ARCHITECTURE.md, "Import rules"): layers, no cycles, lazy imports, size.

Every import between pymta's own modules is read with `ast`, those inside functions and under TYPE_CHECKING
included, so that a rule cannot be dodged by moving an import into a function.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "pymta"

# Lower layers never import higher ones. Peers on one layer never import each other (within a package: free).
LAYERS: dict[str, int] = {
    "pymta": 0,  # __init__ (the version) and the leaves: errors, log, fsutil, privileges, records
    "mail": 1,
    "config": 2,
    "queue": 3,
    "submission": 4,
    "delivery": 4,
    "setup": 5,
    "cli": 6,
    "__main__": 7,
}
LAZY_MARK = "# lazy:"  # a function-level import of pymta says why it is not at the top of its module
MAX_LINES = 650  # "no module over ~600 lines"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: pathlib.Path) -> list[tuple[str, int, int, bool]]:
    """(imported pymta module, first line, last line, at module level) for each import of pymta."""
    importer = module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` at module level counts as module level
        if isinstance(node, ast.If):
            top.update(id(child) for child in node.body)
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(importer, path.name == "__init__.py", node)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                targets.append(candidate if (module_file(candidate) is not None) else base)
        for target in targets:
            if target == "pymta" or target.startswith("pymta."):
                found.append((target, node.lineno, node.end_lineno or node.lineno, id(node) in top))
    return found


def module_file(name: str) -> pathlib.Path | None:
    relative = pathlib.Path(*name.split("."))
    for candidate in (
        PACKAGE.parent / relative.with_suffix(".py"),
        PACKAGE.parent / relative / "__init__.py",
    ):
        if candidate.is_file():
            return candidate
    return None


def layer(name: str) -> tuple[str, int]:
    parts = name.split(".")
    area = parts[1] if len(parts) > 1 and parts[1] in LAYERS else "pymta"
    return area, LAYERS[area]


MODULES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {module_name(path): imports_of(path) for path in MODULES}


def test_the_package_was_read() -> None:
    assert "pymta.queue.spool" in GRAPH and "pymta.cli.main" in GRAPH
    assert any(GRAPH.values())


@pytest.mark.parametrize("importer", sorted(GRAPH))
def test_layers(importer: str) -> None:
    area, rank = layer(importer)
    wrong = []
    for target, *_ in GRAPH[importer]:
        target_area, target_rank = layer(target)
        if target_area == area:
            continue
        if target_rank > rank or (target_rank == rank and area != "pymta"):
            wrong.append(f"{importer} -> {target}")
    assert wrong == [], f"{importer} imports a higher layer or a peer"


def test_no_cycles() -> None:
    edges = {name: {target for target, *_ in targets if target in GRAPH} for name, targets in GRAPH.items()}
    for name in list(edges):  # importing pymta.x.y runs pymta.x's __init__ too
        edges[name] |= {parent for parent in _parents(name) if parent in GRAPH and parent != name}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert cycles == [], "import cycles"


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_function_level_imports_say_why(path: pathlib.Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    unmarked = []
    for target, line, end, at_top in imports_of(path):
        if not at_top and not any(LAZY_MARK in text for text in lines[line - 1 : end]):
            unmarked.append(f"{path.name}:{line}: {target} imported in a function without '{LAZY_MARK} why'")
    assert not unmarked, "\n".join(unmarked)


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_module_size(path: pathlib.Path) -> None:
    count = len(path.read_text(encoding="utf-8").splitlines())
    assert count <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {count} lines; split it by job"


def test_package_inits_stay_empty() -> None:
    """sendmail imports single modules; an __init__ that imports would load a whole stage at start-up."""
    for init in PACKAGE.glob("*/__init__.py"):
        tree = ast.parse(init.read_text(encoding="utf-8"))
        assert all(isinstance(node, ast.Expr) for node in tree.body), f"{init} does more than document"
