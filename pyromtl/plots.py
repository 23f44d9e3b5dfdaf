"""Plots of a run: training curves, per-task metrics and task-relatedness heatmaps.

Plots read only what a run directory holds (the training history, ``metrics.json``), so
``pyromtl report`` draws the same pictures as ``fit`` did. Data reach matplotlib as numpy
arrays: its unit lookup would otherwise probe for jax (which ArviZ leaves as a lazy module)
and import it.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pyromtl.method import MethodContext
from pyromtl.metrics import primary_metric
from pyromtl.rundir import RunDir, plain_name


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (110 dpi).

    Args:
        fig: a matplotlib ``Figure``.

    Returns:
        The PNG file's bytes.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)  # constrained layout already fits; "tight" would draw twice
    return buf.getvalue()


def _figure(width: float, height: float):
    # A bare Figure renders with Agg and never enters pyplot's registry, so there is
    # nothing to close and no GUI backend is touched.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_training(history: Sequence[Mapping[str, float]], kept_step: int | None = None):
    """Training loss and, when recorded, the validation score against the step (stacked panels).

    ``kept_step`` (the state model selection kept) is marked on both panels.

    Args:
        history: the run's history: dicts with ``step``, ``loss`` and optionally ``val_score``.
        kept_step: the step model selection kept (not marked when None or 0).

    Returns:
        A matplotlib ``Figure`` (not registered with pyplot).
    """
    scored = [h for h in history if "val_score" in h]
    fig = _figure(6.0, 5.0 if scored else 3.0)
    axes = fig.subplots(2 if scored else 1, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].plot(np.array([h["step"] for h in history]), np.array([h["loss"] for h in history]), marker=".")
    axes[0].set_ylabel("training loss")
    axes[0].set_title("training")
    if scored:
        axes[1].plot(
            np.array([h["step"] for h in scored]),
            np.array([h["val_score"] for h in scored]),
            marker=".",
            color="tab:orange",
        )
        axes[1].set_ylabel("validation score\n(higher is better)")
    if kept_step is not None and kept_step > 0:
        for ax in axes:
            ax.axvline(kept_step, color="grey", linestyle="--", linewidth=1, label=f"kept: step {kept_step}")
        # in the legend, where it cannot overlap the curve or the axis
        axes[0].legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("step")
    return fig


def plot_task_metrics(tasks: Mapping[str, Mapping[str, float]], split: str = "test"):
    """Each task's headline metric as a bar, one panel per metric (accuracy: higher is better;
    NMSE: lower is better), so metrics of different scales never share an axis.

    Args:
        tasks: ``{task: {metric: value}}``.
        split: the split named in the titles.

    Returns:
        A matplotlib ``Figure`` (not registered with pyplot).
    """
    names = list(tasks)
    keys = [primary_metric(tasks[n]) or next(iter(tasks[n])) for n in names]
    kinds = list(dict.fromkeys(keys))
    fig = _figure(max(4.0, 0.6 * len(names) + 1.5 * len(kinds) + 1.0), 3.5)
    axes = fig.subplots(1, len(kinds), squeeze=False, width_ratios=[keys.count(k) + 1 for k in kinds])[0]
    for ax, kind, colour in zip(axes, kinds, ("tab:blue", "tab:green", "tab:purple", "tab:orange")):
        shown = [n for n, k in zip(names, keys) if k == kind]
        values = np.array([float(tasks[n][kind]) for n in shown])
        bars = ax.bar(np.arange(len(shown)), values, color=colour)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_xticks(np.arange(len(shown)), shown, rotation=30 if len(shown) > 4 else 0, ha="right", fontsize=8)
        better = "lower" if kind in ("nmse", "mse", "mae", "nll", "ece", "brier") else "higher"
        ax.set_ylabel(f"{kind} ({better} is better)")
        ax.margins(y=0.15)
    fig.suptitle(f"{split} metric per task")
    return fig


def _title(ax, title: str, width_inches: float) -> None:
    """A title wrapped to the figure's width (about 9 characters an inch at the default size)."""
    ax.set_title(textwrap.fill(title, max(20, int(9 * width_inches))))


