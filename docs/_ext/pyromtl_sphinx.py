"""Sphinx pieces of the pyromtl docs (``extensions`` in ``docs/conf.py``).

* ``.. pyromtl-prior-kinds::``, ``.. pyromtl-methods::`` and ``.. pyromtl-datasets::``: tables
  read from the registries at build time, so the reference lists every built-in entry;
* aliases: a reference to a re-exported name resolves to the documented one;
* Google-style sections (``Args:``, ``Returns:``) read by napoleon, except in data comments;
* a sphinx-gallery image scraper for the matplotlib Figures that :mod:`pyromtl.plots` returns
  (they are not pyplot figures, so the "matplotlib" scraper does not see them).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import weakref
from typing import Any

from docutils import nodes
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.ext.napoleon import Config as _NapoleonConfig
from sphinx.ext.napoleon.docstring import GoogleDocstring
from sphinx.util.docutils import SphinxDirective


def _first_paragraph(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _list_table(header: tuple[str, ...], rows: list[tuple[str, ...]], widths: str) -> str:
    lines = [".. list-table::", "   :header-rows: 1", f"   :widths: {widths}", ""]
    for row in [header, *rows]:
        lines += [f"   * - {row[0]}", *(f"     - {cell}" for cell in row[1:])]
    return "\n".join(lines)


class PriorKinds(SphinxDirective):
    """``.. pyromtl-prior-kinds::``: every built-in prior kind, its parameters and defaults."""

    def run(self) -> list[nodes.Node]:
        from pyromtl.priors import BUILTIN_KINDS

        rows = []
        for kind in BUILTIN_KINDS:
            params = ", ".join(f"``{k} = {json.dumps(v)}``" for k, v in kind.defaults.items()) or "(none)"
            rows.append((f"``{kind.name}``", params, _first_paragraph(kind.builder) or "\\"))
        return self.parse_text_to_nodes(_list_table(("kind", "parameters (defaults)", "what it is"), rows, "15 35 50"))


class Methods(SphinxDirective):
    """``.. pyromtl-methods::``: every built-in method with its summary and settings."""

    def run(self) -> list[nodes.Node]:
        from pyromtl import methods

        rows = []
        for name, method in methods.builtin().items():
            priors = ", ".join(f"``{site}``" for site in method.priors) or "(none)"
            rows.append((f"``{name}``", method.summary, ", ".join(method.settings).upper(), priors))
        header = ("method", "what it is", "data", "latent sites")
        return self.parse_text_to_nodes(_list_table(header, rows, "15 55 12 18"))


class Datasets(SphinxDirective):
    """``.. pyromtl-datasets::``: every registered dataset with its one-line description."""

    def run(self) -> list[nodes.Node]:
        from pyromtl import datasets

        rows = []
        for name in datasets.available():
            # a docstring's bare :func:`x` means x in the builder's module
            module = datasets._builder(name).__module__
            text = re.sub(r"(:[a-z]+:`~?)([A-Za-z_]+`)", rf"\g<1>{module}.\g<2>", datasets.describe(name))
            rows.append((f"``{name}``", text.replace(f"`{module}.", f"`~{module}.") or "\\"))
        return self.parse_text_to_nodes(_list_table(("name", "what it is"), rows, "20 80"))


# ---------------------------------------------------------------------------- napoleon
# Google-style sections (Args:, Returns:) in the infer building blocks, read by napoleon. Not
# for data and attributes: their "#: text: more text" comments are prose, which napoleon would
# read as "type: description".

_NAPOLEON = _NapoleonConfig(napoleon_use_rtype=False, napoleon_use_param=True)


def _google_sections(app, what: str, name: str, obj: object, options: object, lines: list[str]) -> None:
    if what not in ("data", "attribute", "property"):
        lines[:] = GoogleDocstring(lines, _NAPOLEON, app, what, name, obj, options).lines()


# ---------------------------------------------------------------------------- aliases
# pyromtl re-exports names (pyromtl.Fit is pyromtl.fit.Fit, pyromtl.metrics.accuracy lives in
# pyromtl.metrics.prediction), and type hints carry the defining module. A reference that finds
# no entry under its own name is resolved to the documented name of the same object. A
# reference to a pyromtl object that exists but has no page of its own (an internal helper)
# is shown as code without a link; a name that does not exist still fails the build.

_MISSING = object()


def _lookup(name: str) -> Any:
    """The object a dotted name denotes (a module, or attributes below one), or ``_MISSING``."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, _MISSING)
            if obj is _MISSING:
                return _MISSING
        return obj
    return _MISSING


