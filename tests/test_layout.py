"""The package's layout: no private names across modules, no import cycles, one version."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "skpatchcore"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """``(imported module, names, inside a function)`` for each import of the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(n) for f in functions for n in ast.walk(f)}
    type_checking = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "skpatchcore":
                lazy = id(node) in nested or id(node) in type_checking
                yield target, [alias.name for alias in node.names], lazy


def _package_files():
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_imports_a_private_name_of_another_module():
    offenders = []
    for path in _package_files():
        for target, names, _ in _imports(path):
            for name in names:
                if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}: {name} from {target}")
    assert offenders == []


def test_no_import_cycle_between_modules():
    # Imports inside functions count too: a cycle there is a tangle all the same.
    graph: dict[str, set[str]] = {}
    modules = {_module_name(p) for p in _package_files()}
    for path in _package_files():
        edges = graph.setdefault(_module_name(path), set())
        for target, names, _ in _imports(path):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in modules and candidate != _module_name(path):
                    edges.add(candidate)
                    break
    # a package's __init__ importing its own submodules is not a cycle of concern
    cycles = []

    def visit(node, stack, seen):
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                cycle = stack[stack.index(nxt):] + [nxt]
                if not all(m.startswith(cycle[0] + ".") or m == cycle[0] for m in cycle):
                    cycles.append(" -> ".join(cycle))
            elif nxt not in seen:
                seen.add(nxt)
                visit(nxt, stack + [nxt], seen)

    for start in sorted(graph):
        visit(start, [start], {start})
    assert cycles == []


def test_the_version_is_written_once():
    pattern = re.compile(r"""^\s*(__version__|version)\s*=\s*["']\d""", re.M)
    places = [p for p in [*_package_files(), PACKAGE.parent / "pyproject.toml"] if pattern.search(p.read_text())]
    assert [p.name for p in places] == ["_version.py"]
    from importlib.metadata import version

    import skpatchcore

    assert skpatchcore.__version__ == version("skpatchcore")


@pytest.mark.parametrize("old, new, name", [
    ("skpatchcore.metrics", "skpatchcore.evaluation.metrics", "image_auroc"),
    ("skpatchcore.persistence", "skpatchcore.io.model_file", "detect_format"),
    ("skpatchcore.datasets", "skpatchcore.synthetic", "make_synthetic_defects"),
    ("skpatchcore.datasets", "skpatchcore.io.datasets", "load_mvtec"),
    ("skpatchcore.plotting", "skpatchcore.evaluation.figures", "overlay_heatmap"),
])
def test_old_module_paths_still_import_with_a_future_warning(old, new, name):
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new!r})\n"
        f"assert getattr(old, {name!r}) is getattr(new, {name!r})\n"
        "assert any(w.category is FutureWarning and 'moved to' in str(w.message) for w in caught), caught\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
