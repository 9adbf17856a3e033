"""Sphinx configuration of the skpatchcore documentation.

Build (warnings are errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Pages are reStructuredText; ``benchmarks.md`` (Markdown, written by hand) is
shown verbatim by ``benchmarks.rst`` because Sphinx reads Markdown only with
myst-parser, which is not a dependency. No extension needs network access.
"""

import sys
from pathlib import Path

# Document the checkout next to this folder, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skpatchcore import __version__  # noqa: E402

project = "skpatchcore"
author = "skpatchcore developers"
copyright = "skpatchcore developers"
version = __version__
release = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "numpydoc",
]

source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
templates_path = []

# autodoc / numpydoc
autodoc_member_order = "bysource"
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_xref_param_type = False

html_theme = "alabaster"
html_static_path = ["_static"]
html_title = f"skpatchcore {release}"
