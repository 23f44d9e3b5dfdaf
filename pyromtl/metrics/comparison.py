"""Comparison against a baseline (usually single-task learning): :func:`delta_m` (BayesAgg-MTL's
Δm%), :func:`delta_i` (SMTL's Δ_I) and :func:`eta_hat` (SMTL's η̂), rendered together with the
runs' primary metrics, or the metrics :func:`metrics_per_task` picks from a list (SMTL's
``m_t > 1`` metrics per task), by :func:`compare_table`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from pyromtl.metrics.keys import (
    CLASSIFICATION_METRICS,
    DENSE_METRICS,
    HIGHER_IS_BETTER,
    REGRESSION_METRICS,
    TaskResults,
)
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

    Args:
        method: the method's ``{task: {metric: value}}``.
        baseline: the baseline's ``{task: {metric: value}}`` (usually single-task learning).
        metrics: the metrics to compare on; None: each task's primary metric.

    Returns:
        Δm in percent (lower is better).

    Raises:
        ValueError: naming the task, when the tasks differ, for an empty or unknown
            ``metrics``, a metric missing or not finite on either side, or a baseline value of 0.
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

    Args:
        method: the method's ``{task: {metric: value}}``.
        baseline: the baseline's ``{task: {metric: value}}`` (usually single-task learning).
        metrics: the metrics to compare on; None: each task's primary metric.

    Returns:
        Δ_I in percent (higher is better).

    Raises:
        ValueError: the tasks differ, an empty or unknown ``metrics``, a metric missing or not
            finite on either side, or a baseline value of 0.
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

    Args:
        method: the method's ``{task: {metric: value}}``.
        baseline: the baseline's ``{task: {metric: value}}`` (usually single-task learning).
        metrics: the metrics to compare on; None: each task's primary metric.

    Returns:
        η̂, in [0, 100].

    Raises:
        ValueError: the tasks differ, an empty or unknown ``metrics``, a metric missing or not
            finite on either side, or a baseline value of 0.
    """
    rel = _relative(method, baseline, metrics)
    per_task = [np.mean([1.0 if r >= 0 else 0.0 for _, r in pairs]) for pairs in rel.values()]
    return float(100.0 * np.mean(per_task))


# ----------------------------------------------------------------------------- metrics per task
#: Metrics reported together: a listed metric applies to a task that reports any metric of its group.
METRIC_GROUPS: tuple[tuple[str, ...], ...] = (CLASSIFICATION_METRICS, REGRESSION_METRICS, *DENSE_METRICS.values())


def check_metric_names(metrics: Sequence[str]) -> list[str]:
    """``metrics`` as a list, refused (``ValueError``) if empty, with a name twice or an unknown name.

    Args:
        metrics: metric names (surrounding spaces are stripped).

    Returns:
        The stripped names, in order.

    Raises:
        ValueError: no names or an empty one, a name listed twice, or an unknown name.
    """
    names = [m.strip() for m in metrics]
    if not names or any(not m for m in names):
        raise ValueError(f"metrics: expected metric names separated by commas, got {','.join(metrics)!r}")
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise ValueError(f"metrics: {', '.join(map(repr, twice))} listed more than once")
    unknown = [m for m in names if m not in HIGHER_IS_BETTER]
    if unknown:
        raise ValueError(
            f"unknown metric(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(HIGHER_IS_BETTER))}"
        )
    return names


def metrics_per_task(reference: TaskResults, metrics: Sequence[str]) -> dict[str, list[str]]:
    """The metrics of ``metrics`` that each task of ``reference`` (usually the baseline) is scored
    on: the ``j = 1..m_t`` of Δ_I and η̂ (Safe MTL §4, "Evaluation").

    A metric applies to a task that reports any metric of its group (:data:`METRIC_GROUPS`:
    classification and binary, regression, each dense task), so ``accuracy,nll,nmse`` scores
    classification tasks on two metrics and regression tasks on one.

    Args:
        reference: ``{task: {metric: value}}`` that decides which metrics apply to each task.
        metrics: the metric names.

    Returns:
        ``{task: [metric, ...]}``, in the order of ``metrics``.

    Raises:
        ValueError: an unknown name, a metric that applies to a task but is missing from its
            results, a task to which none applies, a metric that applies to no task, and the
            cases :func:`check_metric_names` refuses.
    """
    names = check_metric_names(metrics)
    out: dict[str, list[str]] = {}
    for task, results in reference.items():
        groups = [g for g in METRIC_GROUPS if any(k in results for k in g)]
        keys = [m for m in names if any(m in g for g in groups)]
        missing = [m for m in keys if m not in results]
        if missing:
            raise ValueError(
                f"task {task!r} has no {', '.join(map(repr, missing))} metric "
                f"(it reports {', '.join(results) or 'nothing'})"
            )
        if not keys:
            raise ValueError(
                f"task {task!r}: none of the metrics {', '.join(names)} applies to it; add one of {', '.join(results)}"
            )
        out[task] = keys
    unused = [m for m in names if not any(m in keys for keys in out.values())]
    if unused:
        raise ValueError(f"metric(s) {', '.join(map(repr, unused))} apply to no task ({', '.join(reference)})")
    return out


