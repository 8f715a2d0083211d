"""The import structure: ``targets`` ← ``profilers`` ← ``search``, no module importing upward, no
import loop anywhere (modules, or ``search``'s subpackages), each package importable alone."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Lower imports nothing of higher.
RANK = {"targets": 0, "profilers": 1, "search": 2}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for top in RANK for path in sorted((REPO / top).rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module ``name`` is, or the package holding it; None outside the project."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """Every project module ``module`` imports, at its top or inside a function: ``from a.b import c``
    imports ``a.b.c`` where that is a module, else ``a.b``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found |= {resolved for name in names if (resolved := _resolve(name)) is not None}
    found.discard(module)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each a loop of imports."""
    index, low, stack, on_stack, loops = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return loops


def test_the_walk_sees_the_imports_it_checks():
    """A guard on the walk itself: known edges of each kind are found."""
    assert "targets._spec" in GRAPH["targets._load"]
    assert "targets" in GRAPH["profilers._base"]
    assert "profilers" in GRAPH["search.artifacts._measure"]
    assert "profilers._pytorch" in GRAPH["profilers._factory"]  # an import inside a function


def test_no_module_imports_a_higher_package():
    upward = [
        f"{module} imports {imported}"
        for module, imported_set in GRAPH.items()
        for imported in imported_set
        if RANK[imported.split(".")[0]] > RANK[module.split(".")[0]]
    ]
    assert not upward, "imports run targets <- profilers <- search; these run upward:\n" + "\n".join(upward)


def test_no_import_loop_between_modules():
    assert not _cycles(GRAPH), f"modules that import each other in a loop: {_cycles(GRAPH)}"


def test_no_import_loop_between_the_concerns_of_search():
    """``search``'s subpackages (and its top-level modules) form layers: none imports one that
    imports it back, directly or through others."""

    def concern(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2]) if parts[0] == "search" else parts[0]

    graph: dict[str, set[str]] = {}
    for module, imported in GRAPH.items():
        graph.setdefault(concern(module), set()).update(concern(i) for i in imported if concern(i) != concern(module))
    assert not _cycles(graph), f"concerns of search that import each other in a loop: {_cycles(graph)}"


def test_search_modules_never_import_the_search_package_itself():
    """``search/__init__`` is the users' face, loading names lazily: a module inside ``search``
    importing it would hide a loop from the walk."""
    inward = [module for module, imported in GRAPH.items() if module != "search" and "search" in imported]
    assert not inward, f"modules importing the search package itself: {inward}"


@pytest.mark.parametrize(
    "package, absent",
    [("targets", ("profilers", "search", "torch")), ("profilers", ("search", "torch", "tensorrt"))],
)
def test_a_lower_package_imports_alone_in_a_fresh_interpreter(package, absent):
    code = (
        f"import sys, {package}\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(absent)!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize(
    "package",
    sorted(module for module, path in MODULES.items() if path.name == "__init__.py"),
)
def test_every_public_name_of_a_package_resolves(package):
    imported = importlib.import_module(package)
    names = getattr(imported, "__all__", ())
    assert names, f"{package} has no __all__"
    missing = [name for name in names if not hasattr(imported, name)]
    assert not missing, f"{package}.__all__ names what it does not have: {missing}"
