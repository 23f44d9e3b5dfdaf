"""A run directory, and the one place that reads and writes its files.

Layout: ``config.toml`` (the resolved config), ``metrics.json``, ``checkpoint.pt``,
``posterior.nc`` (an ArviZ DataTree), ``plots/*.png`` and ``report.md``. Every file is
replaced atomically, so a reader never sees half of one.

Run directories are what people send each other, so opening one never runs code from it:
checkpoints are read with ``torch.load(..., weights_only=True)`` (tensors and plain
containers only) and a file that does not load that way is refused with one line naming it.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pyromtl.io import atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text


class RunDir:
    """The files of one run, under ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def posterior_path(self) -> Path:
        return self.path / "posterior.nc"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    @property
    def report_path(self) -> Path:
        return self.path / "report.md"

    def create(self) -> RunDir:
        """Make the folder; a path that exists and is not a folder is a ``ValueError``."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"run directory {self.path} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------------ config
    def read_config(self) -> dict[str, Any]:
        from pyromtl import config

        return config.load_toml(self.config_path)

    def write_config(self, cfg: Mapping[str, Any]) -> None:
        from pyromtl import config

        atomic_write_text(self.config_path, config.to_toml(cfg))

    # ------------------------------------------------------------------ metrics
    def read_metrics(self) -> dict[str, Any]:
        """``metrics.json``; a missing or malformed file is a ``ValueError`` naming it."""
        path = self.metrics_path
        if not path.is_file():
            raise ValueError(f"{self.path} is not a pyromtl run directory (no metrics.json)")
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), dict) or "dataset" not in doc:
            raise ValueError(f"{path} lacks the 'dataset' and 'tasks' entries of a pyromtl metrics.json")
        return doc

    def write_metrics(self, doc: dict[str, Any]) -> None:
        """Write strict JSON: NaN and infinities become ``null``, which every parser accepts."""
        atomic_write_json(self.metrics_path, doc)

    # ------------------------------------------------------------------ checkpoint
    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    def read_checkpoint(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """The checkpoint, loaded with ``weights_only=True``; anything else is refused in one line."""
        path = self.checkpoint_path
        if not path.is_file():
            raise ValueError(f"{self.path} holds no checkpoint.pt")
        try:
            saved = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            if "GLOBAL" in str(err):  # a class or function reference: loading it could run code
                raise ValueError(
                    f"{path} holds objects other than tensors and plain containers; "
                    "refusing to load it, since that could run code from the file"
                ) from None
            raise ValueError(f"{path} cannot be read: it is not a checkpoint") from None
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, IndexError) as err:
            raise ValueError(f"{path} cannot be read: {' '.join(str(err).split())[:200]}") from None
        if not isinstance(saved, dict) or "step" not in saved:
            raise ValueError(f"{path} is not a pyromtl checkpoint")
        return saved

    def write_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save(state, self.checkpoint_path)

    # ------------------------------------------------------------------ posterior and plots
    def write_posterior(self, tree) -> None:
        """Write an ArviZ DataTree with h5netcdf, atomically."""
        tmp = self.path / ".posterior.nc.tmp"
        tree.to_netcdf(tmp, engine="h5netcdf")
        tmp.replace(self.posterior_path)

    def write_report(self, text: str) -> None:
        atomic_write_text(self.report_path, text)

    def write_png(self, name: str, data: bytes) -> Path:
        path = self.plots_dir / name
        atomic_write_bytes(path, data)
        return path
