"""The documentation builds without warnings, and the README's links resolve."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_sphinx_build_has_no_warnings(tmp_path):
    for module in ("sphinx", "numpydoc"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]')")
    output = tmp_path / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(output)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (output / "api.html").read_text(encoding="utf-8")
    assert "PatchCoreDetector" in api
    assert (output / "_static" / "demo_heatmap.png").is_file()


def test_readme_links_point_to_files():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)\)", readme)
    assert targets, "the README links to the docs pages"
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_demo_heatmap_is_small():
    picture = DOCS / "_static" / "demo_heatmap.png"
    assert picture.is_file()
    assert picture.stat().st_size < 200_000
