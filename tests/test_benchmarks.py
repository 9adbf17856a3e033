"""The benchmark scripts: importable without running, and on the public API only.

Nothing here runs a benchmark (they need ../shared and minutes to hours);
the scripts' figures are in docs/results.md with their commands.
"""

import ast
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(path for path in BENCHMARKS.glob("*.py") if not path.name.startswith("_"))


def _import(path: Path, monkeypatch):
    """Import a script as a module the way ``python benchmarks/x.py`` finds its imports."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", [str(path), "--no-such-option"])  # parsing at import would exit
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_is_found():
    names = {path.stem for path in SCRIPTS}
    assert {"evaluate_mvtec", "speed", "scaling", "model_files", "model_selection", "growth"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.stem)
def test_benchmark_imports_without_running_and_has_main(path, monkeypatch, capsys):
    module = _import(path, monkeypatch)
    assert callable(module.main)
    assert "argv" in inspect.signature(module.main).parameters, "main(argv) parses its own arguments"
    assert capsys.readouterr().out == "", "importing a benchmark prints nothing (it runs nothing)"
    assert module.__doc__ and "python benchmarks/" in module.__doc__, "the docstring shows the command"
    with pytest.raises(SystemExit) as error:  # --help: the arguments are parsed inside main
        module.main(["--help"])
    assert error.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("path", [*SCRIPTS, BENCHMARKS / "_common.py"], ids=lambda path: path.stem)
def test_benchmark_uses_the_public_api_only(path):
    """No private skpatchcore module or name, no private attribute, no sys.path edits."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("skpatchcore"):
            problems += [f"from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
            if any(part.startswith("_") for part in node.module.split(".")):
                problems.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Import):
            problems += [a.name for a in node.names
                         if a.name.startswith("skpatchcore") and any(p.startswith("_") for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute):
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                problems.append(f".{node.attr}")
            if node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys":
                problems.append("sys.path")
    assert not problems, f"{path.name} reaches past the public API: {problems}"


def test_common_table_rows(capsys):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from _common import print_header, print_row
    finally:
        sys.path.remove(str(BENCHMARKS))
    print_header("a", "b")
    print_row("x", 0.12345, digits=2)
    assert capsys.readouterr().out.splitlines() == ["| a | b |", "|---|---|", "| x | 0.12 |"]


def test_tiling_benchmark_image_auroc_by_defect_type(tmp_path, monkeypatch):
    """Each defect type against the good images, from evaluate's scores.csv; unreadable rows are skipped."""
    module = _import(BENCHMARKS / "tiling.py", monkeypatch)
    scores = tmp_path / "scores.csv"
    scores.write_text(
        "path,defect_type,label,anomaly_score,decision,prediction,error,heatmap\n"
        "g1,good,0,1.0,,,,\n"
        "g2,good,0,3.0,,,,\n"
        "c1,crack,1,2.0,,,,\n"
        "c2,crack,1,4.0,,,,\n"
        "u1,uneven,1,5.0,,,,\n"
        "u2,uneven,1,,,,unreadable image,\n",
        encoding="utf-8")
    assert module._by_defect_type(scores) == {"crack": 0.75, "uneven": 1.0}
    one_type = tmp_path / "one_type.csv"
    one_type.write_text(scores.read_text(encoding="utf-8").replace("uneven", "crack"), encoding="utf-8")
    assert module._by_defect_type(one_type) == {}, "a single defect type is the whole test set: nothing to split"
