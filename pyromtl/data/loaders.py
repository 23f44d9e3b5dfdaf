"""Loaders for the papers' benchmarks, from files the user already has (nothing is downloaded).

Every loader returns a MIMO :class:`~pyromtl.data.MultiTaskData` with one task per domain
(or per digit for Rotated MNIST) and train/val/test splits. Validation is always carved out
of the training data, stratified and seeded, so model selection never sees test data. The
few-shot training subsets are ``fraction=`` of each task's training split, stratified by
class (:meth:`MultiTaskData.with_fraction`); :data:`BENCHMARK_FRACTIONS` lists the papers'.

Formats
-------
* **Pre-extracted features** (VMTL's Office-Home, Office-Caltech, ImageCLEF, DomainNet):
  list files of ``<relative/image/path> <label>`` lines and one ``.npy`` vector per image;
  see :func:`load_feature_benchmark`.
* **One ``.npz`` per domain** with ``features``, ``labels`` and optionally ``split``;
  see :func:`load_npz_domains`.
* **Rotated MNIST** from the MNIST idx files; see :func:`load_rotated_mnist`.

:data:`BENCHMARKS` maps registry names to builders ``(root, seed=0, **options)``.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pyromtl.data.core import SPLITS, MultiTaskData

__all__ = [
    "BENCHMARKS",
    "BENCHMARK_DOMAINS",
    "BENCHMARK_FRACTIONS",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "load_domainnet",
    "load_feature_benchmark",
    "load_imageclef",
    "load_npz_domains",
    "load_office_caltech",
    "load_office_home",
    "load_rotated_mnist",
    "read_idx",
]

#: Domains (tasks) and class counts of the VMTL classification benchmarks.
BENCHMARK_DOMAINS: dict[str, tuple[tuple[str, ...], int]] = {
    "office-home": (("Art", "Clipart", "Product", "Real_World"), 65),
    "office-caltech": (("amazon", "caltech", "dslr", "webcam"), 10),
    # The VMTL paper (Sec. 4.1, Table 5) uses all four ImageCLEF-DA domains, Bing included.
    "imageclef": (("c", "i", "p", "b"), 12),
    "domainnet": (("clipart", "infograph", "painting", "quickdraw", "real", "sketch"), 345),
}

#: Training fractions of the papers' few-shot settings, per benchmark.
#: For Rotated MNIST the paper's 0.1% and 0.2% of its full rotated pool mean 6 and 12 samples
#: per task per angle; on :func:`load_rotated_mnist`'s default pool (600 training samples per
#: task) the same counts are 10% and 20%.
BENCHMARK_FRACTIONS: dict[str, tuple[float, ...]] = {
    "office-home": (0.05, 0.1, 0.2),
    "office-caltech": (0.05, 0.1, 0.2),
    "imageclef": (0.05, 0.1, 0.2),
    "domainnet": (0.01, 0.02, 0.04),
    "rotated-mnist": (0.1, 0.2),
}

LINE_FORMAT = "'<relative/path/to/image.jpg> <integer label>'"


# ---------------------------------------------------------------------------- splitting
def _stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of ``round(fraction * n)`` items, spread over classes in proportion.

    Every class keeps at least one item. Classes get ``floor(fraction * n_c)`` each and the
    remaining items go to the largest remainders (ties broken at random), so small few-shot
    lists still get a non-empty holdout.
    """
    if fraction <= 0 or labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = fraction * counts
    cap = counts - 1
    take = np.minimum(np.floor(quota).astype(np.int64), cap)
    extra = min(round(fraction * labels.size) - int(take.sum()), int((cap - take).sum()))
    if extra > 0:
        order = np.lexsort((rng.random(classes.size), -(quota - np.floor(quota))))
        order = order[take[order] < cap[order]][:extra]
        take[order] += 1
    picked = [rng.permutation(np.flatnonzero(inverse == c))[:k] for c, k in enumerate(take) if k > 0]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _carve_splits(
    labels: np.ndarray,
    given: dict[str, np.ndarray],
    val_fraction: float,
    test_fraction: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Complete one task's splits: a missing test, then a missing val, is carved from train.

    ``given`` holds index arrays into ``labels``; ``train`` is required, ``val`` and ``test``
    count as missing when absent or empty. Both fractions are of the given train entries, so
    ``0.1`` and ``0.2`` of one list leave 70% for training.
    """
    out = {s: np.asarray(given.get(s, np.zeros(0)), dtype=np.int64) for s in SPLITS}
    n_given = out["train"].size
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        if out[split].size == 0:
            train = out["train"]
            held = _stratified_holdout(labels[train], fraction * n_given / train.size, rng)
            out[split] = train[held]
            out["train"] = np.delete(train, held)
    return out


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction and test_fraction must be in [0, 1) and sum below 1, got {val_fraction} and {test_fraction}"
        )


def _require_dir(root: str | Path, what: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: {what} directory not found")
    return path


# ---------------------------------------------------------------------------- feature lists
def _read_list(path: Path, num_classes: int | None) -> tuple[list[str], np.ndarray, list[int]]:
    """Parse one list file into image paths, labels and line numbers (blank lines skipped)."""
    images: list[str] = []
    labels: list[int] = []
    lines: list[int] = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected {LINE_FORMAT}, got {line.strip()!r}")
            try:
                label = int(parts[1])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: label {parts[1]!r} is not an integer") from None
            if label < 0 or (num_classes is not None and label >= num_classes):
                bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
                raise ValueError(f"{path}:{lineno}: label {label} out of range (expected {bound})")
            images.append(parts[0])
            labels.append(label)
            lines.append(lineno)
    if not images:
        raise ValueError(f"{path}: no entries; expected lines {LINE_FORMAT}")
    return images, np.asarray(labels, dtype=np.int64), lines


def _feature_path(feature_root: Path, image: str, strip_prefix: str | None) -> str:
    """Where the ``.npy`` of a listed image lives (see :func:`load_feature_benchmark`).

    String operations rather than ``pathlib``: this runs once per image (DomainNet: ~600k).
    """
    if strip_prefix and strip_prefix in image:
        image = image.rpartition(strip_prefix)[2]
    return os.path.join(feature_root, os.path.splitext(image)[0] + ".npy")


def _npy_header(raw: bytes) -> tuple[bytes, np.dtype] | None:
    """The header bytes and dtype of a C-ordered version-1.0 ``.npy`` file, else ``None``."""
    buf = io.BytesIO(raw)
    if np.lib.format.read_magic(buf) != (1, 0):
        return None
    _, fortran_order, dtype = np.lib.format.read_array_header_1_0(buf)
    return None if fortran_order else (raw[: buf.tell()], dtype)


def _load_features(
    entries: list[tuple[Path, int, str]],
    feature_root: Path,
    strip_prefix: str | None,
    dim: int | None,
) -> np.ndarray:
    """Stack one ``.npy`` vector per ``(list file, line, image)`` entry into ``[N, D]`` float32.

    The output is allocated once (DomainNet has hundreds of thousands of vectors); ``dim``
    fixes ``D`` across domains, or ``None`` takes it from the first file.
    """
    out: np.ndarray | None = None
    first = ""
    header: tuple[bytes, np.dtype] | None = None
    for i, (list_file, lineno, image) in enumerate(entries):
        path = _feature_path(feature_root, image, strip_prefix)
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: feature file for {image!r} ({list_file}:{lineno}) not found; expected one .npy "
                f"vector per listed image at <feature_root>/<image path with .npy extension>"
            ) from None
        # A header identical to the first file's means the same dtype and shape: skip parsing it.
        if header is not None and out is not None:
            prefix, dtype = header
            if raw.startswith(prefix) and len(raw) == len(prefix) + out.shape[1] * dtype.itemsize:
                out[i] = np.frombuffer(raw, dtype=dtype, offset=len(prefix))
                continue
        try:
            vec = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:  # not an .npy file, truncated, or an object array
            raise ValueError(f"{path}: cannot read a numeric .npy array ({err})") from None
        if not np.issubdtype(vec.dtype, np.number):
            raise ValueError(f"{path}: expected a numeric feature vector, got dtype {vec.dtype}")
        if out is None:
            if dim is not None and vec.size != dim:
                raise ValueError(f"{path}: feature vector has {vec.size} values, expected {dim} (the other domains')")
            out = np.empty((len(entries), vec.size), dtype=np.float32)
            first = path
            header = _npy_header(raw)
        elif vec.size != out.shape[1]:
            raise ValueError(f"{path}: feature vector has {vec.size} values, expected {out.shape[1]} (as in {first})")
        out[i] = vec.reshape(-1)
    assert out is not None  # _read_list rejects empty lists
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        list_file, lineno, image = entries[int(np.argmin(finite))]
        path = _feature_path(feature_root, image, strip_prefix)
        raise ValueError(f"{path}: feature vector for {list_file}:{lineno} contains NaN or inf")
    return out


def _class_names(images: list[str], labels: np.ndarray, num_classes: int) -> list[str] | None:
    """Class names from the images' parent folders (``Art/Alarm_Clock/0001.jpg`` → ``Alarm_Clock``),
    when every label maps to exactly one folder name and the names are distinct; else ``None``."""
    folders: dict[int, set[str]] = {}
    for image, label in zip(images, labels.tolist()):
        folders.setdefault(label, set()).add(Path(image).parent.name)
    if len(folders) != num_classes or any(len(f) != 1 for f in folders.values()):
        return None
    names = [next(iter(folders[c])) for c in range(num_classes)]
    return names if len(set(names)) == num_classes and all(names) else None


def load_feature_benchmark(
    root: str | Path,
    domains: Sequence[str],
    *,
    feature_root: str | Path | None = None,
    split_pattern: str = "{domain}_{split}.txt",
    strip_prefix: str | None = None,
    num_classes: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    name: str = "feature-benchmark",
    description: str = "",
) -> MultiTaskData:
    """Load pre-extracted image features listed per domain: one classification task per domain.

    Layout (VMTL's released format, e.g. VGG-16 fc7 features)::

        root/
          Art_train.txt           # split_pattern.format(domain="Art", split="train")
          Art_val.txt             # optional
          Art_test.txt            # optional
          ...
        feature_root/             # defaults to root
          Art/Alarm_Clock/00001.npy
          ...

    * Every non-blank line of a list file is ``<relative/path/to/image.jpg> <label>``: the
      image path (no spaces) and an integer label in ``[0, num_classes)``.
    * The feature of an image is ``feature_root / <image path with its extension replaced by
      .npy>``: ``Art/Alarm_Clock/00001.jpg`` → ``feature_root/Art/Alarm_Clock/00001.npy``,
      holding one vector (any shape; it is flattened) of the same size for every image.
      Absolute image paths are used as they are. ``strip_prefix`` first drops everything up
      to and including its last occurrence in the path, e.g. ``strip_prefix="office-home/"``
      maps VMTL's ``/data/office-home/Art/x.jpg`` to ``feature_root/Art/x.npy``.
    * ``split_pattern`` names the list files; ``{split}`` is ``train``, ``val`` or ``test``.
      The train list is required. Without a test list, a stratified ``test_fraction`` of the
      train list is held out; without a val list, a further ``val_fraction`` of it becomes
      val (both stratified by class, seeded, and every class keeps a training sample). A pattern
      without ``{split}`` (e.g. ``"{domain}_list.txt"``) names one list per domain that is split
      this way. VMTL's own
      few-shot lists fit as ``split_pattern="{domain}/{split}_5.txt"`` with ``fraction=None``.

    ``num_classes`` defaults to the largest label + 1 over all domains. ``fraction`` keeps that
    share of each domain's training split, stratified by class, with ``seed``
    (:meth:`MultiTaskData.with_fraction`). Class names are taken from the images' parent
    folders when those match the labels one to one.

    Raises ``FileNotFoundError`` for a missing directory, list or feature file, and
    ``ValueError`` for a malformed line (``file:line``), an out-of-range label, or a feature
    vector of the wrong size (naming the file).
    """
    root = _require_dir(root, "benchmark root")
    feature_root = _require_dir(feature_root, "feature root") if feature_root is not None else root
    _check_fractions(val_fraction, test_fraction)
    domains = list(domains)
    if not domains:
        raise ValueError("domains: give at least one domain")
    rng = np.random.default_rng(seed)
    per_split = "{split}" in split_pattern

    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    splits: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    all_images: list[str] = []
    dim: int | None = None
    for domain in domains:
        lists = {s: root / split_pattern.format(domain=domain, split=s) for s in (SPLITS if per_split else ("train",))}
        if not lists["train"].is_file():
            found = sorted(p.name for p in root.glob("*.txt"))[:8]
            raise FileNotFoundError(
                f"{lists['train']}: list file for domain {domain!r} not found (split_pattern={split_pattern!r} under "
                f"{root}); expected lines {LINE_FORMAT}" + (f"; .txt files there: {found}" if found else "")
            )
        entries: list[tuple[Path, int, str]] = []
        labels: list[np.ndarray] = []
        given: dict[str, np.ndarray] = {}
        for split, path in lists.items():
            if not path.is_file():
                continue
            images, lab, lines = _read_list(path, num_classes)
            given[split] = np.arange(len(entries), len(entries) + len(images))
            entries.extend((path, line, image) for line, image in zip(lines, images))
            labels.append(lab)
            all_images.extend(images)
        x = _load_features(entries, feature_root, strip_prefix, dim)
        dim = x.shape[1]
        y = np.concatenate(labels)
        for split, idx in _carve_splits(y, given, val_fraction, test_fraction, rng).items():
            splits[split].append(idx)
        xs.append(x)
        ys.append(y)

    ncls = num_classes if num_classes is not None else max(int(y.max()) for y in ys) + 1
    data = MultiTaskData.from_arrays(
        xs,
        ys,
        "classification",
        domains,
        num_classes=ncls,
        splits=splits,
        name=name,
        class_names=_class_names(all_images, np.concatenate(ys), ncls),
        description=description or f"pre-extracted {dim}-d features of {len(domains)} domains from {root}",
    )
    return data.with_fraction(fraction, seed)


def _feature_benchmark(key: str, title: str) -> Callable[..., MultiTaskData]:
    """A loader for one VMTL benchmark: its domains and class count preset."""
    all_domains, ncls = BENCHMARK_DOMAINS[key]

    def load(
        root: str | Path,
        seed: int = 0,
        *,
        domains: Sequence[str] | None = None,
        fraction: float | None = None,
        **options,
    ) -> MultiTaskData:
        return load_feature_benchmark(
            root,
            list(domains) if domains is not None else list(all_domains),
            num_classes=ncls,
            fraction=fraction,
            seed=seed,
            name=key,
            description=f"{title}: {ncls} classes, one task per domain, pre-extracted features",
            **options,
        )

    load.__name__ = f"load_{key.replace('-', '_')}"
    load.__qualname__ = load.__name__
    load.__doc__ = (
        f"{title}: domains {', '.join(all_domains)} ({ncls} classes), in the layout of "
        f":func:`load_feature_benchmark`, whose keyword options it accepts. ``domains`` picks a "
        f"subset. The papers train on {', '.join(f'{f:.0%}' for f in BENCHMARK_FRACTIONS[key])} "
        f"(``fraction=``)."
    )
    return load


load_office_home = _feature_benchmark("office-home", "Office-Home")
load_office_caltech = _feature_benchmark("office-caltech", "Office-Caltech")
load_imageclef = _feature_benchmark("imageclef", "ImageCLEF-DA")
load_domainnet = _feature_benchmark("domainnet", "DomainNet")


# ---------------------------------------------------------------------------- .npz domains
def _npz_splits(path: Path, split: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Index arrays from a ``split`` array of 0/1/2 or ``"train"``/``"val"``/``"test"``."""
    if split.shape != (n,):
        raise ValueError(f"{path}: 'split' has shape {split.shape}, expected ({n},)")
    if split.dtype.kind in "US":
        codes = np.full(n, -1)
        for code, s in enumerate(SPLITS):
            codes[split.astype(str) == s] = code
    elif split.dtype.kind in "iu":
        codes = split.astype(np.int64)
    else:
        raise ValueError(f"{path}: 'split' must hold 0/1/2 or 'train'/'val'/'test', got dtype {split.dtype}")
    bad = ~np.isin(codes, (0, 1, 2))
    if bad.any():
        raise ValueError(f"{path}: 'split' value {split[np.argmax(bad)].item()!r} is not 0/1/2 or 'train'/'val'/'test'")
    return {s: np.flatnonzero(codes == code) for code, s in enumerate(SPLITS)}


def load_npz_domains(
    root: str | Path,
    seed: int = 0,
    *,
    domains: Sequence[str] | None = None,
    num_classes: int | None = None,
    fraction: float | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    name: str = "npz",
) -> MultiTaskData:
    """Load one classification task per ``root/<domain>.npz`` file.

    Each file holds ``features [N, ...]`` (numeric), ``labels [N]`` (integers in
    ``[0, num_classes)``) and optionally ``split [N]``: ``0``/``1``/``2`` or
    ``"train"``/``"val"``/``"test"``. All domains share the label space and feature shape.
    ``domains`` defaults to every ``*.npz`` in ``root``, sorted by name. Without ``split`` (or
    without any test or val entries in it) a stratified ``test_fraction``, then ``val_fraction``,
    is carved out of the training entries with ``seed``. ``num_classes`` defaults to the
    largest label + 1; ``fraction`` keeps that share of each training split, stratified.
    Write one with ``np.savez(path, features=x, labels=y, split=s)``.
    """
    root = _require_dir(root, "npz root")
    _check_fractions(val_fraction, test_fraction)
    if domains is None:
        domains = sorted(p.stem for p in root.glob("*.npz"))
        if not domains:
            raise FileNotFoundError(f"{root}: no <domain>.npz files found")
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    splits: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for domain in domains:
        path = root / f"{domain}.npz"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: file for domain {domain!r} not found; expected arrays 'features' and 'labels'"
            )
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except ValueError as err:  # object arrays need pickle, which is refused for safety
            raise ValueError(f"{path}: cannot read ({err})") from None
        missing = {"features", "labels"} - set(arrays)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)}; found {sorted(arrays)}")
        x, y = arrays["features"], arrays["labels"]
        if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{path}: expected features [N, D] and labels [N], got {x.shape} and {y.shape}")
        if y.dtype.kind not in "iu":
            raise ValueError(f"{path}: labels must be integers, got dtype {y.dtype}")
        given = _npz_splits(path, arrays["split"], len(y)) if "split" in arrays else {"train": np.arange(len(y))}
        if given["train"].size == 0:
            raise ValueError(f"{path}: 'split' marks no training entries")
        for split, idx in _carve_splits(y, given, val_fraction, test_fraction, rng).items():
            splits[split].append(idx)
        xs.append(x.astype(np.float32, copy=False))
        ys.append(y.astype(np.int64))
    data = MultiTaskData.from_arrays(
        xs,
        ys,
        "classification",
        list(domains),
        num_classes=num_classes if num_classes is not None else max(int(y.max()) for y in ys) + 1,
        splits=splits,
        name=name,
        description=f"{len(xs)} domains from the .npz files in {root}",
    )
    return data.with_fraction(fraction, seed)


