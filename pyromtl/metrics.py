"""Evaluation metrics for multi-task learning, and the papers' MTL-vs-STL summaries.

Everything here is plain numpy (CPU torch tensors are accepted and converted) and returns
Python floats, so results drop straight into ``metrics.json``:

* per-task **prediction metrics** — :func:`accuracy`, :func:`auc`, :func:`ece`, :func:`brier`, :func:`nll`
  for ``classification`` / ``binary`` tasks and :func:`mse`, :func:`mae`, :func:`nmse` for
  ``regression`` tasks, bundled by :func:`task_metrics`;
* **dense prediction metrics** (one target per pixel: :mod:`pyromtl.data.dense`) —
  :func:`miou` and :func:`pixel_accuracy` for segmentation, :func:`depth_errors` and
  :func:`normal_angle` for depth and surface normals, bundled by :func:`dense_task_metrics`;
* **aggregation** over tasks — :func:`average`, :func:`primary_metric`, :func:`selection_score`
  (the single higher-is-better number used for model selection on *validation* data);
* **relative performance against a baseline** (usually single-task learning, STL) —
  :func:`delta_m` (BayesAgg-MTL's Δm%), :func:`delta_i` (SMTL's Δ_I) and :func:`eta_hat`
  (SMTL's η̂), rendered together by :func:`compare_table`.

A *task-results* mapping, as in the ``tasks`` entry of ``metrics.json``, is
``{task_name: {metric_key: value}}``.

Every function validates its input and raises :class:`ValueError` naming the problem
(shape mismatch, empty input, NaN/inf, labels out of range, mismatched tasks, ...).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from pyromtl.data.constants import IGNORE_INDEX
from pyromtl.tables import fmt, render

__all__ = [
    "HIGHER_IS_BETTER",
    "CLASSIFICATION_METRICS",
    "REGRESSION_METRICS",
    "TASK_TYPES",
    "accuracy",
    "auc",
    "ece",
    "brier",
    "nll",
    "mse",
    "mae",
    "nmse",
    "task_metrics",
    "DENSE_METRICS",
    "miou",
    "pixel_accuracy",
    "depth_errors",
    "normal_angle",
    "dense_task_metrics",
    "primary_metric",
    "selection_score",
    "average",
    "delta_m",
    "delta_i",
    "eta_hat",
    "compare_table",
]

TASK_TYPES: tuple[str, ...] = ("classification", "binary", "regression")

#: Metric keys reported for ``classification`` and ``binary`` tasks, in order.
CLASSIFICATION_METRICS: tuple[str, ...] = ("accuracy", "auc", "ece", "brier", "nll")
#: Metric keys reported for ``regression`` tasks, in order.
REGRESSION_METRICS: tuple[str, ...] = ("mse", "mae", "nmse")
#: Metric keys reported for each dense task (:func:`dense_task_metrics`), in order.
DENSE_METRICS: dict[str, tuple[str, ...]] = {
    "segmentation": ("miou", "pixel_acc"),
    "depth": ("abs_err", "rel_err"),
    "normal": ("mean_angle",),
}

#: Direction of every metric key: ``True`` when a larger value is better.
HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "auc": True,
    "ece": False,
    "brier": False,
    "nll": False,
    "mse": False,
    "mae": False,
    "nmse": False,
    "miou": True,
    "pixel_acc": True,
    "abs_err": False,
    "rel_err": False,
    "mean_angle": False,
}

# Tolerance on "each row of probabilities sums to one" (float32 softmax averages are fine).
_SUM_ATOL = 1e-3
# Tolerance on "probabilities lie in [0, 1]".
_RANGE_ATOL = 1e-6

TaskResults = Mapping[str, Mapping[str, float]]


# ----------------------------------------------------------------------------- validation
def _to_numpy(a, name: str) -> np.ndarray:
    """Return ``a`` as a float64 ndarray; CPU/GPU torch tensors are detached and copied."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch.Tensor without importing torch
        a = a.detach().cpu().numpy()
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric, got {type(a).__name__}: {exc}") from None
    return arr


def _check_finite(arr: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name} contains {bad} NaN or inf value(s)")


def _check_target(y, n: int | None, name: str = "y") -> np.ndarray:
    y = _to_numpy(y, name)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {y.shape}")
    if y.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    _check_finite(y, name)
    if n is not None and y.shape[0] != n:
        raise ValueError(f"shape mismatch: predictions have N={n} samples but {name} has {y.shape[0]}")
    return y


