"""Full-size MNIST benchmarks from the idx files: Grouped-MNIST (HIB) and MultiMNIST."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pyromtl.data.constants import SPLITS
from pyromtl.data.core import MultiTaskData
from pyromtl.data.digit_tasks import digit_groups, group_targets, overlay_pairs
from pyromtl.data.loaders import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    _carve_splits,
    _check_fractions,
    _find_mnist_file,
    _require_dir,
    read_idx,
)

#: MultiMNIST's frame: two 28x28 digits, offsets 0-4 (first) and 4-8 (second) pixels per axis.
MULTI_FRAME = 36
_MULTI_SEED = 2001


def read_mnist(root: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images uint8 [N, 28, 28], labels [N]), "test": ...}`` from MNIST's four idx files."""
    root = _require_dir(root, "MNIST")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find_mnist_file(root, f"{prefix}-images-idx3-ubyte"), IDX_IMAGES_MAGIC)
        labels = read_idx(_find_mnist_file(root, f"{prefix}-labels-idx1-ubyte"), IDX_LABELS_MAGIC)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{root}: MNIST {split} has {images.shape[0]} images but {labels.shape[0]} labels")
        if labels.size and labels.max() > 9:
            raise ValueError(f"{root}: MNIST {split} label {int(labels.max())} is not a digit")
        out[split] = (images, labels.astype(np.int64))
    return out


def _official_splits(labels: np.ndarray, n_train: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """MNIST's test set as test; ``val_fraction`` of train, stratified by ``labels``, as val."""
    given = {"train": np.arange(n_train), "test": np.arange(n_train, len(labels))}
    splits = _carve_splits(labels, given, val_fraction, 0.0, np.random.default_rng(seed))
    return {s: splits[s] for s in SPLITS}


def load_grouped_mnist(
    root: str | Path,
    seed: int = 0,
    *,
    group_size: int | None = None,
    num_clusters: int = 2,
    tasks_per_cluster: int = 3,
    val_fraction: float = 0.1,
) -> MultiTaskData:
    """SIMO, 6 tasks over overlapping digit subsets in 2 clusters: Grouped-MNIST (HIB) at full size.

    The tasks of ``digits-grouped`` (same options: ``group_size``, ``num_clusters``,
    ``tasks_per_cluster``) on MNIST's 70,000 images, read from ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` in
    ``root`` (plain or ``.gz``; torchvision's ``root/MNIST/raw`` works too). Inputs are the 784
    pixels in [0, 1]. MNIST's test set is the test split; ``val_fraction`` of the training
    images (stratified by digit, seeded) becomes val. ``relatedness`` is the cluster indicator.
    """
    _check_fractions(val_fraction, 0.0)
    groups = digit_groups(group_size, num_clusters, tasks_per_cluster)
    mnist = read_mnist(root)
    images = np.concatenate([mnist["train"][0], mnist["test"][0]])
    labels = np.concatenate([mnist["train"][1], mnist["test"][1]])
    y, ncls, rel = group_targets(labels, groups)
    return MultiTaskData.from_arrays(
        images.reshape(len(images), -1).astype(np.float32) / 255.0,
        y,
        "classification",
        num_classes=ncls,
        splits=_official_splits(labels, len(mnist["train"][1]), val_fraction, seed),
        relatedness=rel,
        name="grouped-mnist",
        description=f"Grouped-MNIST from {root}: {len(y)} digit-subset tasks",
    )


def load_multi_mnist(root: str | Path, seed: int = 0, *, val_fraction: float = 0.1) -> MultiTaskData:
    """SIMO, 2 tasks of 10 classes: MultiMNIST, two overlapping MNIST digits in a 36x36 frame.

    Reads the four MNIST idx files as :func:`load_grouped_mnist` does. Every image is paired
    with another of its own split through a fixed permutation (construction seed, not
    ``seed``); the first digit goes at an offset of 0-4 pixels per axis from the top-left
    corner, the second at 4-8, and where they overlap the brighter pixel wins. Task ``first``
    is the top-left digit, ``second`` the bottom-right one. Inputs are ``[1, 36, 36]`` in
    [0, 1]. Pairs of MNIST's test images are the test split; ``val_fraction`` of the training
    pairs (stratified by ``first``, seeded) becomes val.
    """
    _check_fractions(val_fraction, 0.0)
    mnist = read_mnist(root)
    rng = np.random.default_rng(_MULTI_SEED)
    frames, first, second = [], [], []
    for split in ("train", "test"):
        images, labels = mnist[split]
        n = len(labels)
        partner = rng.permutation(n)
        near, far = rng.integers(0, 5, size=(n, 2)), rng.integers(4, 9, size=(n, 2))
        frames.append(overlay_pairs(images.astype(np.float32) / 255.0, partner, near, far, MULTI_FRAME))
        first.append(labels)
        second.append(labels[partner])
    x = np.concatenate(frames)[:, None]
    y = {"first": np.concatenate(first), "second": np.concatenate(second)}
    return MultiTaskData.from_arrays(
        x,
        y,
        "classification",
        num_classes=10,
        splits=_official_splits(y["first"], len(first[0]), val_fraction, seed),
        name="multi-mnist",
        class_names=[str(d) for d in range(10)],
        description=f"MultiMNIST from {root}: pairs in a 36x36 frame",
    )