def plot_relatedness(matrix: np.ndarray, task_names: Sequence[str], title: str, value_label: str = "value"):
    """Heatmap of a task-by-task matrix, task names on both axes and each value written in.

    The colour scale spans the off-diagonal values (a task's weight on itself is 0 by
    construction and drawn grey), so 0.08 and 0.16 look different.

    Args:
        matrix: ``[T, T]`` values.
        task_names: the T task names.
        title: the figure's title.
        value_label: the colour bar's label.

    Returns:
        A matplotlib ``Figure`` (not registered with pyplot).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    T = len(task_names)
    off = ~np.eye(T, dtype=bool)
    values = matrix[off] if T > 1 else matrix.ravel()
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    hi = hi if hi > lo else lo + 1e-9
    width = 1.0 + 0.6 * T + 1.5
    fig = _figure(width, 1.5 + 0.6 * T)
    ax = fig.add_subplot()
    shown = np.where(off, matrix, np.nan) if T > 1 else matrix
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=lo, vmax=hi)
    fig.colorbar(image, ax=ax, shrink=0.8, label=value_label)
    ticks = np.arange(T)
    ax.set_xticks(ticks, task_names, rotation=45, ha="right")
    ax.set_yticks(ticks, task_names)
    ax.set_xlabel("other task")
    ax.set_ylabel("task")
    for (i, j), value in np.ndenumerate(matrix):
        bright = (value - lo) / (hi - lo) > 0.6 if off[i, j] else True
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color="black" if bright else "white")
    _title(ax, title, width)
    return fig


def plot_gates(alpha: Sequence[float] | np.ndarray, task_names: Sequence[str], title: str):
    """One bar per task: its gate α_t in [0, 1] (SMTL: the weight of the public side), the tie at 0.5 marked.

    Args:
        alpha: ``[T]`` gate values.
        task_names: the T task names.
        title: the figure's title.

    Returns:
        A matplotlib ``Figure`` (not registered with pyplot).
    """
    values = np.asarray(alpha, dtype=np.float64)
    width = max(4.0, 0.7 * len(task_names) + 1.5)
    fig = _figure(width, 3.5)
    ax = fig.add_subplot()
    bars = ax.bar(np.arange(len(values)), values, color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="0.5: the lite gates' threshold")
    ax.set_xticks(np.arange(len(values)), task_names, rotation=30 if len(values) > 4 else 0, ha="right")
    ax.set_ylim(0.0, 1.1)
    ax.set_ylabel("α_t")
    ax.legend(fontsize=8, loc="upper right")
    _title(ax, title, width)
    return fig


def plot_dendrogram(linkage: np.ndarray, task_names: Sequence[str], title: str = "task clustering"):
    """Dendrogram of a scipy linkage matrix (e.g. :func:`pyromtl.infer.hib.cluster_tasks`), one labelled
    leaf per task; the x tick labels are the task names in leaf order.

    Args:
        linkage: a ``[T − 1, 4]`` scipy linkage matrix.
        task_names: the T task names.
        title: the figure's title.

    Returns:
        A matplotlib ``Figure`` (not registered with pyplot).

    Raises:
        ValueError: an invalid linkage matrix, or a number of names other than T.
    """
    from scipy.cluster import hierarchy

    linkage = np.asarray(linkage, dtype=np.float64)
    if linkage.ndim != 2 or linkage.shape[1] != 4 or not hierarchy.is_valid_linkage(linkage):
        raise ValueError(f"linkage: not a valid scipy linkage matrix (shape {linkage.shape})")
    if len(task_names) != linkage.shape[0] + 1:
        raise ValueError(f"task_names: expected {linkage.shape[0] + 1} names, got {len(task_names)}")
    width = 2.0 + 0.5 * len(task_names)
    fig = _figure(width, 3.5)
    ax = fig.add_subplot()
    hierarchy.dendrogram(linkage, labels=[str(n) for n in task_names], ax=ax, leaf_rotation=45)
    ax.set_xlabel("task")
    ax.set_ylabel("merge distance")
    _title(ax, title, width)
    return fig


def plot_leaderboard(data: str, rows: Sequence[Mapping[str, Any]]):
    """A dataset's leaderboard (:func:`pyromtl.leaderboard.tables` rows) in two or three panels:
    Δm% with its 95% interval per method; Δ_I% against η̂ (safety: up and right is better); and,
    where the dataset knows its relatedness, each method's recovery ρ with its interval.

    Args:
        data: the dataset's name.
        rows: its leaderboard rows.

    Returns:
        A matplotlib ``Figure`` (not registered with pyplot).
    """

    def pick(key: str) -> list[tuple[str, float, float]]:
        return [(str(r["method"]), *r[key]) for r in rows if r.get(key) is not None]

    recovered = pick("relatedness ρ")
    panels = 3 if recovered else 2
    height = 1.2 + 0.3 * len(rows)
    fig = _figure(4.2 * panels, max(3.0, height))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, key, label in (
        (axes[0], "Δm%", "Δm% vs stl (lower is better)"),
        *(((axes[2], "relatedness ρ", "relatedness recovered (Spearman ρ)"),) if recovered else ()),
    ):
        shown = pick(key)
        ticks = np.arange(len(shown))
        ax.errorbar(
            np.array([m for _, m, _ in shown]), ticks, xerr=np.array([h for _, _, h in shown]), fmt="o", capsize=3
        )
        ax.set_yticks(ticks, [n for n, _, _ in shown])
        ax.axvline(0.0, color="grey", linestyle=":", linewidth=1)
        ax.invert_yaxis()
        ax.set_xlabel(label)
    safety = [(str(r["method"]), r["Δ_I%"][0], r["η̂"][0]) for r in rows if r.get("Δ_I%") and r.get("η̂")]
    ax = axes[1]
    ax.scatter(np.array([d for _, d, _ in safety]), np.array([e for _, _, e in safety]))
    for name, d, e in safety:
        ax.annotate(name, (d, e), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(0.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("Δ_I% vs stl (higher is better)")
    ax.set_ylabel("η̂ (100: no task worse than stl)")
    fig.suptitle(data)
    return fig


def plot_ranks(ranks: Mapping[str, float], critical_difference: float | None, datasets: int):
    """Average ranks (1 is best) on one axis, with Nemenyi's critical difference drawn as a bar:
    methods closer than it are not told apart at the 5% level (a critical-difference diagram).

    Args:
        ranks: ``{method: average rank}``, best first.
        critical_difference: Nemenyi's critical difference (None: no bar).
        datasets: how many datasets the ranks average over.

    Returns:
        A matplotlib ``Figure`` (not registered with pyplot).
    """
    names = list(ranks)
    fig = _figure(6.0, 1.5 + 0.28 * len(names))
    ax = fig.add_subplot()
    ticks = np.arange(len(names))
    ax.scatter(np.array([ranks[n] for n in names]), ticks)
    ax.set_yticks(ticks, names)
    ax.invert_yaxis()
    ax.set_xlim(0.5, len(names) + 0.5)
    ax.set_xlabel(f"average rank by Δm% over {datasets} datasets (1 is best)")
    if critical_difference is not None:
        best = ranks[names[0]]
        ax.axvspan(best, best + critical_difference, color="tab:orange", alpha=0.2, label="critical difference (5%)")
        ax.legend(fontsize=8, loc="lower right")
    return fig


def run_figures(
    doc: Mapping[str, Any], history: Sequence[Mapping[str, float]], context: MethodContext | None = None
) -> dict[str, Callable[..., Any]]:
    """``{file name: function drawing its figure}`` of a run: ``training.png``, ``task_metrics.png``,
    one ``relatedness_<name>.png`` per matrix and the figures the method declares (``Method.plots``,
    which may replace any of those). ``doc`` is the run's ``metrics.json`` and ``history`` its
    training history; ``context`` is the method's (without one, a run of a method that is not
    registered, only the generic figures are drawn).

    Args:
        doc: the run's ``metrics.json`` document.
        history: its training history.
        context: the method's context, or None.

    Returns:
        ``{file name: zero-argument function returning a Figure}``; nothing is drawn yet.
    """
    tasks = doc["tasks"]
    names = list(tasks)
    titles = context.method.relatedness_titles if context is not None else {}
    # each job is called with no arguments: the lambdas below bind their loop values as defaults
    split = doc.get("split", "test")
    jobs: dict[str, Callable[..., Any]] = {"task_metrics.png": lambda: plot_task_metrics(tasks, split)}
    if history:
        jobs["training.png"] = lambda: plot_training(history, (doc.get("train") or {}).get("best_step"))
    for key, matrix in (doc.get("relatedness") or {}).items():
        title = titles.get(key, key)
        jobs[f"relatedness_{key}.png"] = lambda m=matrix, t=title, k=key: plot_relatedness(m, names, t, k)
    if context is not None and context.method.plots is not None:
        figures = context.method.plots(context.replace(doc=doc))
        jobs.update({name: fig if callable(fig) else (lambda f=fig: f) for name, fig in figures.items()})
    return jobs


def plot_run(
    run: RunDir,
    *,
    doc: Mapping[str, Any],
    history: Sequence[Mapping[str, float]],
    context: MethodContext | None = None,
    only_missing: bool = False,
) -> list[Path]:
    """Write the figures of :func:`run_figures` into the run's ``plots/``; each file name is made
    plain (:func:`~pyromtl.rundir.plain_name`), so it stays there. Returns the paths written; with
    ``only_missing`` existing files are kept as they are.

    Args:
        run: the run directory.
        doc: its ``metrics.json`` document.
        history: its training history.
        context: the method's context, or None.
        only_missing: draw only the figures whose file is absent.

    Returns:
        The paths written.
    """
    return [
        run.write_png(name, png_bytes(make()))
        for name, make in run_figures(doc, history, context).items()
        if not (only_missing and (run.plots_dir / plain_name(name)).exists())
    ]
