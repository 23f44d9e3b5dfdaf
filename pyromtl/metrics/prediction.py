"""Per-task prediction metrics, and their aggregation over tasks.

:func:`accuracy`, :func:`auc`, :func:`ece`, :func:`brier`, :func:`nll` for ``classification``
and ``binary`` tasks and :func:`mse`, :func:`mae`, :func:`nmse` for ``regression`` tasks,
bundled by :func:`task_metrics`; :func:`average`, :func:`primary_metric` and
:func:`selection_score` (the one higher-is-better number of model selection on *validation* data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pyromtl.metrics.keys import HIGHER_IS_BETTER, TASK_TYPES, TaskResults

# Tolerance on "each row of probabilities sums to one" (float32 softmax averages are fine).
_SUM_ATOL = 1e-3
# Tolerance on "probabilities lie in [0, 1]".
_RANGE_ATOL = 1e-6


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


def check_finite(arr: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name} contains {bad} NaN or inf value(s)")


def _check_target(y, n: int | None, name: str = "y") -> np.ndarray:
    y = _to_numpy(y, name)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {y.shape}")
    if y.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    check_finite(y, name)
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
    check_finite(p, "probs")
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
    check_finite(pred, "pred")
    y = _check_target(y, pred.shape[0])
    return pred, y


# ----------------------------------------------------------------------------- classification
def accuracy(probs, y) -> float:
    """Fraction of samples whose most probable class equals the label.

    ``probs`` is ``[N, C]`` class probabilities, or ``[N]`` probabilities of class 1 for a
    binary task (predicted label ``1`` when ``p > 0.5``; a tie at exactly 0.5 predicts 0,
    the same as ``argmax`` of ``[1 - p, p]``). ``y`` is ``[N]`` integer labels.

    Args:
        probs: ``[N, C]`` class probabilities, or ``[N]`` probabilities of class 1 (binary).
        y: ``[N]`` integer class labels.

    Returns:
        The accuracy, in [0, 1].

    Raises:
        ValueError: ``probs`` of the wrong shape, empty, not finite, outside [0, 1] or with rows
            not summing to 1; ``y`` not 1-D, of another length, or not integer labels in [0, C).
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

    Args:
        probs: ``[N, C]`` class probabilities, or ``[N]`` probabilities of class 1 (binary).
        y: ``[N]`` integer class labels.

    Returns:
        The AUC, in [0, 1], or NaN.

    Raises:
        ValueError: ``probs`` of the wrong shape, empty, not finite, outside [0, 1] or with rows
            not summing to 1; ``y`` not 1-D, of another length, or not integer labels in [0, C).
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
    r"""Expected calibration error with ``n_bins`` equal-width confidence bins.

    Following Naeini et al. (2015) and Guo et al. (2017, eq. 3), which BayesAgg-MTL
    (App. C.1) uses with 15 bins: with top-label confidence ``conf_i = max_c p_ic``, predicted
    label ``argmax_c p_ic``, and bins ``B_m = ((m-1)/M, m/M]``,

    .. math:: \mathrm{ECE} = \sum_{m=1}^{M} \frac{|B_m|}{N} \,
              \bigl|\mathrm{acc}(B_m) - \mathrm{conf}(B_m)\bigr|.

    Binary ``probs [N]`` are treated as the two classes ``[1 − p, p]``, so the confidence is
    ``max(p, 1 − p)``. A perfectly calibrated predictor has ECE 0; the range is ``[0, 1]``.

    Args:
        probs: ``[N, C]`` class probabilities, or ``[N]`` probabilities of class 1 (binary).
        y: ``[N]`` integer class labels.
        n_bins: the number of confidence bins ``M``.

    Returns:
        The ECE, in [0, 1].

    Raises:
        ValueError: ``probs`` of the wrong shape, empty, not finite, outside [0, 1] or with rows
            not summing to 1; ``y`` not 1-D, of another length, or not integer labels in [0, C).
        ValueError: ``n_bins`` is not a positive integer.
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

    Args:
        probs: ``[N, C]`` class probabilities, or ``[N]`` probabilities of class 1 (binary).
        y: ``[N]`` integer class labels.

    Returns:
        The Brier score, in [0, 2].

    Raises:
        ValueError: ``probs`` of the wrong shape, empty, not finite, outside [0, 1] or with rows
            not summing to 1; ``y`` not 1-D, of another length, or not integer labels in [0, C).
    """
    p, y = _check_probs(probs, y)
    onehot = np.zeros_like(p)
    onehot[np.arange(y.shape[0]), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def nll(probs, y, floor: float = 1e-12) -> float:
    """Mean negative log predictive probability of the true class, ``-(1/N) Σ_i log p_{i, y_i}``.

    The probability is floored at ``floor`` so that one confident mistake gives a large finite
    value instead of ``inf`` (``-log 1e-12 ≈ 27.6``).

    Args:
        probs: ``[N, C]`` class probabilities, or ``[N]`` probabilities of class 1 (binary).
        y: ``[N]`` integer class labels.
        floor: the smallest probability taken.

    Returns:
        The mean NLL, at least 0.

    Raises:
        ValueError: ``probs`` of the wrong shape, empty, not finite, outside [0, 1] or with rows
            not summing to 1; ``y`` not 1-D, of another length, or not integer labels in [0, C).
    """
    p, y = _check_probs(probs, y)
    return float(-np.mean(np.log(np.maximum(p[np.arange(y.shape[0]), y], floor))))


# ----------------------------------------------------------------------------- regression
def mse(pred, y) -> float:
    """Mean squared error ``(1/N) Σ_i (ŷ_i − y_i)²`` of predictive means ``pred [N]``.

    Args:
        pred: ``[N]`` predictive means.
        y: ``[N]`` targets.

    Returns:
        The MSE.

    Raises:
        ValueError: ``pred`` or ``y`` not 1-D, empty, not finite, or of different lengths.
    """
    pred, y = _check_regression(pred, y)
    return float(np.mean((pred - y) ** 2))


def mae(pred, y) -> float:
    """Mean absolute error ``(1/N) Σ_i |ŷ_i − y_i|`` of predictive means ``pred [N]``.

    Args:
        pred: ``[N]`` predictive means.
        y: ``[N]`` targets.

    Returns:
        The MAE.

    Raises:
        ValueError: ``pred`` or ``y`` not 1-D, empty, not finite, or of different lengths.
    """
    pred, y = _check_regression(pred, y)
    return float(np.mean(np.abs(pred - y)))


def nmse(pred, y) -> float:
    """Normalised mean squared error, the metric VMTL reports for Rotated MNIST angles.

        NMSE = MSE(ŷ, y) / Var(y),   Var(y) = (1/N) Σ_i (y_i − ȳ)²  (population variance).

    It is invariant to the scale of the targets (standardised or original units give the same
    value), and predicting the mean of ``y`` everywhere scores exactly 1. Returns ``nan``
    when ``y`` is constant (e.g. a single sample), where the ratio is undefined.

    Args:
        pred: ``[N]`` predictive means.
        y: ``[N]`` targets.

    Returns:
        The NMSE, or NaN.

    Raises:
        ValueError: ``pred`` or ``y`` not 1-D, empty, not finite, or of different lengths.
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

    Args:
        task_type: ``"classification"``, ``"binary"`` or ``"regression"``.
        pred: the predictions, shaped as above.
        y: ``[N]`` labels or targets.

    Returns:
        ``{metric: value}``.

    Raises:
        ValueError: an unknown task type, or predictions or targets the metrics refuse.
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

    Args:
        task: a task type, or one task's ``{metric: value}``.

    Returns:
        The metric's key, or None for results with neither.

    Raises:
        ValueError: an unknown task type.
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

    Args:
        task_results: ``{task: {metric: value}}`` on the validation split.
        task_types: the tasks' types, in order, or one type for all.

    Returns:
        The score, or NaN.

    Raises:
        ValueError: no tasks, a count of types that differs from the tasks', an unknown task
            type, a task missing its primary metric, or an infinite value.
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
        if key is None or key not in task_results[name]:  # a task type always has one
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

    Args:
        tasks: ``{task: {metric: value}}``.

    Returns:
        ``{metric: mean}``.

    Raises:
        ValueError: no tasks, a task's results that are not a dict, or a value that is not a number.
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
