"""Dense prediction benchmarks: NYUv2 and CityScapes in the preprocessed ``.npy`` layout of MTAN and LibMTL.

Both are SIMO: one image per sample and, per task, one target **per pixel**. That does not fit
:class:`~pyromtl.data.MultiTaskData`, whose targets are one number per sample and task, so these
datasets come in their own container, :class:`DenseTaskData`. For the same reason they are not
in the :mod:`pyromtl.datasets` catalogue (its builders return ``MultiTaskData``, and ``pyromtl
list datasets`` does not show them): :data:`DENSE_DATASETS` maps their names to the loaders.

The layout is the one MTAN (Liu, Johns, Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019) published and LibMTL reuses; ``<i>`` numbers the samples of a split:

* **NYUv2** (:func:`load_nyuv2`): ``<root>/{train,val}/image/<i>.npy`` RGB ``[288, 384, 3]``,
  ``label/<i>.npy`` ``[288, 384]`` (13 classes, −1 unlabelled), ``depth/<i>.npy``
  ``[288, 384, 1]`` (0: no reading) and ``normal/<i>.npy`` ``[288, 384, 3]`` (a zero vector:
  no normal); 795 train and 654 val images.
* **CityScapes** (:func:`load_cityscapes`): ``<root>/{train,val}/image/<i>.npy``
  ``[128, 256, 3]``, ``depth/<i>.npy`` ``[128, 256, 1]`` and labels (−1 ignored): MTAN's
  release has ``label_7/`` (7 classes) and ``label_19/`` (19 classes), LibMTL's
  ``cityscapes2`` has ``label/`` (7 classes); 2975 train and 500 val images.

Sizes are checked against each other (every file of a sample, every sample of both splits),
not against the numbers above, so resized copies and the tiny fakes of :func:`write_fake` load
too. Targets are converted to channels-first tensors: images ``[N, 3, H, W]`` float32,
``segmentation`` ``[N, H, W]`` int64 (:data:`~pyromtl.data.constants.IGNORE_INDEX` = −1 for
unlabelled pixels), ``depth`` ``[N, 1, H, W]`` and ``normal`` ``[N, 3, H, W]`` float32.

Splits: the releases ship train and val only. The given **val becomes the test split** (the
papers report on it), and ``val_fraction`` of the given train images, drawn at random with
``seed``, becomes **val** for model selection; the rest is train.

Everything is read into memory (float32): the full NYUv2 takes about 4.5 GB with normals,
CityScapes about 2 GB; ``limit`` reads only the first images of each split.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from pyromtl.data.constants import IGNORE_INDEX, SPLITS
from pyromtl.data.loaders import _check_fractions, _require_dir

__all__ = [
    "CITYSCAPES_LABEL_DIRS",
    "CITYSCAPES_TASKS",
    "DENSE_DATASETS",
    "NYUV2_CLASSES",
    "NYUV2_TASKS",
    "TARGET_CHANNELS",
    "DenseTaskData",
    "load_cityscapes",
    "load_nyuv2",
    "write_fake",
]

#: Channels of each dense task's target; ``None``: a label map ``[N, H, W]`` (no channel dim).
TARGET_CHANNELS: dict[str, int | None] = {"segmentation": None, "depth": 1, "normal": 3}
#: Folder of each task's files, where it does not depend on the release.
TASK_FOLDERS = {"depth": "depth", "normal": "normal"}
NYUV2_TASKS: tuple[str, ...] = ("segmentation", "depth", "normal")
NYUV2_CLASSES = 13
CITYSCAPES_TASKS: tuple[str, ...] = ("segmentation", "depth")
#: Label folders of CityScapes by class count, in the order they are looked for (MTAN's, then LibMTL's).
CITYSCAPES_LABEL_DIRS: dict[int, tuple[str, ...]] = {7: ("label_7", "label"), 19: ("label_19",)}

_NUMBERED = re.compile(r"[0-9]+")


# ---------------------------------------------------------------------------- container
@dataclass
class DenseTaskData:
    """A SIMO dense-prediction dataset: images, one per-pixel target per task, and splits.

    * ``images``: ``[N, C, H, W]`` float (RGB: ``C = 3``);
    * ``targets``: task name → target, ``segmentation`` ``[N, H, W]`` int64 with ``-1`` for
      unlabelled pixels, ``depth`` ``[N, 1, H, W]`` and ``normal`` ``[N, 3, H, W]`` float;
    * ``splits``: ``train``, ``val`` and ``test`` → int64 row indices (disjoint; one split
      shared by every task, as in SIMO :class:`~pyromtl.data.MultiTaskData`);
    * ``num_classes``: the segmentation task's class count (the dataset's, even when
      segmentation is not loaded).

    The structure is checked on construction (``ValueError`` naming the problem); the pixel
    values are the loaders' to check.
    """

    name: str
    images: torch.Tensor
    targets: dict[str, torch.Tensor]
    splits: dict[str, torch.Tensor]
    num_classes: int
    description: str = ""

    def __post_init__(self) -> None:
        _check_structure(self)

    @property
    def task_names(self) -> list[str]:
        return list(self.targets)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return cast(tuple[int, int, int], tuple(self.images.shape[1:]))  # [N, C, H, W], checked on construction

    def split(self, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images and targets of every row of ``split`` (copies, in row order)."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; use one of {list(self.splits)}")
        return self._rows(self.splits[split])

    def batch(
        self, split: str, size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``min(size, rows)`` random rows of ``split`` without replacement (drawn with ``generator``)."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; use one of {list(self.splits)}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"batch size must be a positive integer, got {size!r}")
        rows = self.splits[split]
        if len(rows) == 0:
            raise ValueError(f"{self.name}: the {split} split is empty")
        return self._rows(rows[torch.randperm(len(rows), generator=generator, device=rows.device)[:size]])

    def summary(self) -> str:
        """One line: the name, image size, tasks and split sizes."""
        sizes = " / ".join(str(len(self.splits[s])) for s in SPLITS)
        c, h, w = self.image_shape
        return (
            f"{self.name}: {c}×{h}×{w} images, tasks {', '.join(self.task_names)} "
            f"({self.num_classes} classes), train / val / test {sizes}"
        )

    def _rows(self, index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.images[index], {task: target[index] for task, target in self.targets.items()}


def _check_structure(data: DenseTaskData) -> None:
    """Shapes, dtypes, label range and splits of a :class:`DenseTaskData`, or ``ValueError``."""
    images = data.images
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{data.name}: images must be a float tensor [N, C, H, W], got {got}")
    n, _, h, w = images.shape
    if not data.targets:
        raise ValueError(f"{data.name}: no targets")
    for task, target in data.targets.items():
        if task not in TARGET_CHANNELS:
            raise ValueError(f"{data.name}: unknown dense task {task!r}; use one of {list(TARGET_CHANNELS)}")
        channels = TARGET_CHANNELS[task]
        want = (n, h, w) if channels is None else (n, channels, h, w)
        if not isinstance(target, torch.Tensor) or tuple(target.shape) != want:
            found = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
            raise ValueError(f"{data.name}: {task} targets must be shaped {list(want)}, got {found}")
        if channels is None:
            if target.dtype != torch.int64:
                raise ValueError(f"{data.name}: {task} targets must be int64 labels, got {target.dtype}")
            if target.numel() and (target.min() < IGNORE_INDEX or target.max() >= data.num_classes):
                raise ValueError(
                    f"{data.name}: {task} labels must be {IGNORE_INDEX} (ignored) or in "
                    f"[0, {data.num_classes}), found {int(target.min())}..{int(target.max())}"
                )
        elif not target.is_floating_point():
            raise ValueError(f"{data.name}: {task} targets must be float, got {target.dtype}")
    if set(data.splits) != set(SPLITS):
        raise ValueError(f"{data.name}: splits must be exactly {list(SPLITS)}, got {sorted(data.splits)}")
    rows = torch.cat([data.splits[s] for s in SPLITS])
    if rows.dtype != torch.int64 or rows.dim() != 1:
        raise ValueError(f"{data.name}: split indices must be 1-d int64 tensors")
    if rows.numel() and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"{data.name}: split indices must lie in [0, {n})")
    if len(rows.unique()) != len(rows):
        raise ValueError(f"{data.name}: the splits overlap")


# ---------------------------------------------------------------------------- reading
def _numbered_files(folder: Path) -> dict[int, Path]:
    """The ``<i>.npy`` files of ``folder`` by ``i``; a missing folder or another ``.npy`` name raises."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    files: dict[int, Path] = {}
    for path in folder.glob("*.npy"):
        if not _NUMBERED.fullmatch(path.stem):
            raise ValueError(f"{path}: expected files named <i>.npy (i = 0, 1, ...)")
        i = int(path.stem)
        if i in files:
            raise ValueError(f"{path}: the same number as {files[i].name}")
        files[i] = path
    return files


