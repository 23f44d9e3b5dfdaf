"""Evaluation metrics for multi-task learning, and the papers' MTL-vs-STL summaries.

The functions live in :mod:`~pyromtl.metrics.prediction` (per task and over tasks),
:mod:`~pyromtl.metrics.comparison` (against a baseline) and :mod:`~pyromtl.metrics.dense`
(dense prediction), the keys and their directions in :mod:`~pyromtl.metrics.keys`; every public
name is also here.

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
  (SMTL's η̂), rendered together by :func:`compare_table`; :func:`metrics_per_task` picks a task's
  metrics from a list (SMTL's ``m_t > 1``).

A *task-results* mapping, as in the ``tasks`` entry of ``metrics.json``, is
``{task_name: {metric_key: value}}``.

Every function validates its input and raises :class:`ValueError` naming the problem
(shape mismatch, empty input, NaN/inf, labels out of range, mismatched tasks, ...).
"""

from pyromtl.metrics.comparison import (
    METRIC_GROUPS,
    check_metric_names,
    compare_table,
    delta_i,
    delta_m,
    eta_hat,
    metrics_per_task,
)
from pyromtl.metrics.dense import dense_task_metrics, depth_errors, miou, normal_angle, pixel_accuracy
from pyromtl.metrics.keys import (
    CLASSIFICATION_METRICS,
    DENSE_METRICS,
    HIGHER_IS_BETTER,
    REGRESSION_METRICS,
    TASK_TYPES,
    TaskResults,
)
from pyromtl.metrics.prediction import (
    accuracy,
    auc,
    average,
    brier,
    ece,
    mae,
    mse,
    nll,
    nmse,
    primary_metric,
    selection_score,
    task_metrics,
)

__all__ = [
    "CLASSIFICATION_METRICS",
    "DENSE_METRICS",
    "HIGHER_IS_BETTER",
    "METRIC_GROUPS",
    "REGRESSION_METRICS",
    "TASK_TYPES",
    "TaskResults",
    "accuracy",
    "auc",
    "average",
    "brier",
    "check_metric_names",
    "compare_table",
    "delta_i",
    "delta_m",
    "dense_task_metrics",
    "depth_errors",
    "ece",
    "eta_hat",
    "mae",
    "metrics_per_task",
    "miou",
    "mse",
    "nll",
    "nmse",
    "normal_angle",
    "pixel_accuracy",
    "primary_metric",
    "selection_score",
    "task_metrics",
]
