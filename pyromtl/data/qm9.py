"""QM9 from torch_geometric's processed file, as fixed-size molecule descriptors and 12 regression targets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pyromtl.data.core import MultiTaskData
from pyromtl.data.loaders import _check_fractions, _require_dir

#: The 12 standard QM9 properties: the first 12 columns of torch_geometric's ``y``.
QM9_TARGETS = ("mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "Cv")
#: torch_geometric's processed file, under ``root/processed``.
QM9_FILE = "data_v3.pt"
ELEMENTS = (1, 6, 7, 8, 9)  # H, C, N, O, F
MAX_ATOMS = 29


def molecule_features(z: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Element counts (H, C, N, O, F) and the Coulomb matrix's eigenvalues, largest magnitude first.

    ``z [n]`` atomic numbers and ``pos [n, 3]`` coordinates of one molecule; the eigenvalues are
    zero-padded to :data:`MAX_ATOMS`, so every molecule gives the same 34 numbers, invariant to
    atom order, rotation and translation.
    """
    n = len(z)
    if n > MAX_ATOMS:
        raise ValueError(f"a QM9 molecule has at most {MAX_ATOMS} atoms, got {n}")
    zf = z.astype(np.float64)
    dist = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    with np.errstate(divide="ignore"):
        coulomb = np.where(np.eye(n, dtype=bool), 0.5 * zf**2.4, np.outer(zf, zf) / dist)
    eig = np.linalg.eigvalsh(coulomb)
    eig = eig[np.argsort(-np.abs(eig))]
    counts = [(z == e).sum() for e in ELEMENTS]
    return np.concatenate([counts, eig, np.zeros(MAX_ATOMS - n)])


def load_qm9(
    root: str | Path,
    seed: int = 0,
    *,
    targets: Sequence[str] = QM9_TARGETS,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> MultiTaskData:
    """SIMO regression, 12 tasks: QM9's molecular properties (mu ... Cv) from torch_geometric's files.

    Reads ``root/processed/data_v3.pt``, the file ``torch_geometric.datasets.QM9(root)`` writes
    (nothing is downloaded or processed here), and needs torch_geometric installed. A molecule's
    input is :func:`molecule_features` of its atomic numbers and positions (34 numbers), as
    graphs do not fit a fixed-size input; the targets are the first 12 columns of ``y``
    (``targets`` picks a subset by name), standardised on train. ``test_fraction`` and then
    ``val_fraction`` of the molecules are drawn at random with ``seed``.
    """
    try:
        # optional: only this loader needs it
        from torch_geometric.data import InMemoryDataset
    except ImportError:
        raise ValueError(
            "the qm9 loader needs torch_geometric: pip install 'pyromtl[qm9]' (or pip install torch_geometric)"
        ) from None
    root = _require_dir(root, "QM9")
    _check_fractions(val_fraction, test_fraction)
    names = list(targets)
    unknown = [t for t in names if t not in QM9_TARGETS]
    if unknown or not names:
        raise ValueError(f"targets: unknown QM9 targets {unknown}; choose from {list(QM9_TARGETS)}")
    path = root / "processed" / QM9_FILE
    if not path.is_file():
        raise ValueError(
            f"{path}: torch_geometric's processed QM9 file not found; run "
            f"torch_geometric.datasets.QM9({str(root)!r}) once to create it"
        )

    class Processed(InMemoryDataset):
        """The processed file alone: without download() or process() overrides, nothing else is fetched."""

        @property
        def raw_file_names(self) -> list[str]:
            return []

        @property
        def processed_file_names(self) -> list[str]:
            return [QM9_FILE]

    try:
        dataset = Processed(str(root))
        dataset.load(str(path))
        z, pos, y = (dataset._data[k].numpy() for k in ("z", "pos", "y"))
        bounds = dataset.slices["z"].numpy()
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, OSError) as err:
        raise ValueError(f"{path}: cannot read torch_geometric's QM9 data ({err})") from None
    if y.ndim != 2 or y.shape[1] < len(QM9_TARGETS) or y.shape[0] != len(bounds) - 1:
        raise ValueError(f"{path}: expected y [molecules, >= {len(QM9_TARGETS)}], got {y.shape}")
    x = np.stack([molecule_features(z[a:b], pos[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
    return MultiTaskData.from_arrays(
        x,
        {t: y[:, QM9_TARGETS.index(t)] for t in names},
        "regression",
        name="qm9",
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        description=f"QM9 from {path}: {len(x)} molecules, {len(names)} properties",
    )
