"""``pyromtl.fit`` and the :class:`Fit` it returns; ``pyromtl.load`` reads a saved run back.

A run directory holds ``config.toml`` (resolved: running it again reproduces the run),
``metrics.json``, ``posterior.nc`` (ArviZ DataTree), ``checkpoint.pt`` and ``plots/``.
Every file is written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyromtl import config as config_mod
from pyromtl import methods
from pyromtl.base import TrainState, local_params
from pyromtl.data.core import MultiTaskData
from pyromtl.evaluation import SplitPrediction, predict_split, score_prediction
from pyromtl.io import atomic_torch_save, atomic_write_json, atomic_write_text
from pyromtl.train import TrainResult, resolve_device, train


@dataclass
class Fit:
    """A trained method on a dataset: evaluate it, read task relatedness, export to ArviZ, save."""

    method: methods.Method
    data: MultiTaskData
    config: dict[str, Any]
    model: Any
    guide: Any
    loss_fn: torch.nn.Module
    device: torch.device
    train_info: dict[str, Any]
    history: list[dict[str, float]]

    @local_params
    def predict(self, split: str = "test", num_samples: int | None = None, keep: tuple[str, ...] = ()) -> SplitPrediction:
        """Monte-Carlo posterior predictive of a split (VMTL eq. 12), on the original target scale."""
        n = num_samples or self.config["eval_samples"]
        torch.manual_seed(self.config["seed"])
        return predict_split(self.model, self.guide, self.data, split, num_samples=n,
                             max_plate_nesting=self.method.max_plate_nesting, device=self.device, keep=keep)

    def evaluate(self, split: str = "test", num_samples: int | None = None) -> dict[str, dict]:
        """Per-task metrics and their average, shaped like ``metrics.json``'s ``tasks``/``average``."""
        return score_prediction(self.data, self.predict(split, num_samples))

    @local_params
    def relatedness(self) -> dict[str, np.ndarray]:
        """Task-by-task matrices (VMTL α and β, ...); empty for methods without any."""
        if self.method.relatedness is None:
            return {}
        with torch.no_grad():
            return {k: np.asarray(v) for k, v in self.method.relatedness(self.model, self.guide).items()}

    def to_arviz(self, num_samples: int | None = None, split: str = "test"):
        """An ArviZ DataTree with posterior, posterior_predictive, log_likelihood, observed_data."""
        from pyromtl.diagnostics import to_datatree

        return to_datatree(self, num_samples=num_samples, split=split)

    def metrics(self, split: str = "test") -> dict[str, Any]:
        """The ``metrics.json`` document."""
        scores = self.evaluate(split)
        return {
            "method": self.method.name,
            "dataset": self.data.name,
            "fraction": self.config["fraction"],
            "seed": self.config["seed"],
            "device": self.device.type,
            "split": split,
            "tasks": scores["tasks"],
            "average": scores["average"],
            "train": self.train_info,
            "relatedness": {k: v.tolist() for k, v in self.relatedness().items()},
        }

    def save(self, out: str | Path) -> Path:
        """Write the run directory; every file is replaced atomically."""
        from pyromtl.diagnostics import plot_run

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.toml", config_mod.to_toml(self.config))
        ckpt = out / "checkpoint.pt"
        if not ckpt.exists():  # the trainer writes it when it was given the directory
            atomic_torch_save({"step": self.train_info["steps"], "params": self.loss_fn.state_dict(),
                               "best": {"state": None}, "config": self.config, "history": self.history}, ckpt)
        doc = self.metrics()
        atomic_write_json(out / "metrics.json", doc)
        tree = self.to_arviz()
        tmp = out / ".posterior.nc.tmp"
        tree.to_netcdf(tmp, engine="h5netcdf")
        tmp.replace(out / "posterior.nc")
        plot_run(self, out / "plots", tree=tree)
        return out


