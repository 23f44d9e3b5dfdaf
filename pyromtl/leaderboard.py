"""The leaderboard of a bench run (:mod:`pyromtl.bench`), read from its cells' ``metrics.json``.

Per dataset, every variant (a method with its grid options) gets:

* per task, the primary metric's mean and 95% Student-t interval over seeds (:func:`interval`),
  and where every task has the same primary metric, its mean over tasks (``mean accuracy``);
* Δm% (BayesAgg-MTL's, lower is better), Δ_I% and η̂ (SMTL's, higher is better) against the
  ``stl`` run of the same seed, with the grid options it shares with the row where the grid gave
  ``stl`` some (``smtl[gate_lr=0.003,latent_dim=4]`` against ``stl[latent_dim=4]``);
* ECE and NLL averaged over the classification tasks, the median seconds per step and the
  number of trained parameters;
* where the dataset knows its task relatedness (``metrics.json``'s ``true_relatedness``), how
  well the method's reading recovers it (:func:`recovery`), and, for a method that clusters the
  tasks (HIB, ``extra.clustering``), the share of seeds that recover the groups exactly and the
  clustering margin.

Across datasets, :func:`rank_summary` ranks the variants present on every dataset by Δm% and
tests whether they differ (Friedman's test, Nemenyi's critical difference; Demšar, JMLR 2006).
"""

from __future__ import annotations

import csv
import html
import io
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pyromtl import metrics
from pyromtl.io import atomic_write_bytes, atomic_write_text
from pyromtl.metrics.prediction import primary_metric
from pyromtl.rundir import RunDir

#: The baseline every cell is compared with.
BASELINE = "stl"

#: Relatedness readings where a larger value means less related (HIB's noise distance, eq. 11).
DISTANCES = frozenset({"distance"})


def interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for one value).

    Args:
        values: at least one number.

    Returns:
        ``(mean, half_width)``.

    Raises:
        statistics.StatisticsError: no values.
    """
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def recovery(key: str, reading: Sequence[Sequence[float]], truth: Sequence[Sequence[float]]) -> float | None:
    """Spearman's ρ between a method's relatedness reading ``key`` and the true relatedness.

    A pairwise reading (VMTL's α and β, HIB's distance, cross-stitch's unit) is compared on the
    off-diagonal pairs (t, s), a distance with its sign flipped. A diagonal one (SMTL's gates,
    ``diag(α_t)``: how much task t shares, not with whom) is compared per task with the task's
    mean true relatedness to the others. ``None`` when either side is constant, where ρ is
    undefined (a per-task reading on clusters of equal size, for one).

    Args:
        key: the reading's name in ``metrics.json``'s ``relatedness`` (``"distance"`` is flipped).
        reading: the method's ``[T, T]`` reading.
        truth: the dataset's ``[T, T]`` true relatedness.

    Returns:
        ρ, in [-1, 1], or None.

    Raises:
        ValueError: the two are not square matrices of one shape.
    """
    from scipy import stats

    r, m = np.asarray(truth, dtype=float), np.asarray(reading, dtype=float)
    if r.shape != m.shape or r.ndim != 2 or r.shape[0] != r.shape[1]:
        raise ValueError(f"relatedness {key!r}: shape {m.shape} against the truth's {r.shape}")
    n = r.shape[0]
    off = ~np.eye(n, dtype=bool)
    if n > 1 and not m[off].any():  # a diagonal reading: one number per task
        values, target = np.diag(m), (r.sum(1) - np.diag(r)) / (n - 1)
    else:
        values, target = m[off], r[off]
    if key in DISTANCES:
        values = -values
    if np.ptp(values) == 0 or np.ptp(target) == 0:
        return None
    return float(stats.spearmanr(values, target).statistic)


def _cells(out: Path) -> list[dict[str, Any]]:
    """Every finished cell under ``out``: its name and metrics document."""
    return [
        {"name": path.parent.name, "doc": RunDir(path.parent).read_metrics()}
        for path in sorted(out.glob("*/*/complete.json"))
    ]


def _variant(name: str, seed: int) -> str:
    """A cell directory's name less its seed: the leaderboard row."""
    suffix = f"-s{seed}"
    return name[: -len(suffix)] if name.endswith(suffix) else name


def _grid_options(variant: str, method: str) -> frozenset[str]:
    """A leaderboard row's grid options as ``key=value`` words: ``smtl-gate_lr=0.003-latent_dim=4``
    has ``{"gate_lr=0.003", "latent_dim=4"}``."""
    return frozenset(word for word in re.split(r"-(?=[A-Za-z_][\w.]*=)", variant[len(method) :]) if word)


def _recovered(doc: Mapping[str, Any]) -> float | None:
    """:func:`recovery` of a run's first relatedness reading, if the dataset knows the truth."""
    truth, readings = doc.get("true_relatedness"), doc.get("relatedness") or {}
    if truth is None or not readings:
        return None
    key = next(iter(readings))
    return recovery(key, readings[key], truth)


def tables(out: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The leaderboard's rows per dataset, read from the cells under ``out`` (see the module doc).

    Args:
        out: a bench folder (``out/<dataset>/<cell>/`` run directories; unfinished ones are skipped).

    Returns:
        ``{dataset: [row, ...]}``, one row per variant: its seeds and, per column, ``(mean, ci95)``.

    Raises:
        ValueError: a malformed ``metrics.json``, or a run whose tasks differ from its baseline's.
    """
    by_data: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for cell in _cells(Path(out)):
        doc = cell["doc"]
        by_data.setdefault(doc["dataset"], {}).setdefault(_variant(cell["name"], doc["seed"]), []).append(cell)
    result: dict[str, list[dict[str, Any]]] = {}
    for data, variants in sorted(by_data.items()):
        rows = []
        baselines = {
            _grid_options(v, BASELINE): runs for v, runs in variants.items() if runs[0]["doc"]["method"] == BASELINE
        }
        for variant, runs in sorted(variants.items()):
            # against stl run with the grid options it shares (e.g. the same lr) where the grid gave it some
            options = _grid_options(variant, runs[0]["doc"]["method"])
            shared = [o for o in baselines if o <= options]
            base = baselines[max(shared, key=len)] if shared else []
            baseline = {c["doc"]["seed"]: c["doc"]["tasks"] for c in base}
            tasks = runs[0]["doc"]["tasks"]
            row: dict[str, Any] = {"method": variant, "seeds": sorted(r["doc"]["seed"] for r in runs)}
            primary = {task: primary_metric(scores) for task, scores in tasks.items()}
            for task, key in primary.items():
                if key is not None:
                    row[f"{task}:{key}"] = interval([r["doc"]["tasks"][task][key] for r in runs])
            if len(kinds := set(primary.values())) == 1 and None not in kinds:  # one metric for all: its task mean
                key = kinds.pop()
                row[f"mean {key}"] = interval(
                    [statistics.fmean(t[key] for t in r["doc"]["tasks"].values()) for r in runs]
                )
            paired = [r for r in runs if r["doc"]["seed"] in baseline]
            for label, fn in (("Δm%", metrics.delta_m), ("Δ_I%", metrics.delta_i), ("η̂", metrics.eta_hat)):
                values = [fn(r["doc"]["tasks"], baseline[r["doc"]["seed"]]) for r in paired]
                row[label] = interval(values) if values else None
            for key in ("ece", "nll"):
                per_run = [
                    statistics.fmean(s[key] for s in r["doc"]["tasks"].values() if key in s)
                    for r in runs
                    if any(key in s for s in r["doc"]["tasks"].values())
                ]
                row[key] = interval(per_run) if per_run else None
            if any("true_relatedness" in r["doc"] for r in runs):
                recovered = [rho for r in runs if (rho := _recovered(r["doc"])) is not None]
                row["relatedness ρ"] = interval(recovered) if recovered else None
            clustered = [c for r in runs if (c := (r["doc"].get("extra") or {}).get("clustering"))]
            if clustered:  # HIB's §V-B criterion: the groups recovered exactly, and by what margin
                row["clustering success"] = interval([float(c["success"]) for c in clustered])
                row["clustering margin"] = interval([c["margin"] for c in clustered])
            train = [r["doc"]["train"] for r in runs]
            row["ms/step"] = statistics.median(1e3 * t["seconds"] / t["steps"] for t in train)
            row["parameters"] = train[0].get("parameters")  # absent from runs made before it was recorded
            rows.append(row)
        result[data] = rows
    return result


@dataclass(frozen=True)
class RankSummary:
    """Average ranks by Δm% over datasets, with Friedman's test and Nemenyi's critical difference."""

    datasets: list[str]
    ranks: dict[str, float]  # variant -> average rank (1 is best), best first
    friedman_p: float | None  # None with fewer than 3 variants or 2 datasets
    critical_difference: float | None  # two average ranks further apart differ at the 5% level


def rank_summary(boards: Mapping[str, Sequence[Mapping[str, Any]]]) -> RankSummary | None:
    """Rank the variants present on every dataset by their mean Δm% (ties share the mean rank).

    Friedman's χ² tests whether the average ranks differ; Nemenyi's critical difference is
    ``q_0.05(k) / √2 · √(k (k + 1) / (6 N))`` for k variants on N datasets (Demšar 2006, §3.2.2).
    ``None`` when no variant with a Δm% is on every dataset.

    Args:
        boards: :func:`tables`'s rows per dataset.

    Returns:
        The datasets, the average ranks (best first), Friedman's p-value and the critical
        difference (both None with fewer than 3 variants or 2 datasets); or None.
    """
    from scipy import stats

    scores: dict[str, dict[str, float]] = {}
    for data, rows in boards.items():
        scores[data] = {row["method"]: row["Δm%"][0] for row in rows if row.get("Δm%") is not None}
    common = sorted(set.intersection(*(set(s) for s in scores.values()))) if scores else []
    if not common:
        return None
    names = sorted(scores)
    table = np.array([[scores[d][v] for v in common] for d in names])  # N datasets × k variants
    ranks = np.array([stats.rankdata(row) for row in table]).mean(0)
    k, n = len(common), len(names)
    p = cd = None
    if k >= 3 and n >= 2:
        p = float(stats.friedmanchisquare(*table.T).pvalue)
        q = float(stats.studentized_range.ppf(0.95, k, np.inf)) / math.sqrt(2)
        cd = q * math.sqrt(k * (k + 1) / (6 * n))
    order = sorted(zip(common, ranks.tolist()), key=lambda item: item[1])
    return RankSummary(datasets=names, ranks=dict(order), friedman_p=p, critical_difference=cd)


def _text(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, tuple):
        mean, half = value
        return f"{mean:.4g} ± {half:.2g}"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


LEGEND = (
    "Mean ± half-width of the 95% interval over seeds. Δm% (lower is better), Δ_I% and η̂ "
    f"(higher is better) against {BASELINE} on the same seed; ece and nll averaged over the "
    "classification tasks; relatedness ρ: Spearman's ρ between the method's first relatedness "
    "reading and the dataset's true relatedness (pyromtl.leaderboard.recovery), where the dataset "
    "knows it; parameters: the numbers the optimiser trains."
)


def _rank_note(summary: RankSummary) -> str:
    if summary.friedman_p is None or summary.critical_difference is None:
        return "Too few methods or datasets for Friedman's test (it needs 3 methods and 2 datasets)."
    return (
        f"Friedman's test: p = {summary.friedman_p:.3g}. Nemenyi's critical difference at 5%: "
        f"{summary.critical_difference:.2f}: two methods whose average ranks differ by more differ."
    )


def _rank_lines(summary: RankSummary) -> list[str]:
    return [
        "## Rank summary",
        "",
        f"Average rank by Δm% over {len(summary.datasets)} datasets ({', '.join(summary.datasets)}); 1 is best.",
        "",
        "| method | average rank |",
        "|---|---|",
        *(f"| {name} | {rank:.2f} |" for name, rank in summary.ranks.items()),
        "",
        _rank_note(summary),
        "",
    ]


def write_leaderboard(out: str | Path) -> list[Path]:
    """Write ``leaderboard.md``, ``leaderboard.csv``, ``leaderboard.html`` and the figures
    (``leaderboard_<dataset>.png``; ``ranks.png`` with two datasets or more) into ``out``.
    Returns the paths written.

    Args:
        out: a bench folder.

    Returns:
        The markdown, CSV and HTML files, then the figures.

    Raises:
        ValueError: as :func:`tables`.
    """
    from pyromtl.plots import plot_leaderboard, plot_ranks, png_bytes
    from pyromtl.rundir import plain_name

    out = Path(out)
    boards = tables(out)
    summary = rank_summary(boards) if len(boards) > 1 else None
    md, rows_csv, parts = [], [], []
    written: list[Path] = []
    for data, rows in boards.items():
        figure = out / plain_name(f"leaderboard_{data}.png")
        atomic_write_bytes(figure, png_bytes(plot_leaderboard(data, rows)))
        written.append(figure)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        md += [f"## {data}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        md += ["| " + " | ".join(_text(row.get(c)) for c in columns) + " |" for row in rows]
        md += ["", f"![{data}]({figure.name})", ""]
        parts.append(_html_table(data, columns, [[_text(row.get(c)) for c in columns] for row in rows]))
        parts.append(f"<img src='{html.escape(figure.name)}'>")
        for row in rows:
            for column, value in row.items():
                if column in ("method", "seeds"):
                    continue
                mean, half = value if isinstance(value, tuple) else (value, None)
                rows_csv.append(
                    {"dataset": data, "method": row["method"], "column": column, "mean": mean, "ci95": half}
                )
    if summary is not None:
        figure = out / "ranks.png"
        atomic_write_bytes(
            figure, png_bytes(plot_ranks(summary.ranks, summary.critical_difference, len(summary.datasets)))
        )
        written.append(figure)
        md += _rank_lines(summary) + ["![average ranks](ranks.png)", ""]
        ranked = [[name, f"{rank:.2f}"] for name, rank in summary.ranks.items()]
        parts.append(_html_table("Rank summary", ["method", "average rank"], ranked))
        parts.append(f"<p>{html.escape(_rank_note(summary))}</p><img src='ranks.png'>")
    md_path, csv_path, html_path = out / "leaderboard.md", out / "leaderboard.csv", out / "leaderboard.html"
    atomic_write_text(md_path, "# Leaderboard\n\n" + LEGEND + "\n\n" + "\n".join(md))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["dataset", "method", "column", "mean", "ci95"])
    writer.writeheader()
    writer.writerows(rows_csv)
    atomic_write_text(csv_path, buffer.getvalue())
    page = f"<!doctype html><meta charset='utf-8'><title>pyromtl leaderboard</title><p>{html.escape(LEGEND)}</p>"
    atomic_write_text(html_path, page + "".join(parts))
    return [md_path, csv_path, html_path, *written]


def _html_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>{body}</table>"


__all__ = ["BASELINE", "RankSummary", "interval", "rank_summary", "recovery", "tables", "write_leaderboard"]