def _names(indices: Sequence[int]) -> str:
    shown = ", ".join(f"{i}.npy" for i in indices[:3])
    return shown + (f" ... ({len(indices)} files)" if len(indices) > 3 else "")


def _matched_indices(split_dir: Path, folders: Sequence[str]) -> list[int]:
    """The sample numbers of one split, after checking that every folder holds the same ``<i>.npy`` set."""
    image = _numbered_files(split_dir / "image")
    if not image:
        raise ValueError(f"{split_dir / 'image'}: no <i>.npy files")
    for folder in folders:
        other = _numbered_files(split_dir / folder)
        missing, extra = sorted(image.keys() - other.keys()), sorted(other.keys() - image.keys())
        if missing or extra:
            problems = [f"{kind} {_names(found)}" for kind, found in (("missing", missing), ("extra", extra)) if found]
            raise ValueError(
                f"{split_dir / folder}: its files do not match {split_dir / 'image'}: " + "; ".join(problems)
            )
    return sorted(image)


def _read_npy(path: Path, shape: tuple[int, ...], what: str) -> np.ndarray:
    """One array of ``shape`` with finite real values, or ``ValueError`` naming ``path``."""
    try:
        arr = np.load(path, allow_pickle=False)  # no pickles: a crafted file cannot run code
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read the .npy file ({err})") from None
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{path}: {what} must hold real numbers, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{path}: {what} must be shaped {list(shape)}, got {list(arr.shape)}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = "NaN" if np.isnan(arr).any() else "inf"
        raise ValueError(f"{path}: {what} contains {bad} values")
    return arr


