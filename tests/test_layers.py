"""Lower layers never import higher ones: every import in ``featx/``, lazy ones included, points down or sideways.

The layers, low to high, follow the flow of ``docs/DESIGN.md`` ("Layout"). ``featx/__init__.py``'s lazy
re-exports and ``featx/__main__.py`` sit outside the order: they are not checked as importers.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "featx"

# (prefix, layer): a module belongs to the layer of the longest prefix that names it or a package above it.
LAYERS: tuple[tuple[str, int], ...] = (
    ("featx", 0),  # the package itself: `import featx`, `from featx import __version__`
    ("featx.exceptions", 0),
    ("featx.spec", 0),
    ("featx._runtime", 0),
    ("featx.data", 1),
    ("featx.backbones", 2),
    ("featx.store", 3),
    ("featx.extract", 4),
    ("featx.metrics", 5),
    ("featx.results", 5),
    ("featx.classify", 6),
    ("featx.finetune", 7),
    ("featx.predict", 8),
    ("featx.sklearn", 8),
    ("featx.jobs", 9),
    ("featx.cli", 10),
)
LAYER_NAMES = {
    0: "exceptions/spec/_runtime",
    1: "data",
    2: "backbones",
    3: "store",
    4: "extract",
    5: "metrics/results",
    6: "classify",
    7: "finetune",
    8: "predict/sklearn",
    9: "jobs",
    10: "cli",
}
# Outside the order: re-exporting lazily from every layer, or the `python -m featx` entry.
EXEMPT = frozenset({"featx", "featx.__main__"})

# Upward imports the restructuring has not removed yet: (importing module, imported module).
# This list must shrink to empty; test_allow_listed_upward_imports_still_exist fails once an entry is gone,
# so it cannot keep entries that no longer excuse anything.
KNOWN_UPWARD: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Import:
    """One featx module imported by one featx module."""

    importer: str
    path: Path
    line: int
    target: str


def module_name(path: Path, root: Path) -> str:
    """``root/featx/store/reader.py`` -> ``featx.store.reader``; a package's ``__init__.py`` names the package."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str, root: Path) -> bool:
    """Whether ``name`` (``featx.x.y``) is a module or package of the tree at ``root``."""
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    base = root / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _package_of(importer: str, path: Path) -> str:
    return importer if path.name == "__init__.py" else importer.rpartition(".")[0]


def _resolve_relative(module: str | None, level: int, importer: str, path: Path) -> str:
    if level == 0:
        return module or ""
    base = _package_of(importer, path).split(".")
    if level > 1:
        base = base[: -(level - 1)]
    return ".".join([*base, module] if module else base)


