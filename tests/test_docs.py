"""The documentation builds without warnings, its examples and docstring examples run.

Also: the README's links resolve.
"""

import doctest
import importlib
import importlib.util
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import skpatchcore

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"
DOCS_MODULES = ("sphinx", "numpydoc", "sphinx_gallery", "myst_parser", "matplotlib")


def _package_modules():
    """Every module of the skpatchcore package, by dotted name."""
    names = ["skpatchcore"]
    for info in pkgutil.walk_packages(skpatchcore.__path__, prefix="skpatchcore."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return sorted(names)


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory):
    """The HTML pages, built from a copy of docs/ and examples/ with warnings as errors.

    Building from a copy runs every gallery example afresh (sphinx-gallery
    skips examples whose outputs in ``docs/auto_examples`` are up to date)
    and leaves the checkout untouched.
    """
    for module in DOCS_MODULES:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]')")
    root = tmp_path_factory.mktemp("docs")
    source = root / "docs"
    shutil.copytree(DOCS, source, ignore=shutil.ignore_patterns("_build", "auto_examples", "sg_execution_times.rst"))
    shutil.copytree(EXAMPLES, root / "examples")
    output = root / "html"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               MPLBACKEND="Agg")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(root / "doctrees"), str(source), str(output)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return output


def test_sphinx_build_has_no_warnings(built_docs):
    api = (built_docs / "api.html").read_text(encoding="utf-8")
    assert "PatchCoreDetector" in api
    assert (built_docs / "_static" / "demo_heatmap.png").is_file()


def test_results_page_is_rendered_markdown(built_docs):
    page = (built_docs / "results.html").read_text(encoding="utf-8")
    assert "<table" in page, "results.md's tables are rendered as HTML tables"
    assert "| training images |" not in page, "results.md is not shown as raw Markdown"
    assert (built_docs / "_images" / "growth.png").is_file()
    assert "archive/benchmarks-notebook.html" in page, "the results page links to the archived notebook"
    notebook = (built_docs / "archive" / "benchmarks-notebook.html").read_text(encoding="utf-8")
    assert "<table" in notebook and "results.html" in notebook


def test_user_documentation_names_no_issue_numbers():
    pages = [ROOT / "README.md", *DOCS.rglob("*.rst"), *DOCS.rglob("*.md")]
    pages = [page for page in pages if "_build" not in page.parts and "auto_examples" not in page.parts]
    hits = [f"{page.relative_to(ROOT)}: {match.group(0)}" for page in pages
            for match in re.finditer(r"\bissues? #?\d+", page.read_text(encoding="utf-8"), re.IGNORECASE)]
    assert not hits, hits


def test_results_page_sections_and_commands():
    """Organised by question; every command it quotes names a benchmark script that exists."""
    text = (DOCS / "results.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    for question in ("Accuracy", "Speed", "Memory", "Scaling", "Large images (tiling)", "Model files", "Deployment"):
        assert question in headings
    scripts = set(re.findall(r"benchmarks/(\w+)\.py", text))
    assert scripts, "the results page quotes its commands"
    missing = sorted(name for name in scripts if not (ROOT / "benchmarks" / f"{name}.py").is_file())
    assert not missing, f"docs/results.md quotes missing benchmark scripts: {missing}"


def test_gallery_examples_run_and_render(built_docs):
    examples = sorted(EXAMPLES.glob("plot_*.py"))
    assert len(examples) >= 3
    index = (built_docs / "auto_examples" / "index.html").read_text(encoding="utf-8")
    for example in examples:
        assert f"{example.stem}.html" in index, f"{example.name} is missing from the gallery index"
        page = (built_docs / "auto_examples" / f"{example.stem}.html").read_text(encoding="utf-8")
        assert "sphx-glr-script-out" in page, f"{example.name} printed nothing in the gallery"
        figures = list((built_docs / "_images").glob(f"sphx_glr_{example.stem}_*.png"))
        assert figures, f"{example.name} drew no figure in the gallery"
    toc = (built_docs / "index.html").read_text(encoding="utf-8")
    assert "auto_examples/index.html" in toc


@pytest.mark.parametrize("name", _package_modules())
def test_docstring_examples(name, tmp_path, monkeypatch):
    """The ``>>>`` examples of every module's docstrings run and print what they show."""
    try:
        module = importlib.import_module(name)
    except ImportError as error:  # an optional dependency (dask, pandas...) is missing
        pytest.skip(f"{name} needs {error.name}")
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    finder = doctest.DocTestFinder(exclude_empty=True)
    report = []
    for test in finder.find(module, name):
        if test.examples:
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            runner.run(test, out=report.append)
    assert not report, "".join(report)


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
