"""CIFAR-MTL: CIFAR-100's python-format files as 20 one-vs-rest tasks over the coarse labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pyromtl.data.constants import SPLITS
from pyromtl.data.core import MultiTaskData
from pyromtl.data.loaders import _carve_splits, _check_fractions, _require_dir
from pyromtl.data.safe_pickle import load_pickle

CIFAR_FILES = ("train", "test", "meta")
NUM_COARSE = 20


def _cifar_folder(root: Path) -> Path:
    """``root`` or its ``cifar-100-python`` subfolder, whichever holds the files."""
    for folder in (root, root / "cifar-100-python"):
        if (folder / "train").is_file():
            return folder
    return root


def _field(table, key: str, path: Path):
    """``table[key]``, with keys as bytes (Python 2 pickles) or str; ``ValueError`` when missing."""
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(table).__name__}")
    for k in (key.encode(), key):
        if k in table:
            return table[k]
    raise ValueError(f"{path}: missing field {key!r}; found {sorted(map(str, table))}")


def _read_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 3, 32, 32], coarse labels [N])`` of one CIFAR-100 split file."""
    table = load_pickle(path)
    data = np.asarray(_field(table, "data", path))
    coarse = np.asarray(_field(table, "coarse_labels", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    if coarse.shape != (data.shape[0],) or coarse.dtype.kind not in "iu":
        raise ValueError(f"{path}: 'coarse_labels' must be {data.shape[0]} integers, got {coarse.dtype} {coarse.shape}")
    if coarse.size and (coarse.min() < 0 or coarse.max() >= NUM_COARSE):
        raise ValueError(f"{path}: coarse label {int(coarse.max())} out of range [0, {NUM_COARSE})")
    return data.reshape(-1, 3, 32, 32), coarse.astype(np.int64)


def load_cifar_mtl(root: str | Path, seed: int = 0, *, val_fraction: float = 0.1) -> MultiTaskData:
    """SIMO, 20 binary tasks: CIFAR-100 images, one one-vs-rest task per coarse class (CIFAR-MTL).

    Reads CIFAR-100's python version from ``root`` (or ``root/cifar-100-python``): the pickled
    files ``train``, ``test`` and ``meta``. Task ``k`` is named after coarse label ``k`` in
    ``meta`` (e.g. ``aquatic_mammals``) and labels an image 1 if its coarse class is ``k``, so
    every task has 5% positives. Inputs are ``[3, 32, 32]`` in [0, 1]. The official test set is
    the test split; ``val_fraction`` of the training images (stratified by coarse class, seeded)
    becomes val. The files are unpickled with :func:`~pyromtl.data.safe_pickle.load_pickle`,
    which refuses anything but numpy arrays and plain data, so a crafted file cannot run code.
    """
    root = _cifar_folder(_require_dir(root, "CIFAR-100"))
    _check_fractions(val_fraction, 0.0)
    missing = [name for name in CIFAR_FILES if not (root / name).is_file()]
    if missing:
        raise ValueError(f"{root}: CIFAR-100 python files {missing} not found (expected train, test and meta)")
    names = [
        str(n.decode() if isinstance(n, bytes) else n)
        for n in _field(load_pickle(root / "meta"), "coarse_label_names", root / "meta")
    ]
    if len(names) != NUM_COARSE:
        raise ValueError(f"{root / 'meta'}: expected {NUM_COARSE} coarse label names, got {len(names)}")
    x_train, y_train = _read_split(root / "train")
    x_test, y_test = _read_split(root / "test")
    coarse = np.concatenate([y_train, y_test])
    n_train = len(y_train)
    given = {"train": np.arange(n_train), "test": np.arange(n_train, len(coarse))}
    splits = _carve_splits(coarse, given, val_fraction, 0.0, np.random.default_rng(seed))
    x = np.concatenate([x_train, x_test]).astype(np.float32) / 255.0
    y = {name: (coarse == k).astype(np.int64) for k, name in enumerate(names)}
    return MultiTaskData.from_arrays(
        x,
        y,
        "binary",
        name="cifar-mtl",
        splits={s: splits[s] for s in SPLITS},
        description=f"CIFAR-MTL from {root}: 20 one-vs-rest tasks over CIFAR-100's coarse classes",
    )