def _has_identity(obj: Any) -> bool:
    """Whether ``obj`` is one object under several names (not a number or string, which may be equal by chance)."""
    return not isinstance(obj, (int, float, str, bytes, bool)) and obj is not None


_TABLES: dict[int, dict[int, str]] = {}


def _documented(env: BuildEnvironment) -> dict[int, str]:
    """``id(object) -> documented name`` over the Python domain's pyromtl entries, once per build."""
    objects = env.get_domain("py").objects  # type: ignore[attr-defined]
    if id(objects) not in _TABLES:
        table: dict[int, str] = {}
        for name in objects:
            if name.startswith("pyromtl") and _has_identity(obj := _lookup(name)) and obj is not _MISSING:
                table.setdefault(id(obj), name)
        _TABLES[id(objects)] = table
    return _TABLES[id(objects)]


def _resolve_alias(app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: nodes.Element) -> Any:
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    module, cls = node.get("py:module"), node.get("py:class")
    candidates = [f"{module}.{cls}.{target}" if module and cls else "", f"{module}.{target}" if module else "", target]
    # only our own names are imported to be looked up: a bare word is never taken for a module
    for name in (c for c in candidates if c.startswith("pyromtl")):
        obj = _lookup(name)
        if obj is _MISSING:
            continue
        documented = _documented(env).get(id(obj)) if _has_identity(obj) else None
        if documented and documented != name:
            domain = env.get_domain("py")
            found = domain.resolve_any_xref(env, node["refdoc"], app.builder, documented, node, contnode)
            if found:
                return found[0][1]
        return contnode
    return None


# ---------------------------------------------------------------------------- gallery figures
class _FigureScraper:
    """Every matplotlib ``Figure`` bound to a name in the example's globals that was not shown
    before: saved beside the gallery's other images, after the block that made it."""

    def __init__(self) -> None:
        self._shown: weakref.WeakSet[Any] = weakref.WeakSet()

    def __call__(self, block: Any, block_vars: dict[str, Any], gallery_conf: dict[str, Any]) -> str:
        from matplotlib.figure import Figure
        from sphinx_gallery.scrapers import figure_rst

        values = list(block_vars["example_globals"].values())
        figures = [v for v in values if isinstance(v, Figure) and v not in self._shown]
        paths = []
        for fig, path in zip(figures, block_vars["image_path_iterator"]):
            fig.savefig(path, dpi=110)
            self._shown.add(fig)
            paths.append(path)
        return figure_rst(paths, gallery_conf["src_dir"])

    def __repr__(self) -> str:  # sphinx-gallery compares configs by their repr
        return "pyromtl_sphinx._FigureScraper()"


class GalleryOrder:
    """The gallery's order (``within_subsection_order``): the method families as the method pages
    present them, then ArviZ; a file not listed goes last, by name."""

    ORDER = ("plot_vmtl.py", "plot_bayesagg.py", "plot_hib.py", "plot_smtl.py", "plot_weighting.py", "plot_arviz.py")

    def __init__(self, src_dir: str) -> None:
        self.src_dir = src_dir

    def __call__(self, filename: str) -> tuple[int, str]:
        return (self.ORDER.index(filename) if filename in self.ORDER else len(self.ORDER), filename)

    def __repr__(self) -> str:
        return "pyromtl_sphinx.GalleryOrder"


def _get_sg_image_scraper() -> _FigureScraper:
    """What sphinx-gallery calls for the scraper named ``"pyromtl_sphinx"`` in ``image_scrapers``."""
    return _FigureScraper()


def setup(app: Sphinx) -> dict[str, bool]:
    app.connect("missing-reference", _resolve_alias)
    app.connect("autodoc-process-docstring", _google_sections)
    app.add_directive("pyromtl-prior-kinds", PriorKinds)
    app.add_directive("pyromtl-methods", Methods)
    app.add_directive("pyromtl-datasets", Datasets)
    return {"parallel_read_safe": True}
