"""The metric keys of ``metrics.json``, their directions, and the task types they belong to."""

from __future__ import annotations

from collections.abc import Mapping

TASK_TYPES: tuple[str, ...] = ("classification", "binary", "regression")

#: Metric keys reported for ``classification`` and ``binary`` tasks, in order.
CLASSIFICATION_METRICS: tuple[str, ...] = ("accuracy", "auc", "ece", "brier", "nll")
#: Metric keys reported for ``regression`` tasks, in order.
REGRESSION_METRICS: tuple[str, ...] = ("mse", "mae", "nmse")
#: Metric keys reported for each dense task (:func:`~pyromtl.metrics.dense_task_metrics`), in order.
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

#: A task-results mapping, as in the ``tasks`` entry of ``metrics.json``: ``{task: {metric: value}}``.
TaskResults = Mapping[str, Mapping[str, float]]