def _check_probs(probs, y) -> tuple[np.ndarray, np.ndarray]:
    """Validate probabilities and labels; return ``(P [N, C], labels [N] int)``.

    ``probs`` is ``[N, C]`` (each row a distribution over C ≥ 2 classes) or ``[N]`` (the
    probability of class 1 of a binary task, turned into the two columns ``[1 - p, p]``).
    ``y`` holds integer class labels (integer-valued floats are accepted) in ``[0, C)``.
    """
    p = _to_numpy(probs, "probs")
    if p.ndim == 1:
        binary = True
    elif p.ndim == 2:
        binary = False
    else:
        raise ValueError(f"probs must be [N, C] class probabilities or [N] binary probabilities, got shape {p.shape}")
    if p.shape[0] == 0:
        raise ValueError("probs is empty")
    _check_finite(p, "probs")
    y = _check_target(y, p.shape[0])
    if p.min() < -_RANGE_ATOL or p.max() > 1 + _RANGE_ATOL:
        raise ValueError(f"probs must lie in [0, 1], got values in [{p.min():.4g}, {p.max():.4g}]")
    p = np.clip(p, 0.0, 1.0)
    if binary:
        p = np.stack([1.0 - p, p], axis=1)
    else:
        if p.shape[1] < 2:
            raise ValueError(f"probs [N, C] needs C >= 2 classes, got C={p.shape[1]}; pass binary probabilities as [N]")
        sums = p.sum(axis=1)
        worst = int(np.argmax(np.abs(sums - 1.0)))
        if abs(sums[worst] - 1.0) > _SUM_ATOL:
            raise ValueError(f"each row of probs must sum to 1; row {worst} sums to {sums[worst]:.6g}")
    if not np.all(y == np.round(y)):
        raise ValueError("y must hold integer class labels, got non-integer values")
    n_classes = p.shape[1]
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(
            f"labels out of range: y has values in [{int(y.min())}, {int(y.max())}] "
            f"but probs has {n_classes} classes" + (" (binary labels must be 0 or 1)" if binary else "")
        )
    return p, y.astype(np.int64)


def _check_regression(pred, y) -> tuple[np.ndarray, np.ndarray]:
    pred = _to_numpy(pred, "pred")
    if pred.ndim != 1:
        raise ValueError(f"pred must be 1-D [N] predictive means, got shape {pred.shape}")
    if pred.shape[0] == 0:
        raise ValueError("pred is empty")
    _check_finite(pred, "pred")
    y = _check_target(y, pred.shape[0])
    return pred, y


# ----------------------------------------------------------------------------- classification
def accuracy(probs, y) -> float:
    """Fraction of samples whose most probable class equals the label.

    ``probs`` is ``[N, C]`` class probabilities, or ``[N]`` probabilities of class 1 for a
    binary task (predicted label ``1`` when ``p > 0.5``; a tie at exactly 0.5 predicts 0,
    the same as ``argmax`` of ``[1 - p, p]``). ``y`` is ``[N]`` integer labels.
    """
    p, y = _check_probs(probs, y)
    return float(np.mean(np.argmax(p, axis=1) == y))