def _only(results: TaskResults, per_task: Mapping[str, Sequence[str]]) -> dict[str, dict[str, float]]:
    """``results`` cut down to the metrics ``per_task`` names (a task's other keys are left out)."""
    return {t: {k: m[k] for k in per_task.get(t, ()) if k in m} for t, m in results.items()}


# ----------------------------------------------------------------------------- table
_ARROW = {True: "↑", False: "↓"}


def compare_table(
    runs: Mapping[str, TaskResults], baseline: str | None = None, metrics: Sequence[str] | None = None
) -> str:
    """A markdown table comparing runs task by task, on each task's primary metric or on ``metrics``.

    ``runs`` maps a run name to its task results (``metrics.json``'s ``tasks``). Rows are the
    tasks (in first-seen order) and one ``average`` row per metric present; columns are the
    runs. A run that lacks a task shows ``–``. With ``baseline`` (one of the run names), three
    rows follow: ``Δm% ↓`` (:func:`delta_m`), ``Δ_I% ↑`` (:func:`delta_i`) and ``η̂ ↑``
    (:func:`eta_hat`); the baseline's own column shows ``—`` and a run whose tasks differ
    from the baseline's shows ``n/a``.

    By default every task is scored on its primary metric (``accuracy`` if reported, else
    ``nmse``), one metric per task. With ``metrics``, a task is scored on each listed metric that
    applies to it (:func:`metrics_per_task`, on the baseline's results, or on the first run
    holding the task when there is no baseline): one row per task and metric, Δ_I and η̂
    averaged over a task's ``m_t`` metrics first (Safe MTL §4), Δm over every (task, metric)
    pair. Then a metric that applies to a task but is missing from a compared run's results
    is a ``ValueError`` naming the run, not ``n/a``.

    Args:
        runs: ``{run name: {task: {metric: value}}}``.
        baseline: the name of the run to compare the others against, or None.
        metrics: the metrics to score on; None: each task's primary metric.

    Returns:
        The markdown table.

    Raises:
        ValueError: no runs or no tasks, a ``baseline`` that is not a run, a run that is not a
            dict, bad ``metrics`` (:func:`metrics_per_task`), or a listed metric missing from a run.
    """
    if not runs:
        raise ValueError("no runs to compare")
    if baseline is not None and baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not one of the runs: {', '.join(map(repr, runs))}")
    names = list(runs)
    for run in names:
        if not isinstance(runs[run], Mapping):
            raise ValueError(f"run {run!r}: expected a dict of task results, got {type(runs[run]).__name__}")
    tasks: list[str] = []
    first: dict[str, Mapping[str, float]] = {}  # each task's results in the first run that holds it
    primary: dict[str, str | None] = {}  # the first primary metric any run reports for the task
    for run in names:
        for task, results in runs[run].items():
            if task not in first:
                tasks.append(task)
                first[task] = results
            if primary.get(task) is None:
                primary[task] = primary_metric(results)
    if not tasks:
        raise ValueError("no tasks in any run")
    if metrics is None:
        order = ["accuracy", "nmse"]
        keys = {t: [k] if (k := primary[t]) else [] for t in tasks}
    else:
        order = check_metric_names(metrics)
        base = runs[baseline] if baseline is not None else {}
        keys = metrics_per_task({t: base.get(t, first[t]) for t in tasks}, order)

    rows: list[list[str]] = []
    for task in tasks:
        shown: list[str | None] = [*keys[task]] or [None]  # a task without a primary metric: one empty row
        for key in shown:
            label = f"{key} {_ARROW[HIGHER_IS_BETTER[key]]}" if key else "—"
            cells = []
            for run in names:
                held = runs[run].get(task)
                cells.append("–" if held is None or key is None or key not in held else fmt(held[key], "n/a"))
            rows.append([task, label, *cells])

    used = [k for k in order if any(k in keys[t] for t in tasks)]
    for key in used:
        cells = []
        for run in names:
            vals = [float(runs[run][t][key]) for t in tasks if key in keys[t] and key in runs[run].get(t, {})]
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
                elif metrics is None:
                    try:
                        cells.append(pattern.format(fn(runs[run], base)))
                    except ValueError:
                        cells.append("n/a")
                elif set(runs[run]) != set(base):  # other tasks: no like-for-like score, as by default
                    cells.append("n/a")
                else:
                    try:
                        cells.append(pattern.format(fn(_only(runs[run], keys), _only(base, keys), order)))
                    except ValueError as err:  # named metrics the run lacks: say so, not n/a
                        raise ValueError(f"run {run!r}: {err}") from None
            rows.append([label, f"vs {baseline}", *cells])

    return render(["task", "metric", *names], rows, left=2)
