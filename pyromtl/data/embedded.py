"""Embedded datasets: built from scikit-learn's bundled 8x8 digits or generated, no download.

Every builder is deterministic: the images, domain shifts, rotations and synthetic tasks come
from fixed construction seeds, so only the train/val/test split depends on ``seed``. Inputs are
flattened to ``float32`` features (64 for the digits, pixel values scaled from 0..16 to [0, 1]).
The builders are registered with :mod:`pyromtl.datasets`; use ``pyromtl.datasets.load(name)``.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Callable

import numpy as np
from scipy import ndimage

from pyromtl.data.core import MultiTaskData

#: Fraction of every task held out for validation (model selection) and for test.
VAL_FRACTION = 0.15
TEST_FRACTION = 0.25

# Construction seeds: fixed, and different per dataset, so no two share random draws.
_DOMAINS_SEED = 1001
_ROTATION_SEED = 1002
_MIXED_SEED = 1003
_CLUSTERS_SEED = 1004

_DIGIT_NAMES = [str(d) for d in range(10)]


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images [1797, 8, 8] in [0, 1], labels [1797])``, read-only (shared by every builder)."""
    from sklearn.datasets import load_digits  # slow import, only when a digits set is built

    raw = load_digits()
    images = (raw.images / 16.0).astype(np.float32)
    labels = raw.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _flat(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.reshape(len(images), -1), dtype=np.float32)