def auc(probs, y) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``).

    * binary (``probs [N]``, or ``[N, 2]``): the ROC AUC of the class-1 score;
    * multiclass (``probs [N, C]``): one-vs-rest **macro** AUC — for every class ``c`` that
      occurs in ``y``, the AUC of ``probs[:, c]`` at separating ``y == c`` from ``y != c``,
      averaged with equal weight over those classes.

    Returns ``nan`` (and raises nothing) when ``y`` contains only one class, where the
    ROC curve is undefined.
    """
    from sklearn.metrics import roc_auc_score  # lazy: keeps `import pyromtl.metrics` (and the CLI) quick

    p, y = _check_probs(probs, y)
    present = np.unique(y)
    if present.size < 2:
        return float("nan")
    if p.shape[1] == 2:
        return float(roc_auc_score(y, p[:, 1]))
    scores = [roc_auc_score(y == c, p[:, c]) for c in present]
    return float(np.mean(scores))


def ece(probs, y, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins.

    Following Naeini et al. (2015) and Guo et al. (2017, eq. 3), which BayesAgg-MTL
    (App. C.1) uses with 15 bins: with top-label confidence ``conf_i = max_c p_ic``, predicted
    label ``argmax_c p_ic``, and bins ``B_m = ((m-1)/M, m/M]``,

        ECE = Σ_m |B_m| / N · |acc(B_m) − conf(B_m)|.

    Binary ``probs [N]`` are treated as the two classes ``[1 − p, p]``, so the confidence is
    ``max(p, 1 − p)``. A perfectly calibrated predictor has ECE 0; the range is ``[0, 1]``.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    p, y = _check_probs(probs, y)
    conf = p.max(axis=1)
    correct = (np.argmax(p, axis=1) == y).astype(np.float64)
    # bin m (0-based) holds conf in (m/M, (m+1)/M]; conf = 0 (impossible for a top label) goes to bin 0
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    gap = np.bincount(idx, weights=correct - conf, minlength=n_bins)  # Σ_i∈B (acc_i − conf_i)
    # |B|/N · |acc(B) − conf(B)| = |Σ_i∈B (acc_i − conf_i)| / N
    return float(np.abs(gap[count > 0]).sum() / y.shape[0])


def brier(probs, y) -> float:
    """Multiclass Brier score (Brier, 1950), as in BayesAgg-MTL App. C.1.

        Brier = (1/N) Σ_i Σ_c (p_ic − 1[y_i = c])².

    Binary ``probs [N]`` are treated as the two classes ``[1 − p, p]``, so the value is
    ``2 · mean((p − y)²)`` — twice the "binary" Brier score some libraries report. The range
    is ``[0, 2]``; perfect predictions score 0 and uniform predictions ``(C − 1)/C``.
    """
    p, y = _check_probs(probs, y)
    onehot = np.zeros_like(p)
    onehot[np.arange(y.shape[0]), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def nll(probs, y, floor: float = 1e-12) -> float:
    """Mean negative log predictive probability of the true class, ``-(1/N) Σ_i log p_{i, y_i}``.

    The probability is floored at ``floor`` so that one confident mistake gives a large finite
    value instead of ``inf`` (``-log 1e-12 ≈ 27.6``).
    """
    p, y = _check_probs(probs, y)
    return float(-np.mean(np.log(np.maximum(p[np.arange(y.shape[0]), y], floor))))


# ----------------------------------------------------------------------------- regression
def mse(pred, y) -> float:
    """Mean squared error ``(1/N) Σ_i (ŷ_i − y_i)²`` of predictive means ``pred [N]``."""
    pred, y = _check_regression(pred, y)
    return float(np.mean((pred - y) ** 2))


def mae(pred, y) -> float:
    """Mean absolute error ``(1/N) Σ_i |ŷ_i − y_i|`` of predictive means ``pred [N]``."""
    pred, y = _check_regression(pred, y)
    return float(np.mean(np.abs(pred - y)))


def nmse(pred, y) -> float:
    """Normalised mean squared error, the metric VMTL reports for Rotated MNIST angles.

        NMSE = MSE(ŷ, y) / Var(y),   Var(y) = (1/N) Σ_i (y_i − ȳ)²  (population variance).

    It is invariant to the scale of the targets (standardised or original units give the same
    value), and predicting the mean of ``y`` everywhere scores exactly 1. Returns ``nan``
    when ``y`` is constant (e.g. a single sample), where the ratio is undefined.
    """
    pred, y = _check_regression(pred, y)
    var = float(np.var(y))
    if var <= 0.0:
        return float("nan")
    return float(np.mean((pred - y) ** 2) / var)


# ----------------------------------------------------------------------------- per task
def _check_task_type(task_type: str) -> str:
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task type {task_type!r}; expected one of {', '.join(TASK_TYPES)}")
    return task_type


def task_metrics(task_type: str, pred, y) -> dict[str, float]:
    """All metrics of one task, keyed as in ``metrics.json``.

    * ``"classification"``: ``pred [N, C]`` class probabilities →
      ``accuracy``, ``auc``, ``ece`` (15 bins), ``brier``, ``nll``;
    * ``"binary"``: ``pred [N]`` probability of class 1 (``[N, 2]`` is also accepted) →
      the same five keys;
    * ``"regression"``: ``pred [N]`` predictive mean → ``mse``, ``mae``, ``nmse``.
    """
    _check_task_type(task_type)
    if task_type == "regression":
        pred, y = _check_regression(pred, y)
        return {"mse": mse(pred, y), "mae": mae(pred, y), "nmse": nmse(pred, y)}
    p = _to_numpy(pred, "pred")
    if task_type == "binary":
        if p.ndim == 2 and p.shape[1] == 2:
            p = p[:, 1]
        elif p.ndim != 1:
            raise ValueError(f"binary task needs pred [N] (probability of class 1), got shape {p.shape}")
    elif p.ndim != 2:
        raise ValueError(f"classification task needs pred [N, C] class probabilities, got shape {p.shape}")
    return {"accuracy": accuracy(p, y), "auc": auc(p, y), "ece": ece(p, y), "brier": brier(p, y), "nll": nll(p, y)}


def primary_metric(task: str | Mapping[str, float]) -> str | None:
    """The headline metric of a task: ``accuracy`` (classification, binary) or ``nmse`` (regression).

    ``task`` is a task type, or one task's results (``accuracy`` if reported, else ``nmse``,
    else ``None``).
    """
    if isinstance(task, Mapping):
        return next((k for k in ("accuracy", "nmse") if k in task), None)
    return "nmse" if _check_task_type(task) == "regression" else "accuracy"


def selection_score(task_results: TaskResults, task_types: Sequence[str]) -> float:
    """One higher-is-better number for model selection on the **validation** split.

    The mean over tasks of each task's primary metric, sign-flipped where lower is better:
    ``accuracy`` for classification/binary tasks and ``-nmse`` for regression tasks.
    ``task_types`` lists the types in the order of ``task_results`` (one string applies to
    all tasks). Tasks whose value is NaN (e.g. NMSE of a constant target) are skipped; if
    every task is NaN the score is NaN, which never compares greater than a best score.
    """
    if not task_results:
        raise ValueError("task_results is empty")
    names = list(task_results)
    if isinstance(task_types, str):
        task_types = [task_types] * len(names)
    task_types = list(task_types)
    if len(task_types) != len(names):
        raise ValueError(f"got {len(task_types)} task types for {len(names)} tasks ({', '.join(names)})")
    scores = []
    for name, ttype in zip(names, task_types):
        key = primary_metric(ttype)
        if key not in task_results[name]:
            raise ValueError(f"task {name!r} ({ttype}) has no {key!r} metric; it has {sorted(task_results[name])}")
        value = float(task_results[name][key])
        scores.append(value if HIGHER_IS_BETTER[key] else -value)
    arr = np.asarray(scores, dtype=np.float64)
    if np.any(np.isinf(arr)):
        raise ValueError("selection_score got an infinite metric value")
    if np.all(np.isnan(arr)):
        return float("nan")
    return float(np.nanmean(arr))


def average(tasks: TaskResults) -> dict[str, float]:
    """Per-metric mean over the tasks that report that metric (NaN values are skipped).

    This is the ``average`` entry of ``metrics.json``. A metric that is NaN for every task
    that has it averages to NaN. Keys keep the order in which they first appear.
    """
    if not tasks:
        raise ValueError("no tasks to average")
    values: dict[str, list[float]] = {}
    for name, metrics in tasks.items():
        if not isinstance(metrics, Mapping):
            raise ValueError(f"task {name!r}: expected a dict of metrics, got {type(metrics).__name__}")
        for key, value in metrics.items():
            try:
                values.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                raise ValueError(f"task {name!r}: metric {key!r} is not a number: {value!r}") from None
    out = {}
    for key, vals in values.items():
        arr = np.asarray(vals, dtype=np.float64)
        finite = arr[~np.isnan(arr)]
        out[key] = float(finite.mean()) if finite.size else float("nan")
    return out


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
            metrics = runs[run].get(task)
            cells.append("–" if metrics is None or key is None or key not in metrics else fmt(metrics[key], 'n/a'))
        rows.append([task, label, *cells])

    used = [k for k in ("accuracy", "nmse") if any(primary[t] == k for t in tasks)]
    for key in used:
        cells = []
        for run in names:
            vals = [
                float(runs[run][t][key]) for t in tasks if primary[t] == key and t in runs[run] and key in runs[run][t]
            ]
            vals = [v for v in vals if not math.isnan(v)]
            cells.append(fmt(np.mean(vals), 'n/a') if vals else "–")
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


# ----------------------------------------------------------------------------- dense prediction
def _dense(a, name: str) -> np.ndarray:
    """``a`` as an ndarray of its own dtype (dense maps are large: no float64 copy of a label map)."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        a = a.detach().cpu()
        if a.is_floating_point():
            a = a.float()  # numpy has no bfloat16
        a = a.numpy()
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if arr.dtype.kind == "f":
        _check_finite(arr, name)
    return arr


