"""Every method's plots are readable: titles and labels inside the figure, axes labelled, and
SMTL's gates as bars (one number per task, not a heatmap's diagonal)."""

from __future__ import annotations

import pytest

import pyromtl
from pyromtl import methods
from pyromtl.plots import run_figures
from tests.conftest import TINY, blobs_mimo, mixed_simo


def _texts_inside(fig) -> None:
    """Every axes of ``fig``, with its title, labels and drawn tick labels, and the figure's title,
    lie inside it once drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # what savefig renders with
    canvas.draw()
    renderer = canvas.get_renderer()
    box = fig.bbox
    extents = [(ax.get_title() or ax.get_ylabel() or "an axes", ax.get_tightbbox(renderer)) for ax in fig.axes]
    if fig._suptitle is not None:
        extents.append((fig._suptitle.get_text(), fig._suptitle.get_window_extent(renderer)))
    for what, extent in extents:
        inside = extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1 and extent.y0 >= box.y0 - 1
        assert inside and extent.y1 <= box.y1 + 1, f"{what!r} is cut off ({extent} outside {box})"


@pytest.mark.parametrize("method", sorted(methods.available()))
def test_every_figure_fits_its_texts(method: str) -> None:
    m = methods.get(method)
    data = mixed_simo() if "simo" in m.settings else blobs_mimo()
    fit = pyromtl.fit(method, data, steps=4, device="cpu", **{**TINY, "eval_every": 2})
    figures = run_figures(fit.metrics(), fit.history, fit.context.replace(doc=fit.metrics()))
    assert {"task_metrics.png", "training.png"} <= set(figures)
    for name, make in figures.items():
        fig = make()
        _texts_inside(fig)
        for ax in fig.axes:
            if ax.images:  # a heatmap: its colour bar says what the colours are
                bars = [a for a in fig.axes if a is not ax and a.get_label() == "<colorbar>"]
                assert all(b.get_ylabel() for b in bars), f"{name}: unlabelled colour bar"
        if name == "relatedness_gates.png":
            (ax,) = fig.axes
            assert len(ax.patches) == data.num_tasks and not ax.images  # bars, one per task
    metrics_fig = figures["task_metrics.png"]()
    assert all(ax.get_ylabel() for ax in metrics_fig.axes)  # each metric on its own labelled axis