@functools.cache
def _init_bindings(root: Path) -> dict[str, str]:
    """Names ``featx/__init__.py`` binds by importing them (eagerly or in ``__getattr__``) -> their module."""
    init = root / "__init__.py"
    bound: dict[str, str] = {}
    for node in ast.walk(ast.parse(init.read_text(), filename=str(init))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("featx."):
            for alias in node.names:
                bound[alias.asname or alias.name] = node.module
    return bound


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every featx module ``path`` imports, anywhere in the file (module level, functions, ``if`` blocks)."""
    importer = module_name(path, root)
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []

    def add(node: ast.AST, target: str) -> None:
        if target == "featx" or target.startswith("featx."):
            found.append(Import(importer, path, node.lineno, target))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(node.module, node.level, importer, path)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if alias.name != "*" and _is_module(sub, root):
                    add(node, sub)  # `from featx.x import y` with featx/x/y.py imports that submodule
                elif base == "featx" and alias.name in _init_bindings(root):
                    add(node, _init_bindings(root)[alias.name])  # a re-export: count where it comes from
                else:
                    add(node, base)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                add(node, node.args[0].value)
    return found


def layer_of(module: str, root: Path) -> int:
    """The layer of ``module``: that of the longest prefix in :data:`LAYERS` naming it or a package above it."""
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_layers.py")
    return dict(LAYERS)[best]


def upward_imports(root: Path) -> list[tuple[Import, int, int]]:
    """(import, importer's layer, target's layer) for every import from a lower layer into a higher one."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        if importer in EXEMPT:
            continue
        low = layer_of(importer, root)
        for imp in imports_of(path, root):
            high = layer_of(imp.target, root)
            if high > low:
                bad.append((imp, low, high))
    return bad


def _describe(imp: Import, low: int, high: int, root: Path) -> str:
    where = imp.path.relative_to(root.parent)
    return (
        f"{where}:{imp.line}: {imp.importer} (layer {low}, {LAYER_NAMES[low]}) imports {imp.target} "
        f"(layer {high}, {LAYER_NAMES[high]})"
    )


def test_every_module_has_a_layer():
    modules = [module_name(p, PACKAGE) for p in sorted(PACKAGE.rglob("*.py"))]
    assert "featx.store.reader" in modules and "featx._runtime.io" in modules  # the walk sees the tree
    for module in modules:
        layer_of(module, PACKAGE)  # raises, naming the module, if LAYERS does not cover it


def test_lower_layers_never_import_higher_ones():
    bad = [b for b in upward_imports(PACKAGE) if (b[0].importer, b[0].target) not in KNOWN_UPWARD]
    assert not bad, "upward imports (lower layers must not import higher ones):\n" + "\n".join(
        _describe(*b, PACKAGE) for b in bad
    )


def test_allow_listed_upward_imports_still_exist():
    present = {(imp.importer, imp.target) for imp, _, _ in upward_imports(PACKAGE)}
    gone = sorted(KNOWN_UPWARD - present)
    assert not gone, f"no longer imported: remove from KNOWN_UPWARD in tests/test_layers.py: {gone}"


def import_circles(root: Path) -> list[list[str]]:
    """Every set of modules that import each other round a circle (lazy and ``TYPE_CHECKING`` imports too),
    each sorted, found as the strongly connected components of the import graph (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        if importer not in EXEMPT:
            graph[importer] = {i.target for i in imports_of(path, root) if i.target not in (importer, "featx")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return circles


def test_no_import_circles():
    circles = import_circles(PACKAGE)
    assert not circles, "modules importing each other (move what both need below them):\n" + "\n".join(
        " <-> ".join(c) for c in circles
    )


def test_the_circle_finder_catches_a_planted_circle(tmp_path):
    root = _plant(
        tmp_path,
        {
            "jobs/__init__.py": "",
            "jobs/schema.py": "from featx.jobs.values import check\n",
            "jobs/values.py": "import typing\nif typing.TYPE_CHECKING:\n    from featx.jobs import schema\n",
            "jobs/runner.py": "from featx.jobs import schema, values\n",  # imports both, in no circle
        },
    )
    assert import_circles(root) == [["featx.jobs.schema", "featx.jobs.values"]]


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "featx"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_walker_catches_planted_upward_imports(tmp_path):
    root = _plant(
        tmp_path,
        {
            "__init__.py": "def __getattr__(name):\n    from featx.sklearn import ConvNetFeatures\n",
            "spec.py": "import featx\nfrom featx import __version__\nfrom featx._runtime import io\n",
            "_runtime/__init__.py": "",
            "_runtime/io.py": "",
            "store/__init__.py": "from .reader import open\n",
            "store/reader.py": "from featx.data import x\nfrom . import format\n",
            "store/format.py": "def lazy():\n    from ..extract import api\n",  # lazy and relative
            "data/__init__.py": "import importlib\n\ndef f():\n    importlib.import_module('featx.jobs.report')\n",
            "extract/__init__.py": "",
            "extract/api.py": "from featx import classify\n",  # `from featx import <subpackage>`
            "classify/__init__.py": "",
            "jobs/__init__.py": "",
            "jobs/report.py": "",
            "sklearn.py": "",
            "backbones.py": "if True:\n    from featx import ConvNetFeatures\n",  # a lazy re-export of layer 8
            "results.py": "from featx.jobs import report\n",
        },
    )
    found = {(imp.importer, imp.target, imp.line, low, high) for imp, low, high in upward_imports(root)}
    assert found == {
        ("featx.store.format", "featx.extract.api", 2, 3, 4),
        ("featx.data", "featx.jobs.report", 4, 1, 9),
        ("featx.extract.api", "featx.classify", 1, 4, 6),
        ("featx.backbones", "featx.sklearn", 2, 2, 8),
        ("featx.results", "featx.jobs.report", 1, 5, 9),
    }
    message = _describe(*next(b for b in upward_imports(root) if b[0].importer == "featx.store.format"), root)
    assert message == (
        "featx/store/format.py:2: featx.store.format (layer 3, store) imports featx.extract.api (layer 4, extract)"
    )


def test_the_walker_matches_python_on_the_real_tree():
    # Resolution of relative and `from package import submodule` imports agrees with importlib's.
    for path in (PACKAGE / "store" / "__init__.py", PACKAGE / "classify" / "__init__.py"):
        for imp in imports_of(path, PACKAGE):
            assert importlib.util.find_spec(imp.target) is not None, imp


@pytest.mark.parametrize("module", ["featx.cli", "featx.cli.commands"])
def test_cli_is_the_top_layer_as_a_module_or_a_package(module):
    assert layer_of(module, PACKAGE) == 10
