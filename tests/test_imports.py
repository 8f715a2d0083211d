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
    imports ``a.b.c`` where that is a module, else ``a.b``. A package that loads its names on first
    use (PEP 562) imports the modules its map is keyed by (a dict literal of module names)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.Dict) and path.name == "__init__.py":
            names = [key.value for key in node.keys if isinstance(key, ast.Constant) and key.value in MODULES]
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
    assert "search.study._run" in GRAPH["search.study"]  # a name the package loads on first use
    assert "profilers._service" in GRAPH["profilers"]


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


def test_no_module_imports_a_package_it_is_part_of():
    """A package loads its modules (``search/__init__``, ``search.study`` and others on first use):
    a module importing a package it lies in would import itself, a loop through the package."""
    inward = [
        f"{module} imports {imported}"
        for module, imported_set in GRAPH.items()
        for imported in imported_set
        if module.startswith(imported + ".")
    ]
    assert not inward, "modules importing a package they are part of:\n" + "\n".join(inward)


# What `search --help`, a usage error and `search results` must not wait for: seconds to import.
HEAVY = ("torch", "sklearn", "scipy", "onnx", "onnxscript", "onnxruntime", "fastapi", "transformers")


def _heavy_imported(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def test_the_command_line_starts_without_the_heavy_libraries():
    assert _heavy_imported("import search, search.cli, profilers") == []


def test_search_results_reads_a_study_without_the_heavy_libraries(finished):
    folder = str(finished[1] / "done")
    code = (
        "from search.cli import app\n"
        "for extra in ([], ['--all'], ['--sensitivity']):\n"
        f"    app(['results', {folder!r}, *extra], standalone_mode=False)\n"
    )
    assert _heavy_imported(code) == []


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