# ---------------------------------------------------------------------------- Rotated MNIST
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read an unsigned-byte idx file (MNIST's format), gzipped when its name ends in ``.gz``.

    The header is a big-endian int32 magic number (``0x0000 08 <ndim>``), then ``ndim``
    big-endian int32 sizes, then the bytes. Raises ``ValueError`` naming the file on a wrong
    magic number or a truncated file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise ValueError(f"{path}: cannot read ({err})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an idx file")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        kind = {IDX_IMAGES_MAGIC: "images", IDX_LABELS_MAGIC: "labels"}.get(magic, "idx")
        raise ValueError(f"{path}: wrong magic number {found} (0x{found:08x}), expected {magic} for an idx {kind} file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise ValueError(f"{path}: header says {shape} = {size} bytes of data, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_mnist_file(root: Path, stem: str) -> Path:
    """``root``'s (or torchvision's ``root/MNIST/raw``'s) idx file, plain or gzipped."""
    names = (stem, stem.replace("-idx", ".idx"))  # Kaggle mirrors write train-images.idx3-ubyte
    for folder in (root, root / "MNIST" / "raw"):
        for name in names:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
    raise FileNotFoundError(f"{root}: MNIST file {stem} (or {stem}.gz) not found there or under MNIST/raw")


def load_rotated_mnist(
    root: str | Path,
    seed: int = 0,
    *,
    samples_per_task: int = 1000,
    angles: Sequence[float] | np.ndarray = tuple(range(0, 91, 10)),
    fraction: float | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.3,
) -> MultiTaskData:
    """VMTL's Rotated MNIST angle regression: one task per digit, target = rotation angle.

    Reads ``root/train-images-idx3-ubyte`` and ``root/train-labels-idx1-ubyte`` (each possibly
    ``.gz``; ``train-images.idx3-ubyte`` naming and torchvision's ``root/MNIST/raw`` also work).
    For each digit 0–9, ``samples_per_task`` distinct images of that digit are drawn with
    ``seed``, each paired with an angle from ``angles`` (equally often) and rotated
    counter-clockwise by it about the centre (``scipy.ndimage.rotate``, bilinear,
    ``reshape=False``). Inputs are the flattened 784 pixels in ``[0, 1]``; the target is the
    angle in degrees (standardised on train; ``target_stats`` keeps the scale). Test and val
    are carved per task, stratified by angle. The default pool has 600 training samples per
    task, so ``fraction=0.1`` / ``0.2`` give the paper's 6 / 12 samples per task per angle.
    """
    from scipy import ndimage

    root = _require_dir(root, "MNIST")
    _check_fractions(val_fraction, test_fraction)
    images = read_idx(_find_mnist_file(root, "train-images-idx3-ubyte"), IDX_IMAGES_MAGIC)
    labels = read_idx(_find_mnist_file(root, "train-labels-idx1-ubyte"), IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} MNIST images but {labels.shape[0]} labels")
    angles = np.asarray(angles, dtype=np.float64)
    rng = np.random.default_rng(seed)

    picks, task_angles = [], []
    for digit in range(10):
        pos = np.flatnonzero(labels == digit)
        if pos.size < samples_per_task:
            raise ValueError(
                f"{root}: digit {digit} has {pos.size} images, fewer than samples_per_task={samples_per_task}"
            )
        picks.append(rng.choice(pos, samples_per_task, replace=False))
        task_angles.append(rng.permutation(np.resize(angles, samples_per_task)))  # balanced over angles
    chosen = images[np.concatenate(picks)].astype(np.float32) / 255.0
    all_angles = np.concatenate(task_angles)
    rotated = np.empty_like(chosen)
    for angle in np.unique(all_angles):  # one call per angle over the whole stack
        at = all_angles == angle
        rotated[at] = ndimage.rotate(chosen[at], angle, axes=(1, 2), reshape=False, order=1, mode="constant")
    np.clip(rotated, 0.0, 1.0, out=rotated)
    rotated = rotated.reshape(10, samples_per_task, -1)

    ys = [a.astype(np.float32) for a in task_angles]
    splits: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for y in ys:
        carved = _carve_splits(y, {"train": np.arange(samples_per_task)}, val_fraction, test_fraction, rng)
        for split, idx in carved.items():
            splits[split].append(idx)
    data = MultiTaskData.from_arrays(
        list(rotated),
        ys,
        "regression",
        [f"digit-{d}" for d in range(10)],
        splits=splits,
        name="rotated-mnist",
        description=(
            f"Rotated MNIST: {samples_per_task} images per digit, rotated by {angles.tolist()} degrees; "
            "regress the angle"
        ),
    )
    return data.with_fraction(fraction, seed)


#: Registry names → builders ``(root, seed=0, **options) -> MultiTaskData``. Called without
#: ``fraction`` they return the full training split (``pyromtl.datasets.load`` applies it).
BENCHMARKS: dict[str, Callable[..., MultiTaskData]] = {
    "office-home": load_office_home,
    "office-caltech": load_office_caltech,
    "imageclef": load_imageclef,
    "domainnet": load_domainnet,
    "npz": load_npz_domains,
    "rotated-mnist": load_rotated_mnist,
}
