"""Embedded datasets: built from scikit-learn's bundled 8x8 digits or generated, no download.

Every builder is deterministic: the images, domain shifts, rotations and synthetic tasks come
from fixed construction seeds, so only the train/val/test split depends on ``seed``. Inputs are
flattened to ``float32`` features (64 for the digits, 144 for the 12x12 overlays, pixel values
scaled from 0..16 to [0, 1]). The digits arrays come from :mod:`pyromtl.data.digit_arrays` and
are cached on disk (:mod:`pyromtl.data.cache`), so only the first build on a machine pays for
scikit-learn and the image work. The builders are registered with :mod:`pyromtl.datasets`; use
``pyromtl.datasets.load(name)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib.metadata import version as installed_version

import numpy as np

from pyromtl.data.cache import cached_arrays
from pyromtl.data.core import MultiTaskData
from pyromtl.data.digit_tasks import GROUPS, digit_groups, group_targets
from pyromtl.data.validate import check_int

__all__ = [
    "ARRAY_VERSIONS",
    "BUILDERS",
    "GROUPS",
    "TEST_FRACTION",
    "VAL_FRACTION",
    "digits_binary",
    "digits_conflict",
    "digits_domains",
    "digits_grouped",
    "digits_mixed",
    "digits_overlay",
    "digits_regression",
    "digits_rotation",
    "synthetic_clusters",
]

#: Fraction of every task held out for validation (model selection) and for test.
VAL_FRACTION = 0.15
TEST_FRACTION = 0.25

_CLUSTERS_SEED = 1004

_DIGIT_NAMES = [str(d) for d in range(10)]

#: Version of every :mod:`pyromtl.data.digit_arrays` builder's output, part of its cache key:
#: bump one whenever that function's arrays change, so stale cache entries are not read.
ARRAY_VERSIONS: dict[str, str] = {
    "plain": "1",
    "domains": "1",
    "rotation": "1",
    "mixed": "1",
    "regression": "1",
    "overlay": "1",
    "conflict": "1",
}


def _arrays(kind: str) -> dict[str, np.ndarray]:
    """The named arrays of ``digit_arrays.<kind>()``, from the on-disk cache after the first build."""

    def build() -> dict[str, np.ndarray]:
        # only on a cache miss: the module imports scikit-learn and scipy.ndimage (about 2 s)
        from pyromtl.data import digit_arrays

        return getattr(digit_arrays, kind)()

    # the image work is scipy's and the images scikit-learn's: an upgrade of either rebuilds
    libraries = {lib: installed_version(lib) for lib in ("scipy", "scikit-learn")}
    return cached_arrays(f"digits-{kind}", build, version=ARRAY_VERSIONS[kind], options=libraries)


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
    a = _arrays("domains")
    xs, ys = [a[f"x{t}"] for t in range(4)], [a[f"y{t}"] for t in range(4)]
    return MultiTaskData.from_arrays(
        xs,
        ys,
        "classification",
        ["original", "blurred", "shifted", "thick"],
        num_classes=10,
        name="digits-domains",
        class_names=_DIGIT_NAMES,
        description=_doc(digits_domains),
        **_split(seed),
    )


def digits_rotation(*, seed: int = 0) -> MultiTaskData:
    """MIMO regression, 10 tasks (one per digit): predict the angle an image was rotated by.

    Task ``digitK`` holds every image of digit K (174-183 images). Each image is rotated by an
    angle drawn uniformly from {0, 10, ..., 90} degrees with a fixed seed
    (``scipy.ndimage.rotate``, ``reshape=False``, bilinear, zero fill); the target is the angle in
    degrees, standardised on the training split (``target_stats`` holds the mean and sd). The
    tasks share the target but not the input distribution: a stand-in for Rotated MNIST in VMTL.
    """
    a = _arrays("rotation")
    tasks = [np.flatnonzero(a["digit"] == d) for d in range(10)]
    return MultiTaskData.from_arrays(
        [a["x"][i] for i in tasks],
        [a["angle"][i] for i in tasks],
        "regression",
        [f"digit{d}" for d in range(10)],
        name="digits-rotation",
        description=_doc(digits_rotation),
        **_split(seed),
    )


def digits_binary(*, seed: int = 0) -> MultiTaskData:
    """SIMO, 10 binary tasks is0..is9: one-vs-rest per digit (about 10% positives).

    All 1,797 images are the shared input; task ``isK`` labels an image 1 if it shows digit K.
    Every task is imbalanced, as the 40 attributes of CIFAR-MTL in BayesAgg are.
    """
    a = _arrays("plain")
    y = {f"is{d}": (a["digit"] == d).astype(np.int64) for d in range(10)}
    return MultiTaskData.from_arrays(
        a["x"],
        y,
        "binary",
        name="digits-binary",
        description=_doc(digits_binary),
        **_split(seed),
    )


def digits_mixed(*, seed: int = 0) -> MultiTaskData:
    """SIMO, mixed task types: rotation angle (regression), even (binary), digit (10 classes).

    Every image is rotated by an angle drawn uniformly from [-45, 45] degrees with a fixed seed
    (``scipy.ndimage.rotate``, ``reshape=False``, bilinear); the rotated image is the shared
    input. ``angle`` is that angle in degrees (standardised on train), ``even`` is 1 for digits
    0, 2, 4, 6, 8, and ``digit`` is the digit. A stand-in for UTKFace (age, gender, ethnicity)
    in BayesAgg.
    """
    a = _arrays("mixed")
    labels = a["digit"]
    y = {"angle": a["angle"], "even": (labels % 2 == 0).astype(np.int64), "digit": labels}
    return MultiTaskData.from_arrays(
        a["x"],
        y,
        ["regression", "binary", "classification"],
        name="digits-mixed",
        class_names=_DIGIT_NAMES,
        description=_doc(digits_mixed),
        **_split(seed),
    )


def digits_grouped(
    *, seed: int = 0, group_size: int | None = None, num_clusters: int = 2, tasks_per_cluster: int = 3
) -> MultiTaskData:
    """SIMO, 6 tasks over overlapping digit subsets in 2 known clusters (like HIB's Grouped-MNIST).

    (Counts are the defaults; see the options below.)

    Task ``dABC`` classifies an image among its digits A, B, C plus a last class "none": the
    target is the digit's position in the subset, or ``len(subset)`` when the digit is not in
    it. By default the tasks are :data:`GROUPS`: cluster 0 is ``d012``, ``d1234``, ``d024``
    (digits 0-4), cluster 1 is ``d567``, ``d6789``, ``d579`` (digits 5-9), so subsets of 3 and
    4 digits overlap within a cluster and never across. ``relatedness`` is the TxT cluster
    indicator (1 within a cluster, 0 across).

    Options: ``group_size`` (3 or 4) gives every task that many digits; ``num_clusters`` (2 or
    more) cuts the digits 0-9 into that many contiguous blocks (``np.array_split``); each cluster
    then gets ``tasks_per_cluster`` distinct subsets of its block, drawn with a fixed seed.
    Setting only ``num_clusters`` or ``tasks_per_cluster`` uses groups of 3. A cluster whose block
    is smaller than ``group_size``, or has fewer distinct subsets than ``tasks_per_cluster``,
    raises ``ValueError``.
    """
    a = _arrays("plain")
    y, ncls, rel = group_targets(a["digit"], digit_groups(group_size, num_clusters, tasks_per_cluster))
    return MultiTaskData.from_arrays(
        a["x"],
        y,
        "classification",
        num_classes=ncls,
        name="digits-grouped",
        relatedness=rel,
        description=_doc(digits_grouped),
        **_split(seed),
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
    check_int("num_tasks", num_tasks, 1)
    check_int("num_clusters", num_clusters, 1)
    check_int("samples_per_task", samples_per_task, 8)
    check_int("dim", dim, 1)
    check_int("num_classes", num_classes, 2)
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
    common = dict(
        num_classes=num_classes,
        name="synthetic-clusters",
        relatedness=rel,
        description=_doc(synthetic_clusters),
        **_split(seed),
    )
    if setting == "simo":
        x = rng.normal(size=(samples_per_task, dim)).astype(np.float32)
        y = {name: draw_labels(x, w) for name, w in zip(names, weights)}
        return MultiTaskData.from_arrays(x, y, "classification", **common)
    xs = [rng.normal(size=(samples_per_task, dim)).astype(np.float32) for _ in range(num_tasks)]
    ys = [draw_labels(x, w) for x, w in zip(xs, weights)]
    return MultiTaskData.from_arrays(xs, ys, "classification", names, **common)


def digits_regression(*, seed: int = 0) -> MultiTaskData:
    """SIMO regression, 5 continuous targets of transformed digits: angle, scale, ink, row, col.

    Every image is rotated by an angle uniform in [-30, 30] degrees, scaled by a factor uniform
    in [0.8, 1.2] and shifted by up to one pixel per axis about the centre of its 8x8 frame
    (bilinear, zero fill, fixed seed); the transformed image is the shared input. ``angle`` and
    ``scale`` are the drawn transform, ``ink`` is the summed pixel intensity and ``row`` /
    ``col`` the centre of mass in pixels, measured on the input. Targets are standardised on
    train (``target_stats`` keeps the scale). Several related properties of one input, as
    QM9's molecular properties are; a stand-in for QM9 in BayesAgg.
    """
    a = _arrays("regression")
    names = ["angle", "scale", "ink", "row", "col"]
    return MultiTaskData.from_arrays(
        a["x"],
        {k: a[k] for k in names},
        "regression",
        name="digits-regression",
        description=_doc(digits_regression),
        **_split(seed),
    )


def digits_overlay(*, seed: int = 0) -> MultiTaskData:
    """SIMO, 2 tasks of 10 classes: two overlapping digits in one 12x12 frame (like MultiMNIST).

    Every image is paired with another through a fixed permutation. The first goes in near the
    top-left corner (offset 0 or 1 pixel per axis), the second near the bottom-right (offset 3
    or 4), and where they overlap the brighter pixel wins. Task ``first`` is the top-left
    digit, ``second`` the bottom-right one. Inputs are the 144 pixels in [0, 1].
    """
    a = _arrays("overlay")
    return MultiTaskData.from_arrays(
        a["x"],
        {"first": a["first"], "second": a["second"]},
        "classification",
        num_classes=10,
        name="digits-overlay",
        class_names=_DIGIT_NAMES,
        description=_doc(digits_overlay),
        **_split(seed),
    )


def digits_conflict(*, seed: int = 0) -> MultiTaskData:
    """SIMO, 4 tasks: digit (10 classes), even, large, and a conflicting task, clockwise.

    Every image is rotated by 5-20 degrees, clockwise for half the images of each digit and
    counter-clockwise for the other half (fixed seed). ``digit``, ``even`` (0, 2, 4, 6, 8) and
    ``large`` (5-9) ask what the digit is, so they reward shared features that ignore the
    rotation; ``clockwise`` asks only for the rotation's direction, which is independent of
    the digit. The conflict is over what the shared representation keeps: hard sharing lets
    the three digit tasks pull it towards rotation invariance, which is expected to hurt
    ``clockwise``, the task safe-MTL methods should protect. (A task that only relabels the
    digits, e.g. a permutation, would not conflict: its own head absorbs any relabelling.)
    """
    a = _arrays("conflict")
    labels = a["digit"]
    y = {
        "digit": labels,
        "even": (labels % 2 == 0).astype(np.int64),
        "large": (labels >= 5).astype(np.int64),
        "clockwise": a["clockwise"],
    }
    return MultiTaskData.from_arrays(
        a["x"],
        y,
        ["classification", "binary", "binary", "binary"],
        name="digits-conflict",
        class_names=_DIGIT_NAMES,
        description=_doc(digits_conflict),
        **_split(seed),
    )


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
    "digits-regression": digits_regression,
    "digits-overlay": digits_overlay,
    "digits-conflict": digits_conflict,
}