def _check_labels(arr: np.ndarray, path: Path, num_classes: int) -> None:
    if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
        raise ValueError(f"{path}: segmentation labels must be integers ({IGNORE_INDEX} for ignored pixels)")
    bad = (arr != IGNORE_INDEX) & ((arr < 0) | (arr >= num_classes))
    if bad.any():
        raise ValueError(
            f"{path}: label {arr[bad].flat[0]:g} out of range: expected {IGNORE_INDEX} (ignored) "
            f"or 0..{num_classes - 1}"
        )


def _image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of the first image, which every other file must share."""
    try:
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read the .npy file ({err})") from None
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"{path}: image must be shaped [H, W, 3] (RGB, channels last), got {list(shape)}")
    return shape[0], shape[1]


def _fill(
    split_dir: Path,
    indices: list[int],
    folders: dict[str, str],
    num_classes: int,
    images: np.ndarray,
    targets: dict[str, np.ndarray],
    offset: int,
) -> None:
    """Read one split's files into rows ``offset, offset + 1, ...`` of the preallocated arrays."""
    h, w = images.shape[2:]
    for row, i in enumerate(indices, start=offset):  # data preparation, once per load
        image = _read_npy(split_dir / "image" / f"{i}.npy", (h, w, 3), "image")
        images[row] = image.transpose(2, 0, 1)  # HWC -> CHW
        for task, folder in folders.items():
            path = split_dir / folder / f"{i}.npy"
            channels = TARGET_CHANNELS[task]
            arr = _read_npy(path, (h, w) if channels is None else (h, w, channels), task)
            if task == "segmentation":
                _check_labels(arr, path, num_classes)
                targets[task][row] = arr
            else:
                if task == "depth" and (arr < 0).any():
                    raise ValueError(f"{path}: depth must be >= 0 (0 marks a missing reading), found {arr.min():g}")
                targets[task][row] = arr.transpose(2, 0, 1)