def _rotate(images: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Rotate each image by its angle in degrees (bilinear, same 8x8 frame, zero fill)."""
    out = np.stack([ndimage.rotate(im, float(a), reshape=False, order=1) for im, a in zip(images, angles)])
    return np.clip(out, 0.0, 1.0)  # interpolation round-off can step a hair outside [0, 1]


def _split(seed: int) -> dict:
    return {"val_fraction": VAL_FRACTION, "test_fraction": TEST_FRACTION, "seed": seed}


# ------------------------------------------------------------------------------- builders
def digits_domains(*, seed: int = 0) -> MultiTaskData:
    """MIMO, 10 classes, 4 tasks: disjoint quarters of the digits, each with its own domain shift.

    The 1,797 images are shuffled with a fixed seed and cut into 4 disjoint subsets of 449-450
    images. Each subset is one task, named after its shift:

    * ``original``: the images as they are;
    * ``blurred``: Gaussian blur with sd 1 pixel (``scipy.ndimage.gaussian_filter``);
    * ``shifted``: moved one pixel to the right (``np.roll``, the empty left column wraps in);
    * ``thick``: strokes thickened by a 2x2 grey dilation (``scipy.ndimage.grey_dilation``).

    The label space (digits 0-9) is shared and the shifts are real: a linear classifier trained
    on ``original`` images scores about 0.78 on blurred, 0.42 on shifted and 0.59 on thick
    ones (0.98 on its own domain). Like Office-Home's domains seen through pre-extracted
    features, the domains stay related enough for knowledge to transfer. Harsher pixel-level
    shifts (inversion, 90-degree rotation) were tried first and dropped: with one image per
    class and task, an MLP cannot align such domains, and every multi-task method then loses
    to single-task learning.
    """
    images, labels = _digits()
    parts = np.array_split(np.random.default_rng(_DOMAINS_SEED).permutation(len(images)), 4)
    shifts: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "original": lambda im: im,
        "blurred": lambda im: ndimage.gaussian_filter(im, sigma=(0.0, 1.0, 1.0)),
        "shifted": lambda im: np.roll(im, 1, axis=2),
        "thick": lambda im: ndimage.grey_dilation(im, size=(1, 2, 2)),
    }
    xs = [_flat(shift(images[idx])) for shift, idx in zip(shifts.values(), parts)]
    ys = [labels[idx] for idx in parts]
    return MultiTaskData.from_arrays(
        xs, ys, "classification", list(shifts), num_classes=10, name="digits-domains",
        class_names=_DIGIT_NAMES, description=_doc(digits_domains), **_split(seed),
    )


def digits_rotation(*, seed: int = 0) -> MultiTaskData:
    """MIMO regression, 10 tasks (one per digit): predict the angle an image was rotated by.

    Task ``digitK`` holds every image of digit K (174-183 images). Each image is rotated by an
    angle drawn uniformly from {0, 10, ..., 90} degrees with a fixed seed
    (``scipy.ndimage.rotate``, ``reshape=False``, bilinear, zero fill); the target is the angle in
    degrees, standardised on the training split (``target_stats`` holds the mean and sd). The
    tasks share the target but not the input distribution: a stand-in for Rotated MNIST in VMTL.
    """
    images, labels = _digits()
    rng = np.random.default_rng(_ROTATION_SEED)
    angles = rng.integers(0, 10, size=len(images)) * 10.0
    rotated = _flat(_rotate(images, angles))
    tasks = [np.flatnonzero(labels == d) for d in range(10)]
    return MultiTaskData.from_arrays(
        [rotated[i] for i in tasks], [angles[i] for i in tasks], "regression", [f"digit{d}" for d in range(10)],
        name="digits-rotation", description=_doc(digits_rotation), **_split(seed),
    )


def digits_binary(*, seed: int = 0) -> MultiTaskData:
    """SIMO, 10 binary tasks is0..is9: one-vs-rest per digit (about 10% positives).

    All 1,797 images are the shared input; task ``isK`` labels an image 1 if it shows digit K.
    Every task is imbalanced, as the 40 attributes of CIFAR-MTL in BayesAgg are.
    """
    images, labels = _digits()
    y = {f"is{d}": (labels == d).astype(np.int64) for d in range(10)}
    return MultiTaskData.from_arrays(
        _flat(images), y, "binary", name="digits-binary", description=_doc(digits_binary), **_split(seed),
    )


def digits_mixed(*, seed: int = 0) -> MultiTaskData:
    """SIMO, mixed task types: rotation angle (regression), even (binary), digit (10 classes).

    Every image is rotated by an angle drawn uniformly from [-45, 45] degrees with a fixed seed
    (``scipy.ndimage.rotate``, ``reshape=False``, bilinear); the rotated image is the shared
    input. ``angle`` is that angle in degrees (standardised on train), ``even`` is 1 for digits
    0, 2, 4, 6, 8, and ``digit`` is the digit. A stand-in for UTKFace (age, gender, ethnicity)
    in BayesAgg.
    """
    images, labels = _digits()
    rng = np.random.default_rng(_MIXED_SEED)
    angles = rng.uniform(-45.0, 45.0, size=len(images))
    y = {"angle": angles, "even": (labels % 2 == 0).astype(np.int64), "digit": labels}
    return MultiTaskData.from_arrays(
        _flat(_rotate(images, angles)), y, ["regression", "binary", "classification"], name="digits-mixed",
        class_names=_DIGIT_NAMES, description=_doc(digits_mixed), **_split(seed),
    )


#: digits-grouped: each task's digit subset, and the cluster it belongs to.
GROUPS: dict[str, tuple[tuple[int, ...], int]] = {
    "d012": ((0, 1, 2), 0),
    "d1234": ((1, 2, 3, 4), 0),
    "d024": ((0, 2, 4), 0),
    "d567": ((5, 6, 7), 1),
    "d6789": ((6, 7, 8, 9), 1),
    "d579": ((5, 7, 9), 1),
}


def digits_grouped(*, seed: int = 0) -> MultiTaskData:
    """SIMO, 6 tasks over overlapping digit subsets in 2 known clusters (like HIB's Grouped-MNIST).

    Task ``dABC`` classifies an image among its digits A, B, C plus a last class "none": the
    target is the digit's position in the subset, or ``len(subset)`` when the digit is not in
    it. Cluster 0 is ``d012``, ``d1234``, ``d024`` (digits 0-4), cluster 1 is ``d567``,
    ``d6789``, ``d579`` (digits 5-9): tasks overlap within a cluster and never across.
    ``relatedness`` is the 6x6 cluster indicator (1 within a cluster, 0 across).
    """
    images, labels = _digits()
    y, ncls, cluster = {}, [], []
    for name, (digits, c) in GROUPS.items():
        position = np.full(len(labels), len(digits), dtype=np.int64)  # "none" by default
        for k, d in enumerate(digits):
            position[labels == d] = k
        y[name] = position
        ncls.append(len(digits) + 1)
        cluster.append(c)
    cluster_arr = np.asarray(cluster)
    return MultiTaskData.from_arrays(
        _flat(images), y, "classification", num_classes=ncls, name="digits-grouped",
        relatedness=(cluster_arr[:, None] == cluster_arr[None, :]).astype(float),
        description=_doc(digits_grouped), **_split(seed),
    )


def synthetic_clusters(
    *,
    seed: int = 0,
    setting: str = "mimo",
    num_tasks: int = 8,
    num_clusters: int = 2,
    samples_per_task: int = 120,
    dim: int = 16,
    num_classes: int = 4,
    task_noise: float = 0.3,
) -> MultiTaskData:
    """MIMO or SIMO, 8 generated 4-class tasks in 2 clusters, so the true relatedness is known.

    (Counts are the defaults; every one is an option.)

    Each cluster has a random linear classifier: ``num_classes`` orthonormal directions in
    R^``dim``. A task copies its cluster's directions, adds Gaussian noise of relative size
    ``task_noise`` and re-normalises them. Inputs are standard normal; a label is drawn from
    ``softmax(4 * x @ W_task)`` (so a little label noise remains). Tasks go to clusters in
    contiguous blocks (task t in cluster ``t * num_clusters // num_tasks``). With
    ``setting="mimo"`` every task draws its own ``samples_per_task`` inputs; with ``"simo"``
    all tasks label one shared set of ``samples_per_task`` inputs. ``relatedness`` is the TxT
    cluster indicator (1 within a cluster and on the diagonal, 0 across). Fixed construction seed.
    """
    _check_int("num_tasks", num_tasks, 1)
    _check_int("num_clusters", num_clusters, 1)
    _check_int("samples_per_task", samples_per_task, 8)
    _check_int("dim", dim, 1)
    _check_int("num_classes", num_classes, 2)
    if num_clusters > num_tasks:
        raise ValueError(f"num_clusters ({num_clusters}) cannot exceed num_tasks ({num_tasks})")
    if num_classes > dim:
        raise ValueError(f"num_classes ({num_classes}) cannot exceed dim ({dim}): class directions are orthonormal")
    if setting not in ("mimo", "simo"):
        raise ValueError(f"setting must be 'mimo' or 'simo', got {setting!r}")
    if isinstance(task_noise, bool) or not isinstance(task_noise, (int, float)) or not 0 <= task_noise < np.inf:
        raise ValueError(f"task_noise must be a finite number >= 0, got {task_noise!r}")

    rng = np.random.default_rng(_CLUSTERS_SEED)
    centres = [np.linalg.qr(rng.normal(size=(dim, num_classes)))[0] for _ in range(num_clusters)]
    cluster = np.arange(num_tasks) * num_clusters // num_tasks
    weights = []
    for t in range(num_tasks):
        w = centres[cluster[t]] + task_noise * rng.normal(size=(dim, num_classes)) / np.sqrt(dim)
        weights.append(w / np.linalg.norm(w, axis=0, keepdims=True))

    def draw_labels(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        logits = 4.0 * x @ w
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        u = rng.random((len(x), 1))
        return np.minimum((p.cumsum(axis=1) < u).sum(axis=1), num_classes - 1)  # inverse-CDF sampling

    names = [f"task{t}" for t in range(num_tasks)]
    rel = (cluster[:, None] == cluster[None, :]).astype(float)
    common = dict(num_classes=num_classes, name="synthetic-clusters", relatedness=rel,
                  description=_doc(synthetic_clusters), **_split(seed))
    if setting == "simo":
        x = rng.normal(size=(samples_per_task, dim)).astype(np.float32)
        y = {name: draw_labels(x, w) for name, w in zip(names, weights)}
        return MultiTaskData.from_arrays(x, y, "classification", **common)
    xs = [rng.normal(size=(samples_per_task, dim)).astype(np.float32) for _ in range(num_tasks)]
    ys = [draw_labels(x, w) for x, w in zip(xs, weights)]
    return MultiTaskData.from_arrays(xs, ys, "classification", names, **common)


def _check_int(what: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")


def _doc(fn: Callable) -> str:
    """A builder's docstring, dedented: the dataset's description."""
    return inspect.getdoc(fn) or ""


#: The embedded datasets by name, in the order ``pyromtl.datasets.available()`` lists them.
BUILDERS: dict[str, Callable[..., MultiTaskData]] = {
    "digits-domains": digits_domains,
    "digits-rotation": digits_rotation,
    "digits-binary": digits_binary,
    "digits-mixed": digits_mixed,
    "digits-grouped": digits_grouped,
    "synthetic-clusters": synthetic_clusters,
}
