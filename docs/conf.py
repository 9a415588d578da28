"""Sphinx configuration: the pages in docs/ (Markdown, through myst-parser), README.md as the
front page, and the API reference (docs/api.rst) generated from the docstrings.

Build it as CI does, warnings as errors:
``pip install -e '.[docs]' && sphinx-build -E -W --keep-going -b html docs docs/_build/html``.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "_ext"))

project = "mpipub"
author = "the mpipub developers"
copyright = "the mpipub developers"  # noqa: A001 - Sphinx's name for it

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "mpipub_cli",  # docs/_ext/mpipub_cli.py: the `mpipub` command's help, from its parser
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# README.md links to sections by their slug (#on-a-cluster)
myst_heading_anchors = 3
# the tables in README.md and docs/benchmarks.md are GitHub-flavoured
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False}
# type hints go into the description, not the signature (long unions stay readable)
autodoc_typehints = "description"
# parameter types only where the docstring names the parameter (the docstrings are prose,
# not Google/NumPy sections); return types always
autodoc_typehints_description_target = "documented_params"
autodoc_typehints_format = "short"
# Importing mpipub's public names must not start MPI; nothing in them does at import time,
# and h5py, numpy, matplotlib are real imports (installed with mpipub).

html_theme = "alabaster"
html_static_path: list = []

# The one link out of docs/ that Sphinx cannot follow: benchmarks/README.md (the benchmark's
# method, beside its code; README.md and docs/benchmarks.md link to it for readers of the
# repository). Every other link must resolve.
nitpick_ignore_regex = [("myst", r".*benchmarks/README(\.md)?")]