def _load_data(cfg: dict[str, Any], data: MultiTaskData | str | None) -> MultiTaskData:
    """Load (or re-split) the data; ``cfg["fraction"] = 0`` becomes the dataset's default, in place."""
    from pyromtl import datasets

    if data is not None and not isinstance(data, (str, MultiTaskData)):
        raise ValueError(f"data must be a dataset name or a MultiTaskData, got {type(data).__name__}")
    name = data.name if isinstance(data, MultiTaskData) else data or cfg["data"]
    if not cfg["fraction"]:
        cfg["fraction"] = datasets.default_fraction(name) or 1.0
    if isinstance(data, MultiTaskData):
        return data.with_fraction(cfg["fraction"], cfg["seed"])
    options = {"root": cfg["root"]} if cfg["root"] else {}
    return datasets.load(name, fraction=cfg["fraction"], seed=cfg["seed"], **options)


def fit(method: str, data: MultiTaskData | str | None = None, *, priors: dict[str, Any] | None = None, seed: int = 0,
        device: str = "auto", out: str | Path | None = None, **options) -> Fit:
    """Train ``method`` on ``data`` (a :class:`MultiTaskData` or a dataset name) and return a :class:`Fit`.

    ``options`` are config keys (``steps``, ``epochs``, ``lr``, ``fraction``, ``latent_dim``, ...);
    unknown keys raise ``ValueError`` before anything is trained. With ``out``, checkpoints go
    there during training (an existing checkpoint is resumed) and the run directory is saved.
    """
    m = methods.get(method)
    if isinstance(data, str):
        options["data"] = data
    cfg = config_mod.resolve(m, {**options, "seed": seed, "device": device}, priors)
    dataset = _load_data(cfg, data)
    cfg["data"] = dataset.name
    m.check_data(dataset)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
    result: TrainResult = train(m, dataset, cfg, out_dir=out)
    info = {"steps": result.steps, "seconds": round(result.seconds, 3), "final_loss": result.final_loss,
            "best_step": result.best_step, "best_val_score": result.best_score}
    f = Fit(method=m, data=dataset, config=cfg, model=result.model, guide=result.guide, loss_fn=result.loss_fn,
            device=resolve_device(cfg["device"]), train_info=info, history=result.history)
    if out is not None:
        f.save(out)
    return f


@local_params
def load(run_dir: str | Path, data: MultiTaskData | None = None, device: str | None = None) -> Fit:
    """Rebuild a saved :class:`Fit` from its run directory.

    Embedded and benchmark datasets are rebuilt from the config; a custom ``MultiTaskData``
    must be passed as ``data``.
    """
    run_dir = Path(run_dir)
    for name in ("config.toml", "checkpoint.pt"):
        if not (run_dir / name).exists():
            raise ValueError(f"{run_dir} is not a pyromtl run directory (no {name})")
    raw = config_mod.load_toml(run_dir / "config.toml")
    m = methods.get(raw.get("method", ""))
    raw.pop("method", None)
    if device is not None:
        raw["device"] = device
    cfg = config_mod.resolve(m, raw)
    dataset = _load_data(cfg, data)
    dev = resolve_device(cfg["device"])
    state = TrainState()
    model, guide = m.build(dataset, cfg, state, dev)
    loss_fn = m.elbo(m, cfg)(model, guide)
    loss_fn(dataset.train_batch(cfg["batch_size"], torch.Generator().manual_seed(0), dev))  # create lazy params
    saved = torch.load(run_dir / "checkpoint.pt", map_location=dev, weights_only=False)
    best = saved.get("best") or {}
    loss_fn.load_state_dict(best.get("state") or saved["params"])
    metrics_path = run_dir / "metrics.json"
    info = json.loads(metrics_path.read_text())["train"] if metrics_path.exists() else {"steps": saved["step"]}
    state.step = info.get("steps", 0)
    return Fit(method=m, data=dataset, config=cfg, model=model, guide=guide, loss_fn=loss_fn, device=dev,
               train_info=info, history=saved.get("history", []))
