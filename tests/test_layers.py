"""The layering of services/ (services/__init__.py): imports only go downward, no cycles, no
imports inside functions except optional or heavy dependencies. Checked on the source (ast), so
a new upward import fails here before anything runs."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("core", "io", "state", "runtime", "stages", "watcher", "monitoring", "local", "ops")
LEAVES = ("messages", "kernels")  # below every layer; they import nothing from services
PACKAGES = ("services", *LEAVES)
# imported where used: optional (cupy, pynvml) or slow to import and needed by few paths
LAZY_ALLOWED = {"cupy", "cupyx", "pynvml", "scipy", "nibabel", "PIL"}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported project module
    line: int
    in_function: bool
    type_only: bool  # under `if TYPE_CHECKING:`


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            found[module_name(root, path)] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(root: Path) -> tuple[list[Import], list[tuple[str, int, str]]]:
    """Project imports of every module, and in-function imports of anything else."""
    known = modules(root)
    found: list[Import] = []
    lazy: list[tuple[str, int, str]] = []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(node: ast.AST, in_function: bool, type_only: bool, name=name, package=package):
            for child in ast.iter_child_nodes(node):
                func = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
                typed = type_only or (
                    isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
                )
                if isinstance(child, ast.Import | ast.ImportFrom):
                    if isinstance(child, ast.Import):
                        targets = [alias.name for alias in child.names]
                    else:
                        base = child.module or ""
                        if child.level:
                            parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                            base = ".".join([*parts, base] if base else parts)
                        targets = [base] + [f"{base}.{alias.name}" for alias in child.names]
                    project = {_resolve(t, known) for t in targets if t.split(".")[0] in PACKAGES}
                    for target in sorted(t for t in project if t and t != name):
                        found.append(Import(name, target, child.lineno, func, typed))
                    if func and not project:
                        top = targets[0].split(".")[0]
                        if top not in LAZY_ALLOWED:
                            lazy.append((name, child.lineno, targets[0]))
                visit(child, func, typed)

        visit(ast.parse(path.read_text()), False, False)
    return found, lazy


def rank(module: str) -> int:
    """-1 for the leaves, else the layer's position (services/__init__ is above all)."""
    parts = module.split(".")
    if parts[0] in LEAVES:
        return -1
    if len(parts) == 1:
        return len(LAYERS)
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else len(LAYERS) + 1


def upward(found: list[Import]) -> list[str]:
    def why(i: Import) -> str:
        return "a higher layer" if rank(i.source) >= 0 else "services"

    return [
        f"{i.source}:{i.line} imports {i.target} ({why(i)})"
        for i in found
        if rank(i.target) > rank(i.source)
        or (rank(i.source) == -1 and i.target.split(".")[0] != i.source.split(".")[0])
    ]


def cycles(found: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (runtime imports only)."""
    graph: dict[str, set[str]] = {}
    for i in found:
        if not i.type_only:
            graph.setdefault(i.source, set()).add(i.target)
            graph.setdefault(i.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_services_has_only_layer_packages_each_with_a_docstring():
    services = REPO / "services"
    flat = sorted(p.name for p in services.glob("*.py") if p.name != "__init__.py")
    assert flat == [], f"modules outside a layer: {flat}"
    packages = sorted(p.name for p in services.iterdir() if (p / "__init__.py").exists())
    assert sorted(packages) == sorted(LAYERS)
    overview = ast.get_docstring(ast.parse((services / "__init__.py").read_text())) or ""
    for layer in LAYERS:
        doc = ast.get_docstring(ast.parse((services / layer / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"services/{layer}/__init__.py needs its paragraph"
        assert f"\n    {layer} " in overview, f"services/__init__.py does not list {layer}"
    architecture = (REPO / "docs" / "architecture.md").read_text()
    for layer in LAYERS:
        assert f"\n {layer}/ " in architecture, f"docs/architecture.md lacks {layer}/"


def test_imports_only_go_downward():
    found, _ = imports(REPO)
    assert upward(found) == []


def test_no_import_cycles():
    found, _ = imports(REPO)
    assert cycles(found) == []


def test_no_imports_inside_functions_except_optional_or_heavy_dependencies():
    found, lazy = imports(REPO)
    inner = [f"{i.source}:{i.line} imports {i.target}" for i in found if i.in_function]
    outside = [f"{m}:{line} imports {t}" for m, line, t in lazy]
    assert inner + outside == []


def test_the_checks_catch_an_upward_import_a_cycle_and_a_lazy_import(tmp_path):
    """The checks above can fail: a small tree with one of each violation."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    for layer in ("core", "runtime"):
        (tmp_path / "services" / layer).mkdir()
        (tmp_path / "services" / layer / "__init__.py").write_text("")
    (tmp_path / "services/core/a.py").write_text("from services.runtime.b import x\n")
    (tmp_path / "services/runtime/b.py").write_text(
        "from services.core.a import y\n\ndef f():\n    import json\n"
    )
    (tmp_path / "kernels/k.py").write_text("from services.core import a\n")
    found, lazy = imports(tmp_path)
    assert sorted(upward(found)) == [
        "kernels.k:1 imports services.core (services)",
        "kernels.k:1 imports services.core.a (services)",
        "services.core.a:1 imports services.runtime.b (a higher layer)",
    ]
    assert cycles(found) == [["services.core.a", "services.runtime.b"]]
    assert lazy == [("services.runtime.b", 4, "json")]


def exception_classes(root: Path) -> list[str]:
    """Classes under services/ outside core/errors.py whose bases name an error or exception."""
    found = []
    for path in sorted((root / "services").rglob("*.py")):
        if path == root / "services" / "core" / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                ast.unparse(base).endswith(("Error", "Exception", "Refused", "Unsupported"))
                for base in node.bases
            ):
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}")
    return found


def test_error_classes_live_in_core_errors(tmp_path):
    assert exception_classes(REPO) == []
    (tmp_path / "services/ops").mkdir(parents=True)
    (tmp_path / "services/ops/x.py").write_text("class Oops(ValueError):\n    pass\n")
    assert exception_classes(tmp_path) == ["services/ops/x.py:1 Oops"]
