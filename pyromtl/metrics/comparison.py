"""Comparison against a baseline (usually single-task learning): :func:`delta_m` (BayesAgg-MTL's
Δm%), :func:`delta_i` (SMTL's Δ_I) and :func:`eta_hat` (SMTL's η̂), rendered together with the
runs' primary metrics by :func:`compare_table`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from pyromtl.metrics.keys import HIGHER_IS_BETTER, TaskResults
from pyromtl.metrics.prediction import primary_metric
from pyromtl.tables import fmt, render


# ----------------------------------------------------------------------------- vs. a baseline
def _relative(
    method: TaskResults, baseline: TaskResults, metrics: Sequence[str] | str | None
) -> dict[str, list[tuple[str, float]]]:
    """Per task, the list of ``(metric, (−1)^{p} (M − B)/B)`` — positive means better than baseline.

    Validates that both sides cover the same tasks, that every requested metric has a known
    direction, is present and finite on both sides, and that no baseline value is 0.
    """
    if not baseline:
        raise ValueError("baseline has no tasks")
    missing = [t for t in baseline if t not in method]
    extra = [t for t in method if t not in baseline]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing from method: {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"missing from baseline: {', '.join(map(repr, extra))}")
        raise ValueError("method and baseline tasks differ (" + "; ".join(parts) + ")")
    if isinstance(metrics, str):
        metrics = [metrics]
    if metrics is not None:
        metrics = list(metrics)
        if not metrics:
            raise ValueError("metrics is an empty list")
        unknown = [m for m in metrics if m not in HIGHER_IS_BETTER]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(HIGHER_IS_BETTER)}")
    out: dict[str, list[tuple[str, float]]] = {}
    for task, base in baseline.items():
        meth = method[task]
        if metrics is None:
            key = primary_metric(base)
            if key is None:
                raise ValueError(f"task {task!r}: baseline has neither 'accuracy' nor 'nmse'; pass metrics=")
            keys = [key]
        else:
            keys = [m for m in metrics if m in base]
            if not keys:
                raise ValueError(f"task {task!r}: baseline has none of the metrics {metrics}")
        rel = []
        for key in keys:
            if key not in meth:
                raise ValueError(f"task {task!r}: method has no {key!r} metric")
            m_val, b_val = float(meth[key]), float(base[key])
            if not math.isfinite(m_val):
                raise ValueError(f"task {task!r}: method's {key!r} is {m_val}")
            if not math.isfinite(b_val):
                raise ValueError(f"task {task!r}: baseline's {key!r} is {b_val}")
            if b_val == 0.0:
                raise ValueError(f"task {task!r}: baseline's {key!r} is 0, so the relative change is undefined")
            sign = 1.0 if HIGHER_IS_BETTER[key] else -1.0
            rel.append((key, sign * (m_val - b_val) / b_val))
        out[task] = rel
    return out


def delta_m(method: TaskResults, baseline: TaskResults, metrics: Sequence[str] | None = None) -> float:
    """BayesAgg-MTL's Δm% (Maninis et al., 2019; BayesAgg-MTL §5, "Evaluation metric").

        Δm% = (1/K) Σ_k (−1)^{δ_k} (M_m^k − M_s^k) / M_s^k × 100,

    with ``δ_k = 1`` if a higher value of criterion k is better, else 0, so **lower is
    better** and a method better than the baseline on everything has Δm < 0. ``k`` runs over
    every (task, metric) pair used: each task's primary metric by default (``accuracy`` if
    the baseline reports it, else ``nmse``), or every metric in ``metrics`` that the
    baseline reports for the task. All pairs weigh equally (unlike :func:`delta_i`).

    Raises ``ValueError`` naming the task when the tasks differ, a metric is missing or
    non-finite, or a baseline value is 0.
    """
    rel = _relative(method, baseline, metrics)
    flat = [r for pairs in rel.values() for _, r in pairs]
    return float(-100.0 * np.mean(flat))


def delta_i(method: TaskResults, baseline: TaskResults, metrics: Sequence[str] | None = None) -> float:
    """SMTL's overall relative improvement Δ_I (Safe MTL, §4 "Evaluation"), in percent.

        Δ_{t,j} = (−1)^{p_{t,j}} (M_{t,j} − STL_{t,j}),  p_{t,j} = 0 if higher is better else 1,
        Δ_I = (1/m) Σ_t (1/m_t) Σ_j Δ_{t,j} / STL_{t,j}  × 100.

    The paper's Δ_I is a fraction; it is returned here multiplied by 100 (percent). Positive
    means better than the baseline (**higher is better**). Metrics are averaged within a
    task first, then over tasks. With one metric per task, ``delta_i == -delta_m``. Metric
    selection and errors are as in :func:`delta_m`.
    """
    rel = _relative(method, baseline, metrics)
    per_task = [np.mean([r for _, r in pairs]) for pairs in rel.values()]
    return float(100.0 * np.mean(per_task))


def eta_hat(method: TaskResults, baseline: TaskResults, metrics: Sequence[str] | None = None) -> float:
    """SMTL's safeness estimate η̂ (Safe MTL, Definition 3 and §4 "Evaluation"), in [0, 100].

        η̂ = (1/m) Σ_t (1/m_t) Σ_j 1[Δ_{t,j} ≥ 0] × 100,

    the (metric-averaged) percentage of tasks on which the method is **no worse** than the
    baseline; ties count as safe. η̂ = 100 is "safe multi-task learning" (no negative
    sharing). Metric selection and errors are as in :func:`delta_m`.
    """
    rel = _relative(method, baseline, metrics)
    per_task = [np.mean([1.0 if r >= 0 else 0.0 for _, r in pairs]) for pairs in rel.values()]
    return float(100.0 * np.mean(per_task))


# ----------------------------------------------------------------------------- table
_ARROW = {True: "↑", False: "↓"}


def compare_table(runs: Mapping[str, TaskResults], baseline: str | None = None) -> str:
    """A markdown table comparing runs task by task on each task's primary metric.

    ``runs`` maps a run name to its task results (``metrics.json``'s ``tasks``). Rows are the
    tasks (in first-seen order) and one ``average`` row per primary metric present; columns
    are the runs. A task's primary metric is ``accuracy`` if reported, else ``nmse``. A run
    that lacks a task shows ``–``. With ``baseline`` (one of the run names), three rows
    follow: ``Δm% ↓`` (:func:`delta_m`), ``Δ_I% ↑`` (:func:`delta_i`) and ``η̂ ↑``
    (:func:`eta_hat`), each computed on the primary metrics; the baseline's own column shows
    ``—`` and a run whose tasks differ from the baseline's shows ``n/a``.
    """
    if not runs:
        raise ValueError("no runs to compare")
    if baseline is not None and baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not one of the runs: {', '.join(map(repr, runs))}")
    names = list(runs)
    tasks: list[str] = []
    primary: dict[str, str | None] = {}
    for run in names:
        if not isinstance(runs[run], Mapping):
            raise ValueError(f"run {run!r}: expected a dict of task results, got {type(runs[run]).__name__}")
        for task, metrics in runs[run].items():
            if task not in primary:
                tasks.append(task)
                primary[task] = None
            if primary[task] is None:
                primary[task] = primary_metric(metrics)
    if not tasks:
        raise ValueError("no tasks in any run")

    rows: list[list[str]] = []
    for task in tasks:
        key = primary[task]
        label = f"{key} {_ARROW[HIGHER_IS_BETTER[key]]}" if key else "—"
        cells = []
        for run in names:
            results = runs[run].get(task)
            cells.append("–" if results is None or key is None or key not in results else fmt(results[key], "n/a"))
        rows.append([task, label, *cells])

    used = [k for k in ("accuracy", "nmse") if any(primary[t] == k for t in tasks)]
    for key in used:
        cells = []
        for run in names:
            vals = [
                float(runs[run][t][key]) for t in tasks if primary[t] == key and t in runs[run] and key in runs[run][t]
            ]
            vals = [v for v in vals if not math.isnan(v)]
            cells.append(fmt(np.mean(vals), "n/a") if vals else "–")
        rows.append(["average", f"{key} {_ARROW[HIGHER_IS_BETTER[key]]}", *cells])

    if baseline is not None:
        base = runs[baseline]
        for label, fn, pattern in (
            ("Δm% ↓", delta_m, "{:+.2f}"),
            ("Δ_I% ↑", delta_i, "{:+.2f}"),
            ("η̂ ↑", eta_hat, "{:.1f}"),
        ):
            cells = []
            for run in names:
                if run == baseline:
                    cells.append("—")
                    continue
                try:
                    cells.append(pattern.format(fn(runs[run], base)))
                except ValueError:
                    cells.append("n/a")
            rows.append([label, f"vs {baseline}", *cells])

    return render(["task", "metric", *names], rows, left=2)
