"""Dense prediction metrics (one target per pixel, :mod:`pyromtl.data.dense`): :func:`miou` and
:func:`pixel_accuracy` for segmentation, :func:`depth_errors` and :func:`normal_angle` for depth
and surface normals, bundled by :func:`dense_task_metrics`."""

from __future__ import annotations

import numpy as np

from pyromtl.data.constants import IGNORE_INDEX
from pyromtl.metrics.keys import DENSE_METRICS
from pyromtl.metrics.prediction import check_finite


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
        check_finite(arr, name)
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
        raise ValueError(
            f"target labels must be {IGNORE_INDEX} (ignored) or in [0, {top}), found {int(t.min())}..{int(t.max())}"
        )
    if p.min() < 0 or p.max() >= top:
        raise ValueError(f"pred labels must be in [0, {top}), found {int(p.min())}..{int(p.max())}")
    return p, t


def miou(pred, target, num_classes: int) -> float:
    """Mean intersection over union of a segmentation, over the pixels whose target is not -1.

    ``pred`` and ``target`` are label maps of one shape (e.g. ``[N, H, W]``; ``pred`` the
    argmax of the logits). Per class ``c``, ``IoU_c = TP / (TP + FP + FN)`` counted over all
    images together (one confusion matrix, as LibMTL accumulates it); classes in neither
    ``pred`` nor ``target`` are left out of the mean.

    Args:
        pred: predicted labels.
        target: true labels, -1 where unlabelled.
        num_classes: the number of classes ``C``, at least 2.

    Returns:
        The mIoU, in [0, 1].

    Raises:
        ValueError: ``pred`` and ``target`` not numeric, empty, not finite or of different
            shapes; no labelled pixel; labels that are not integers or fall outside [0, C);
            ``num_classes`` not an integer >= 2.
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
    """Fraction of the labelled pixels (target not -1) whose predicted label is right.

    Args:
        pred: predicted labels.
        target: true labels of the same shape, -1 where unlabelled.

    Returns:
        The pixel accuracy, in [0, 1].

    Raises:
        ValueError: ``pred`` and ``target`` not numeric, empty, not finite or of different
            shapes; no labelled pixel; labels that are not integers or fall outside [0, C).
    """
    p, t = _labelled(pred, target, None)
    return float(np.mean(p == t))


def depth_errors(pred, target) -> dict[str, float]:
    """``abs_err`` (mean ``|pred − target|``) and ``rel_err`` (mean ``|pred − target| / target``)
    over the pixels with a depth reading (``target ≠ 0``); ``pred`` and ``target`` of one shape.

    Args:
        pred: predicted depths.
        target: true depths, 0 where there is no reading.

    Returns:
        ``{"abs_err": ..., "rel_err": ...}``.

    Raises:
        ValueError: ``pred`` and ``target`` not numeric, empty, not finite or of different
            shapes; a negative target depth; no pixel with a reading.
    """
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
    normalised first, so ``pred`` need not be unit length (a zero prediction counts as 90°).

    Args:
        pred: predicted normals ``[N, 3, ...]``.
        target: true normals of the same shape, the zero vector where there is none.

    Returns:
        The mean angle, in degrees.

    Raises:
        ValueError: ``pred`` and ``target`` not numeric, empty, not finite or of different
            shapes; no 3 channels on dim 1; no pixel with a normal.
    """
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

    Args:
        task: ``"segmentation"``, ``"depth"`` or ``"normal"``.
        pred: the predictions, shaped as above.
        target: the targets, of the same shape.
        num_classes: the number of classes (segmentation only).

    Returns:
        ``{metric: value}``.

    Raises:
        ValueError: an unknown task, segmentation without ``num_classes``, or inputs the
            metric refuses.
    """
    if task == "segmentation":
        if num_classes is None:  # miou's own check and message, before the call
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        return {"miou": miou(pred, target, num_classes), "pixel_acc": pixel_accuracy(pred, target)}
    if task == "depth":
        return depth_errors(pred, target)
    if task == "normal":
        return {"mean_angle": normal_angle(pred, target)}
    raise ValueError(f"unknown dense task {task!r}; expected one of {', '.join(DENSE_METRICS)}")
