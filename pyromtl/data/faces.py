"""Face benchmarks with attributes in their file names or annotation lists: UTKFace and MTFL."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from pyromtl.data.constants import SPLITS
from pyromtl.data.core import MultiTaskData
from pyromtl.data.images import check_size, read_images
from pyromtl.data.loaders import _carve_splits, _check_fractions, _require_dir

#: ``age_gender_race_date...``: UTKFace's naming, e.g. ``25_1_2_20170116174525125.jpg.chip.jpg``.
UTK_NAME = re.compile(r"^(\d{1,3})_([01])_([0-4])_(\d+)[^/]*\.jpg$", re.IGNORECASE)
UTK_RACES = ("white", "black", "asian", "indian", "others")


def load_utkface(
    root: str | Path, seed: int = 0, *, size: int = 32, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> MultiTaskData:
    """SIMO, 3 tasks: UTKFace's age (regression), gender (binary) and race (5 classes).

    Reads every ``*.jpg`` under ``root`` (subfolders included) named
    ``<age>_<gender>_<race>_<date>...jpg``: age in years, gender 0 (male) or 1 (female), race
    0-4 (white, black, asian, indian, others). Files whose names do not follow this pattern (the
    release has a few without a race field) are **skipped**: a warning gives their count and
    first names, and so does the description. Images are resized to ``size`` x ``size`` RGB in
    [0, 1]. There is no official split: ``test_fraction``, then ``val_fraction``, is drawn
    stratified by race with ``seed``. Age is standardised on train (``target_stats``).
    """
    root = _require_dir(root, "UTKFace")
    size = check_size(size)
    _check_fractions(val_fraction, test_fraction)
    paths, labels, skipped = [], [], []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix.lower() != ".jpg":
            continue
        match = UTK_NAME.match(path.name)
        if match is None:
            skipped.append(path.name)
            continue
        paths.append(path)
        labels.append([int(g) for g in match.groups()[:3]])
    if not paths:
        raise ValueError(
            f"{root}: no UTKFace images named <age>_<gender>_<race>_<date>.jpg found"
            + (f" ({len(skipped)} other .jpg files, e.g. {skipped[0]!r})" if skipped else "")
        )
    note = ""
    if skipped:
        note = f"; skipped {len(skipped)} file(s) not named <age>_<gender>_<race>_<date>.jpg"
        warnings.warn(f"{root}: {note[2:]}, e.g. {skipped[:3]}", stacklevel=2)
    x, _ = read_images(paths, size)
    age, gender, race = np.asarray(labels, dtype=np.int64).T
    given = {"train": np.arange(len(paths))}
    splits = _carve_splits(race, given, val_fraction, test_fraction, np.random.default_rng(seed))
    return MultiTaskData.from_arrays(
        x,
        {"age": age.astype(np.float64), "gender": gender, "race": race},
        ["regression", "binary", "classification"],
        num_classes=[None, None, 5],
        splits={s: splits[s] for s in SPLITS},
        name="utkface",
        class_names=list(UTK_RACES),
        description=f"UTKFace from {root}: {len(paths)} faces at {size}x{size}{note}",
    )


MTFL_FILES = ("training.txt", "testing.txt")
MTFL_LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
MTFL_POSES = ("left_profile", "left", "frontal", "right", "right_profile")


def _read_mtfl_list(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Image paths, landmarks ``[N, 10]`` (x1..x5, y1..y5) and attributes ``[N, 4]`` of one list."""
    images, points, attrs = [], [], []
    with path.open() as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 15:
                raise ValueError(
                    f"{path}:{lineno}: expected an image path, 10 landmark coordinates and 4 "
                    f"attributes (15 fields), got {len(parts)}"
                )
            try:
                xy = [float(v) for v in parts[1:11]]
                codes = [int(v) for v in parts[11:]]
            except ValueError:
                raise ValueError(f"{path}:{lineno}: landmarks must be numbers and attributes integers") from None
            if not all(c in (1, 2) for c in codes[:3]) or not 1 <= codes[3] <= 5:
                raise ValueError(f"{path}:{lineno}: gender, smile and glasses must be 1 or 2 and pose 1-5, got {codes}")
            images.append(parts[0].replace("\\", "/"))  # the lists were written on Windows
            points.append(xy)
            attrs.append(codes)
    if not images:
        raise ValueError(f"{path}: no entries")
    return images, np.asarray(points), np.asarray(attrs, dtype=np.int64)


def load_mtfl(
    root: str | Path, seed: int = 0, *, size: int = 40, landmarks: bool = False, val_fraction: float = 0.1
) -> MultiTaskData:
    """SIMO, 4 tasks: MTFL's male, smiling, glasses (binary) and head pose (5 classes).

    Reads ``root/training.txt`` and ``root/testing.txt``, whose lines are
    ``<image path> x1..x5 y1..y5 gender smile glasses pose`` (landmarks in pixels: left eye,
    right eye, nose, left and right mouth corner; gender 1 male / 2 female, smile and glasses
    1 yes / 2 no, pose 1-5 from left profile to right profile), and the images they name,
    relative to ``root`` (backslashes are read as folder separators). Images are resized to
    ``size`` x ``size`` RGB. ``landmarks=True`` adds 10 regression tasks (``left_eye_x`` ...
    ``mouth_right_y``): each coordinate as a fraction of the image's width or height, so it
    survives the resize. ``testing.txt`` is the test split; ``val_fraction`` of training.txt
    (stratified by pose, seeded) becomes val.
    """
    root = _require_dir(root, "MTFL")
    size = check_size(size)
    _check_fractions(val_fraction, 0.0)
    lists = []
    for name in MTFL_FILES:
        if not (root / name).is_file():
            raise ValueError(f"{root / name}: MTFL annotation file not found (expected {' and '.join(MTFL_FILES)})")
        lists.append(_read_mtfl_list(root / name))
    images = lists[0][0] + lists[1][0]
    paths = [root / image for image in images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"{missing[0]}: image listed in an MTFL annotation file not found ({len(missing)} missing)")
    x, sizes = read_images(paths, size)
    points = np.concatenate([lists[0][1], lists[1][1]])
    attrs = np.concatenate([lists[0][2], lists[1][2]])
    y: dict[str, np.ndarray] = {
        "male": (attrs[:, 0] == 1).astype(np.int64),
        "smiling": (attrs[:, 1] == 1).astype(np.int64),
        "glasses": (attrs[:, 2] == 1).astype(np.int64),
        "pose": attrs[:, 3] - 1,
    }
    types = ["binary", "binary", "binary", "classification"]
    if landmarks:
        for axis, column in (("x", 0), ("y", 1)):
            for k, part in enumerate(MTFL_LANDMARKS):
                y[f"{part}_{axis}"] = points[:, 5 * column + k] / sizes[:, column]
        types += ["regression"] * 10
    n_train = len(lists[0][0])
    given = {"train": np.arange(n_train), "test": np.arange(n_train, len(images))}
    splits = _carve_splits(y["pose"], given, val_fraction, 0.0, np.random.default_rng(seed))
    return MultiTaskData.from_arrays(
        x,
        y,
        types,
        num_classes=[None, None, None, 5] + [None] * (len(types) - 4),
        splits={s: splits[s] for s in SPLITS},
        name="mtfl",
        description=f"MTFL from {root}: {len(images)} faces at {size}x{size}",
    )