def _check_tasks(tasks: Sequence[str], allowed: Sequence[str], title: str) -> list[str]:
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise ValueError(f"{title}: tasks must be a non-empty sequence of names from {list(allowed)}, got {tasks!r}")
    unknown = [t for t in tasks if t not in allowed]
    if unknown:
        raise ValueError(f"{title}: unknown task(s) {unknown}; use some of {list(allowed)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"{title}: tasks repeat: {list(tasks)}")
    return list(tasks)


def _carve_val(n_train: int, val_fraction: float, seed: int, title: str) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` row indices: ``round(val_fraction · n)`` (at least one) train images drawn with ``seed``."""
    if val_fraction == 0:
        return np.arange(n_train), np.zeros(0, dtype=np.int64)
    n_val = max(1, round(val_fraction * n_train))
    if n_val >= n_train:
        raise ValueError(
            f"{title}: {n_train} train image(s) cannot give {n_val} to val and keep one for "
            f"training (val_fraction = {val_fraction})"
        )
    order = np.random.default_rng(seed).permutation(n_train)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _load(
    root: str | Path,
    name: str,
    title: str,
    folders: dict[str, str],
    num_classes: int,
    limit: int | None,
    seed: int,
    val_fraction: float,
) -> DenseTaskData:
    """Read ``<root>/{train,val}`` with the task folders ``folders`` (task → folder)."""
    root = _require_dir(root, title)
    _check_fractions(val_fraction, 0.0)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    given = {}
    for split in ("train", "val"):
        indices = _matched_indices(root / split, list(folders.values()))
        given[split] = indices[:limit]
    n_train, n = len(given["train"]), len(given["train"]) + len(given["val"])
    h, w = _image_size(root / "train" / "image" / f"{given['train'][0]}.npy")
    images = np.empty((n, 3, h, w), dtype=np.float32)
    targets: dict[str, np.ndarray] = {
        task: np.empty(
            (n, h, w) if TARGET_CHANNELS[task] is None else (n, TARGET_CHANNELS[task], h, w),
            dtype=np.int64 if TARGET_CHANNELS[task] is None else np.float32,
        )
        for task in folders
    }
    _fill(root / "train", given["train"], folders, num_classes, images, targets, 0)
    _fill(root / "val", given["val"], folders, num_classes, images, targets, n_train)
    train, val = _carve_val(n_train, val_fraction, seed, title)
    splits = {"train": train, "val": val, "test": np.arange(n_train, n)}
    return DenseTaskData(
        name=name,
        images=torch.from_numpy(images),
        targets={task: torch.from_numpy(t) for task, t in targets.items()},
        splits={s: torch.from_numpy(np.asarray(v, dtype=np.int64)) for s, v in splits.items()},
        num_classes=num_classes,
        description=(
            f"{title} from {root}: {n_train} given train and {n - n_train} given val images at {h}×{w}; "
            f"the given val is the test split, {len(val)} of the train images (seed {seed}) are val"
        ),
    )


# ---------------------------------------------------------------------------- loaders
def load_nyuv2(
    root: str | Path,
    seed: int = 0,
    *,
    tasks: Sequence[str] = NYUV2_TASKS,
    limit: int | None = None,
    val_fraction: float = 0.1,
) -> DenseTaskData:
    """SIMO dense, 3 tasks: NYUv2's 13-class segmentation, depth and surface normals (MTAN's preprocessed files).

    Reads ``<root>/train`` and ``<root>/val``, each with ``image/``, ``label/``, ``depth/``
    and ``normal/`` folders of ``<i>.npy`` files shaped ``[H, W, 3]``, ``[H, W]``,
    ``[H, W, 1]`` and ``[H, W, 3]`` (``288 × 384`` in the release); only the folders of
    ``tasks`` are needed. Labels are 0-12, or -1 for unlabelled pixels; depth 0 marks a missing
    reading and a zero normal a missing normal (the metrics skip both).

    Splits: the given val is the **test** split; ``val_fraction`` of the given train images
    (at least one), drawn with ``seed``, is val. ``limit`` reads only the ``limit``
    lowest-numbered images of each of train and val (quick runs; ``None``: all).

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` naming the file for a
    mismatched file set, an unreadable file, a wrong shape, a NaN or inf, a negative depth or a
    label out of range.
    """
    tasks = _check_tasks(tasks, NYUV2_TASKS, "NYUv2")
    folders = {task: "label" if task == "segmentation" else TASK_FOLDERS[task] for task in tasks}
    return _load(root, "nyuv2", "NYUv2", folders, NYUV2_CLASSES, limit, seed, val_fraction)


def load_cityscapes(
    root: str | Path,
    seed: int = 0,
    *,
    tasks: Sequence[str] = CITYSCAPES_TASKS,
    num_classes: int = 7,
    limit: int | None = None,
    val_fraction: float = 0.1,
) -> DenseTaskData:
    """SIMO dense, 2 tasks: CityScapes' 7- or 19-class segmentation and depth (MTAN's or LibMTL's preprocessed files).

    Reads ``<root>/train`` and ``<root>/val``, each with ``image/`` (``[H, W, 3]``),
    ``depth/`` (``[H, W, 1]``) and a label folder (``[H, W]``, -1 for ignored pixels) of
    ``<i>.npy`` files (``128 × 256`` in the releases). The label folder depends on the release
    and ``num_classes``: 7 classes are read from ``label_7/`` (MTAN) or, failing that,
    ``label/`` (LibMTL's ``cityscapes2``); 19 classes from ``label_19/`` (MTAN only). Depth 0
    marks a missing reading (the metrics skip it).

    Splits, ``limit`` and errors are as in :func:`load_nyuv2`: the given val is the **test**
    split and ``val_fraction`` of train, drawn with ``seed``, is val.
    """
    tasks = _check_tasks(tasks, CITYSCAPES_TASKS, "CityScapes")
    if num_classes not in CITYSCAPES_LABEL_DIRS:
        raise ValueError(f"CityScapes: num_classes must be one of {list(CITYSCAPES_LABEL_DIRS)}, got {num_classes!r}")
    folders = {
        task: _cityscapes_labels(root, num_classes) if task == "segmentation" else TASK_FOLDERS[task] for task in tasks
    }
    return _load(root, "cityscapes", "CityScapes", folders, num_classes, limit, seed, val_fraction)


def _cityscapes_labels(root: str | Path, num_classes: int) -> str:
    """The folder of ``num_classes``-class labels in this release: the first of :data:`CITYSCAPES_LABEL_DIRS` found."""
    candidates = CITYSCAPES_LABEL_DIRS[num_classes]
    train = _require_dir(root, "CityScapes") / "train"
    found = next((c for c in candidates if (train / c).is_dir()), None)
    if found is None:
        raise FileNotFoundError(f"{train}: no {num_classes}-class label folder ({' or '.join(candidates)}) found")
    return found


#: Names → loaders ``(root, seed=0, **options) -> DenseTaskData`` (outside :mod:`pyromtl.datasets`: see above).
DENSE_DATASETS: dict[str, Callable[..., DenseTaskData]] = {"nyuv2": load_nyuv2, "cityscapes": load_cityscapes}


# ---------------------------------------------------------------------------- fakes
def write_fake(
    root: str | Path, name: str, *, n_train: int = 6, n_val: int = 3, size: tuple[int, int] = (16, 24), seed: int = 0
) -> Path:
    """Write a tiny random stand-in for ``name`` (``nyuv2`` or ``cityscapes``) in its layout under ``root``.

    For tests and demos without the real data. The targets are pixel-wise functions of the
    image, so a small network can learn them: the class is the red value cut into equal bins,
    depth is ``1 + 4 · green`` and the normal points along ``(2r − 1, 2g − 1, 1)``; about 10%
    of the pixels of every target are marked missing (label -1, depth 0, zero normal).
    CityScapes gets both ``label_7/`` and ``label_19/`` (MTAN's release). Returns ``root``.
    """
    if name not in DENSE_DATASETS:
        raise ValueError(f"unknown dense dataset {name!r}; use one of {list(DENSE_DATASETS)}")
    root = Path(root).expanduser()
    rng = np.random.default_rng(seed)
    h, w = size
    labels = {"label": NYUV2_CLASSES} if name == "nyuv2" else {"label_7": 7, "label_19": 19}
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            image = rng.random((h, w, 3), dtype=np.float32)
            red, green = image[..., 0], image[..., 1]
            files = {"image": image, "depth": (1 + 4 * green)[..., None]}
            for folder, classes in labels.items():
                files[folder] = np.minimum(np.floor(red * classes), classes - 1)
            if name == "nyuv2":
                normal = np.stack([2 * red - 1, 2 * green - 1, np.ones_like(red)], axis=-1)
                files["normal"] = normal / np.linalg.norm(normal, axis=-1, keepdims=True)
            for folder, arr in files.items():
                if folder != "image":
                    arr[rng.random((h, w)) < 0.1] = IGNORE_INDEX if folder.startswith("label") else 0
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                np.save(root / split / folder / f"{i}.npy", arr.astype(np.float32))
    return root
