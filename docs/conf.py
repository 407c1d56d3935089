"""Sphinx configuration: the API reference from emu's docstrings, and the tutorial."""

from __future__ import annotations

import os
import sys

# The checkout's emu first (its compiled part must be installed: pip install ".[docs]").
sys.path.insert(0, os.path.abspath(".."))

project = "emu"
author = "the emu authors"
copyright = "the emu authors"
release = "0.1.0"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
# `name` in a docstring means an argument or a code name, not a cross-reference.
default_role = "code"
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_title = "emu: Linux-kernel-style concurrency, for real, in Python"
