"""``pyromtl.fit`` and the :class:`Fit` it returns; ``pyromtl.load`` reads a saved run back.

A run directory (:class:`~pyromtl.rundir.RunDir`) holds ``config.toml`` (resolved: running it
again reproduces the run), ``metrics.json``, ``posterior.nc`` (ArviZ DataTree),
``checkpoint.pt`` and ``plots/``. Every file is written atomically.

Every public entry point runs with Pyro's module-local parameters, so two fits in one process
never share a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyromtl import config as config_mod
from pyromtl import methods
from pyromtl.base import TrainState
from pyromtl.data.core import MultiTaskData
from pyromtl.evaluation import SplitPrediction, predict_split, score_prediction
from pyromtl.method import Method
from pyromtl.objective import Objective
from pyromtl.params import local_params
from pyromtl.rundir import RunDir
from pyromtl.train import TrainResult, resolve_device, total_steps, train


@dataclass
class Fit:
    """A trained method on a dataset: evaluate it, read task relatedness, export to ArviZ, save."""

    method: Method
    data: MultiTaskData
    config: dict[str, Any]
    objective: Objective
    device: torch.device
    train_info: dict[str, Any]
    history: list[dict[str, float]]
    #: The run directory the trainer checkpointed into, if any.
    trained_in: Path | None = None
    _predictions: dict[str, SplitPrediction] = field(default_factory=dict, repr=False)

    @property
    def model(self):
        return self.objective.model

    @property
    def guide(self):
        return self.objective.guide

    @local_params
    def predict(self, split: str = "test", num_samples: int | None = None, keep: tuple[str, ...] = ()) -> SplitPrediction:
        """Monte-Carlo posterior predictive of a split (VMTL eq. 12), on the original target scale.

        With the default draws and nothing kept, a split is predicted once and reused.
        """
        cached = num_samples is None and not keep
        if cached and split in self._predictions:
            return self._predictions[split]
        n = num_samples or self.config["eval_samples"]
        torch.manual_seed(self.config["seed"])
        sp = predict_split(self.model, self.guide, self.data, split, num_samples=n,
                           max_plate_nesting=self.method.max_plate_nesting, device=self.device, keep=keep)
        if cached:
            self._predictions[split] = sp
        return sp

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

    @local_params
    def export_pruned(self) -> torch.nn.Module:
        """A plain ``nn.Module`` holding only what inference uses (the method's ``export_pruned``)."""
        if self.method.export_pruned is None:
            raise ValueError(f"method {self.method.name!r} has no pruned export")
        with torch.no_grad():
            return self.method.export_pruned(self)

    def to_arviz(self, num_samples: int | None = None, split: str = "test"):
        """An ArviZ DataTree with posterior, posterior_predictive, log_likelihood, observed_data."""
        from pyromtl.export import to_datatree

        return to_datatree(self, num_samples=num_samples, split=split)

    def metrics(self, split: str = "test") -> dict[str, Any]:
        """The ``metrics.json`` document."""
        scores = self.evaluate(split)
        doc = {
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
        if self.method.extra is not None and (extra := self.method.extra(self)):
            doc["extra"] = extra
        return doc

    def checkpoint(self) -> dict[str, Any]:
        """A checkpoint of this fit's kept state (loadable with ``weights_only=True``)."""
        return {"step": self.train_info["steps"], "objective": self.objective.state_dict(), "best": {"state": None},
                "config": self.config, "history": self.history}

    def save(self, out: str | Path) -> Path:
        """Write the run directory; every file is replaced atomically.

        A checkpoint already there is kept only if it is this fit's own (the trainer wrote it
        while training into ``out``); any other is replaced by this fit's state.
        """
        from pyromtl.plots import plot_run

        run = RunDir(out).create()
        run.write_config(self.config)
        if self.trained_in is None or self.trained_in.resolve() != run.path.resolve():
            run.write_checkpoint(self.checkpoint())
        doc = self.metrics()
        run.write_metrics(doc)
        # plots before the ArviZ export: ArviZ leaves a lazy `jax` module behind, and
        # matplotlib's unit lookup probes it, which imports jax (about a second)
        plot_run(run, history=self.history, doc=doc)
        run.write_posterior(self.to_arviz())
        return run.path


def _check_data_arg(data: Any) -> None:
    if data is not None and not isinstance(data, (str, MultiTaskData)):
        raise ValueError(f"data must be a dataset name or a MultiTaskData, got {type(data).__name__}")


def resolve_fraction(cfg: dict[str, Any], data: MultiTaskData | str | None = None) -> None:
    """Turn ``fraction = 0`` into the dataset's default fraction, in place (DESIGN: two configs
    are the same run when they agree after this)."""
    from pyromtl import datasets

    _check_data_arg(data)
    name = data.name if isinstance(data, MultiTaskData) else data or cfg["data"]
    if not cfg["fraction"]:
        cfg["fraction"] = datasets.default_fraction(name) or 1.0


def _load_data(cfg: dict[str, Any], data: MultiTaskData | str | None) -> MultiTaskData:
    """Load (or re-split) the data of a config whose fraction is resolved."""
    from pyromtl import datasets

    resolve_fraction(cfg, data)
    if isinstance(data, MultiTaskData):
        return data.with_fraction(cfg["fraction"], cfg["seed"])
    name = data or cfg["data"]
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
    _check_data_arg(data)
    if isinstance(data, str):
        options["data"] = data
    cfg = config_mod.resolve(m, {**options, "seed": seed, "device": device}, priors)
    return fit_resolved(m, cfg, data if isinstance(data, MultiTaskData) else None, out)


#: Config keys that may differ when a run directory's checkpoint is resumed: where and how
#: long to train, not what is trained.
RESUMABLE_KEYS = frozenset({"device", "quiet", "steps", "epochs", "checkpoint_every"})


def check_resume(run: RunDir, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint in ``run`` if it belongs to this resolved config (else ``ValueError``), or None.

    A run directory is one run: its checkpoint is resumed only by the config that wrote it,
    compared after both are resolved.
    """
    if not run.has_checkpoint():
        return None
    saved = run.read_checkpoint()
    old = saved.get("config", {})
    changed = sorted(k for k in set(old) | set(cfg) if k not in RESUMABLE_KEYS and old.get(k) != cfg.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {cfg.get(k)!r}" for k in changed)
        raise ValueError(f"{run.path} holds a run with a different config ({diffs}); pass another run directory "
                         "or remove it")
    return saved


def _check_splits(data: MultiTaskData) -> None:
    """Every task needs test rows (metrics) and training rows; say which lacks them before training."""
    for split in ("train", "test"):
        empty = [name for name, n in zip(data.task_names, data.split_sizes(split)) if n == 0]
        if empty:
            raise ValueError(f"task(s) {', '.join(map(repr, empty))} of {data.name!r} have no {split} rows; "
                             "give each task more samples or explicit splits")


def fit_resolved(method: Method, cfg: dict[str, Any], data: MultiTaskData | None = None,
                 out: str | Path | None = None) -> Fit:
    """:func:`fit` from a config that :func:`pyromtl.config.resolve` already resolved (the CLI's path).

    With ``out``: a checkpoint there is resumed if this config wrote it (else ``ValueError``);
    a run that is already complete is loaded and returned as it is, with nothing written
    (``Fit.train_info["complete"]`` is then true).
    """
    device = resolve_device(cfg["device"])  # before anything is written: no empty run directory
    if cfg["root"]:
        cfg["root"] = str(Path(cfg["root"]).expanduser().resolve())
    dataset = _load_data(cfg, data)
    cfg["data"] = dataset.name
    method.check_data(dataset)
    dataset = method.prepare(dataset, cfg)
    _check_splits(dataset)
    run = RunDir(out) if out is not None else None
    if run is not None:
        saved = check_resume(run, cfg)
        if saved is not None and saved["step"] == total_steps(cfg, dataset) and run.metrics_path.is_file():
            done = load(run.path, data=data, device=cfg["device"])
            done.train_info["complete"] = True
            return done
        run.create()
    result: TrainResult = train(method, dataset, cfg, run=run)
    info = {"steps": result.steps, "seconds": round(result.seconds, 3), "final_loss": result.final_loss,
            "best_step": result.best_step, "best_val_score": result.best_score, "selected": result.selected}
    f = Fit(method=method, data=dataset, config=cfg, objective=result.objective, device=device, train_info=info,
            history=result.history, trained_in=run.path if run is not None else None)
    if run is not None:
        f.save(run.path)
    return f


@local_params
def load(run_dir: str | Path, data: MultiTaskData | None = None, device: str | None = None) -> Fit:
    """Rebuild a saved :class:`Fit` from its run directory.

    Embedded and benchmark datasets are rebuilt from the config; a custom ``MultiTaskData``
    must be passed as ``data``.
    """
    run = RunDir(run_dir)
    for path in (run.config_path, run.checkpoint_path):
        if not path.exists():
            raise ValueError(f"{run.path} is not a pyromtl run directory (no {path.name})")
    raw = run.read_config()
    m = methods.get(raw.get("method", ""))
    if data is None:
        from pyromtl import datasets

        name = raw.get("data", "")
        if name not in datasets.available():
            raise ValueError(f"{run.path} was fitted on data {name!r}, which is not a registered dataset: reopen it "
                             "with pyromtl.load(RUN, data=...) from Python, or register a builder of that name "
                             "(pyromtl.datasets.register) in a module and pass --import MODULE")
    raw.pop("method", None)
    if device is not None:
        raw["device"] = device
    cfg = config_mod.resolve(m, raw)
    dataset = m.prepare(_load_data(cfg, data), cfg)
    dev = resolve_device(cfg["device"])
    saved = run.read_checkpoint(dev)
    state = TrainState(total_steps=total_steps(cfg, dataset))
    model, guide = m.build(dataset, cfg, state, dev)
    objective = m.objective(m, cfg, model, guide)
    objective(dataset.train_batch(cfg["batch_size"], torch.Generator().manual_seed(0), dev))  # create lazy params
    best = saved.get("best") or {}
    try:
        objective.load_state_dict(best.get("state") or saved["objective"])
    except (RuntimeError, KeyError) as err:
        raise ValueError(f"{run.checkpoint_path} does not fit data {dataset.name!r} "
                         f"({' '.join(str(err).split())[:200]}); pass the data the run was fitted on") from None
    info = run.read_metrics()["train"] if run.metrics_path.exists() else {"steps": saved["step"]}
    state.step = info.get("steps", 0)
    return Fit(method=m, data=dataset, config=cfg, objective=objective, device=dev, train_info=info,
               history=saved.get("history", []))