def _dense_pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    pred, target = _dense(pred, "pred"), _dense(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: pred is {list(pred.shape)} but target is {list(target.shape)}")
    return pred, target


def _labelled(pred, target, num_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true labels ``[M]`` int64 of the labelled pixels (target ≠ ``IGNORE_INDEX``)."""
    pred, target = _dense_pair(pred, target)
    for arr, name in ((pred, "pred"), (target, "target")):
        if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{name} must hold integer class labels")
    labelled = target != IGNORE_INDEX
    if not labelled.any():
        raise ValueError(f"no labelled pixels: every target is {IGNORE_INDEX} (ignored)")
    p, t = pred[labelled].astype(np.int64), target[labelled].astype(np.int64)
    top = np.inf if num_classes is None else num_classes
    if t.min() < 0 or t.max() >= top:
        raise ValueError(f"target labels must be {IGNORE_INDEX} (ignored) or in [0, {top}), "
                         f"found {int(t.min())}..{int(t.max())}")
    if p.min() < 0 or p.max() >= top:
        raise ValueError(f"pred labels must be in [0, {top}), found {int(p.min())}..{int(p.max())}")
    return p, t


def miou(pred, target, num_classes: int) -> float:
    """Mean intersection over union of a segmentation, over the pixels whose target is not -1.

    ``pred`` and ``target`` are label maps of one shape (e.g. ``[N, H, W]``; ``pred`` the
    argmax of the logits). Per class ``c``, ``IoU_c = TP / (TP + FP + FN)`` counted over all
    images together (one confusion matrix, as LibMTL accumulates it); classes in neither
    ``pred`` nor ``target`` are left out of the mean.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    p, t = _labelled(pred, target, num_classes)
    confusion = np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)
    hits = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - hits
    seen = union > 0
    return float(np.mean(hits[seen] / union[seen]))


def pixel_accuracy(pred, target) -> float:
    """Fraction of the labelled pixels (target not -1) whose predicted label is right."""
    p, t = _labelled(pred, target, None)
    return float(np.mean(p == t))


def depth_errors(pred, target) -> dict[str, float]:
    """``abs_err`` (mean ``|pred − target|``) and ``rel_err`` (mean ``|pred − target| / target``)
    over the pixels with a depth reading (``target ≠ 0``); ``pred`` and ``target`` of one shape."""
    pred, target = _dense_pair(pred, target)
    if target.min() < 0:
        raise ValueError(f"target depth must be >= 0 (0: no reading), found {target.min():g}")
    valid = target != 0
    if not valid.any():
        raise ValueError("no pixel has a depth reading: every target is 0")
    p, t = pred[valid].astype(np.float64), target[valid].astype(np.float64)
    err = np.abs(p - t)
    return {"abs_err": float(err.mean()), "rel_err": float(np.mean(err / t))}


def normal_angle(pred, target) -> float:
    """Mean angle in degrees between predicted and true surface normals, over the pixels with a
    normal (target not the zero vector). Channels are dim 1 (``[N, 3, H, W]``); both sides are
    normalised first, so ``pred`` need not be unit length (a zero prediction counts as 90°)."""
    pred, target = _dense_pair(pred, target)
    if pred.ndim < 2 or pred.shape[1] != 3:
        raise ValueError(f"normals must be shaped [N, 3, ...] (channels on dim 1), got {list(pred.shape)}")
    p, t = np.moveaxis(pred, 1, -1).astype(np.float64), np.moveaxis(target, 1, -1).astype(np.float64)
    t_norm = np.linalg.norm(t, axis=-1)
    valid = t_norm > 0
    if not valid.any():
        raise ValueError("no pixel has a normal: every target is the zero vector")
    p, t = p[valid], t[valid] / t_norm[valid, None]
    cos = np.sum(p * t, axis=-1) / np.maximum(np.linalg.norm(p, axis=-1), 1e-12)
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))).mean())


def dense_task_metrics(task: str, pred, target, num_classes: int | None = None) -> dict[str, float]:
    """All metrics of one dense task, keyed as in :data:`DENSE_METRICS`.

    * ``"segmentation"``: ``pred`` label map (argmax of the logits) → ``miou``, ``pixel_acc``
      (needs ``num_classes``);
    * ``"depth"``: ``pred`` depth map → ``abs_err``, ``rel_err``;
    * ``"normal"``: ``pred`` normals ``[N, 3, ...]`` → ``mean_angle`` (degrees).
    """
    if task == "segmentation":
        return {"miou": miou(pred, target, num_classes), "pixel_acc": pixel_accuracy(pred, target)}
    if task == "depth":
        return depth_errors(pred, target)
    if task == "normal":
        return {"mean_angle": normal_angle(pred, target)}
    raise ValueError(f"unknown dense task {task!r}; expected one of {', '.join(DENSE_METRICS)}")
