"""Sphinx configuration of the pyromtl site: API from docstrings, MyST pages, an executed gallery.

Build with ``bash .ci/docs`` (``sphinx-build -W --keep-going``: every warning fails the build).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))
# matplotlib draws to files while the gallery runs; no display is needed
os.environ.setdefault("MPLBACKEND", "agg")
# ArviZ announces its backends at INFO level on import, into the build's output
logging.getLogger("arviz").setLevel(logging.WARNING)

import pyromtl  # noqa: E402

project = "pyromtl"
author = "the pyromtl authors"
copyright = "2026, the pyromtl authors"
release = pyromtl.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
    "sphinxarg.ext",
    # ours (docs/_ext): registry tables, alias resolution, Google sections, gallery figures
    "pyromtl_sphinx",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_intersphinx", "Thumbs.db", ".DS_Store", "auto_examples/*.ipynb", "auto_examples/*.py"]

# Broken references fail the build (with -W); the few known exceptions are listed below.
nitpicky = True
nitpick_ignore = [
    # pyromtl.collective.Group, imported under TYPE_CHECKING only, so a signature names it bare
    ("py:class", "Group"),
]

# ---------------------------------------------------------------------------- MyST
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# ---------------------------------------------------------------------------- autodoc
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": False}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
# a method without a docstring of its own is left out, not shown with torch's or Pyro's
autodoc_inherit_docstrings = False
autodoc_preserve_defaults = True


# ---------------------------------------------------------------------------- intersphinx
# No network in CI: each project's inventory is a small local file listing the objects these
# docs reference, written by docs/_intersphinx/build.py; links still point at the real sites.
_INV = DOCS / "_intersphinx"
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", str(_INV / "python.inv")),
    "numpy": ("https://numpy.org/doc/stable", str(_INV / "numpy.inv")),
    "torch": ("https://docs.pytorch.org/docs/stable", str(_INV / "torch.inv")),
    "pyro": ("https://docs.pyro.ai/en/stable", str(_INV / "pyro.inv")),
    "arviz": ("https://python.arviz.org", str(_INV / "arviz.inv")),
    "torchjd": ("https://torchjd.org/stable", str(_INV / "torchjd.inv")),
    "xarray": ("https://docs.xarray.dev/en/stable", str(_INV / "xarray.inv")),
    "matplotlib": ("https://matplotlib.org/stable", str(_INV / "matplotlib.inv")),
}

# ---------------------------------------------------------------------------- gallery
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples" / "gallery"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "within_subsection_order": "pyromtl_sphinx.GalleryOrder",
    "download_all_examples": False,
    "remove_config_comments": True,
    "reference_url": {"pyromtl": None},
    "matplotlib_animations": False,
    # pyplot figures (ArviZ's), and the matplotlib Figures pyromtl.plots returns
    "image_scrapers": ("matplotlib", "pyromtl_sphinx"),
}

# ---------------------------------------------------------------------------- HTML
html_theme = "furo"
html_title = f"pyromtl {release}"
