"""ChestX-ray14 (NIH): 14 binary findings per frontal chest X-ray, from the CSV and the image folders."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pyromtl.data.constants import SPLITS
from pyromtl.data.core import MultiTaskData
from pyromtl.data.images import check_size, read_images
from pyromtl.data.loaders import _check_fractions, _require_dir

CSV_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
SPLIT_LISTS = ("train_val_list.txt", "test_list.txt")


def _read_entries(path: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Image names, finding indicators ``[N, 14]`` and patient ids from the CSV."""
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"Image Index", "Finding Labels", "Patient ID"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns {sorted(need)}, found {reader.fieldnames}")
        images, labels, patients = [], [], []
        for lineno, row in enumerate(reader, start=2):
            found = [f.strip() for f in (row["Finding Labels"] or "").split("|")]
            unknown = [f for f in found if f not in FINDINGS and f != NO_FINDING]
            if unknown or not found:
                raise ValueError(
                    f"{path}:{lineno}: unknown finding {unknown or found!r}; expected {NO_FINDING!r} "
                    f"or '|'-separated names from {list(FINDINGS)}"
                )
            images.append(row["Image Index"].strip())
            labels.append([f in found for f in FINDINGS])
            patients.append(row["Patient ID"].strip())
    if not images:
        raise ValueError(f"{path}: no entries")
    return images, np.asarray(labels, dtype=np.int64), patients


def _image_index(root: Path) -> dict[str, Path]:
    """Image name → path, from ``root/images`` and the release's ``root/images_*/images`` folders."""
    folders = [root / "images", *sorted(root.glob("images_*/images")), *sorted(root.glob("images_*"))]
    return {p.name: p for folder in folders if folder.is_dir() for p in folder.iterdir() if p.suffix == ".png"}


def _patient_holdout(patients: np.ndarray, rows: np.ndarray, fraction: float, rng) -> np.ndarray:
    """The rows of a random ``fraction`` of the patients in ``rows`` (a patient never spans two splits)."""
    ids = np.unique(patients[rows])
    held = set(rng.permutation(ids)[: round(fraction * len(ids))].tolist())
    return rows[np.isin(patients[rows], list(held))]


def load_chestxray14(
    root: str | Path, seed: int = 0, *, size: int = 64, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> MultiTaskData:
    """SIMO, 14 binary tasks: ChestX-ray14's findings (Atelectasis ... Hernia), one per task.

    Reads ``root/Data_Entry_2017.csv`` (or ``Data_Entry_2017_v2020.csv``), whose ``Finding
    Labels`` column holds ``|``-separated findings or ``No Finding``, and the PNG images it
    names, from ``root/images/`` or the release's ``root/images_001/images/`` ... folders. Every
    listed image must be present. Images are resized to ``size`` x ``size`` grey levels in
    [0, 1]. With the official ``train_val_list.txt`` and ``test_list.txt`` in ``root`` the test
    list is the test split; otherwise ``test_fraction`` of the patients is. ``val_fraction`` of
    the remaining patients becomes val. Splits are by patient (seeded), so no patient's images
    are in two splits.
    """
    root = _require_dir(root, "ChestX-ray14")
    size = check_size(size)
    _check_fractions(val_fraction, test_fraction)
    csv_path = next((root / n for n in CSV_NAMES if (root / n).is_file()), None)
    if csv_path is None:
        raise ValueError(f"{root}: ChestX-ray14 label file not found (expected {' or '.join(CSV_NAMES)})")
    images, labels, patients = _read_entries(csv_path)
    index = _image_index(root)
    missing = [name for name in images if name not in index]
    if missing:
        raise ValueError(
            f"{root}: {len(missing)} image(s) listed in {csv_path.name} not found under images/ or "
            f"images_*/images/, e.g. {missing[0]!r}"
        )
    pid = np.asarray(patients)
    rng = np.random.default_rng(seed)
    rows = np.arange(len(images))
    lists = [root / n for n in SPLIT_LISTS]
    official = [p.is_file() for p in lists]
    if all(official):
        listed = [set(p.read_text().split()) for p in lists]
        position = {name: i for i, name in enumerate(images)}
        unknown = [n for names in listed for n in names if n not in position]
        if unknown:
            raise ValueError(f"{root}: {unknown[0]!r} in the split lists is not in {csv_path.name}")
        test = np.sort([position[n] for n in listed[1]]).astype(np.int64)
        train = np.sort([position[n] for n in listed[0]]).astype(np.int64)
    elif any(official):
        raise ValueError(f"{root}: found only one of {list(SPLIT_LISTS)}; give both or neither")
    else:
        test = _patient_holdout(pid, rows, test_fraction, rng)
        train = np.setdiff1d(rows, test)
    val = _patient_holdout(pid, train, val_fraction, rng)
    splits = {"train": np.setdiff1d(train, val), "val": val, "test": test}
    x, _ = read_images([index[n] for n in images], size, channels=1)
    return MultiTaskData.from_arrays(
        x,
        {f: labels[:, k] for k, f in enumerate(FINDINGS)},
        "binary",
        name="chestxray14",
        splits={s: splits[s] for s in SPLITS},
        description=f"ChestX-ray14 from {root}: {len(images)} images at {size}x{size}, 14 findings",
    )
