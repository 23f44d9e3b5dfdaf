"""Registry entries of the SIMO benchmark loaders (one input, several targets per sample).

Each reads files the user already has from ``root``; see the loader's docstring for the layout.
"""

from __future__ import annotations

from collections.abc import Callable

from pyromtl.data.chestxray import load_chestxray14
from pyromtl.data.cifar import load_cifar_mtl
from pyromtl.data.core import MultiTaskData
from pyromtl.data.faces import load_mtfl, load_utkface
from pyromtl.data.mnist import load_grouped_mnist, load_multi_mnist
from pyromtl.data.qm9 import load_qm9

#: Registry names → builders ``(root, seed=0, **options) -> MultiTaskData``.
SIMO_BENCHMARKS: dict[str, Callable[..., MultiTaskData]] = {
    "cifar-mtl": load_cifar_mtl,
    "utkface": load_utkface,
    "chestxray14": load_chestxray14,
    "qm9": load_qm9,
    "grouped-mnist": load_grouped_mnist,
    "multi-mnist": load_multi_mnist,
    "mtfl": load_mtfl,
}
