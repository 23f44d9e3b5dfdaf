"""``pyromtl.fit`` and the :class:`Fit` it returns; ``pyromtl.load`` reads a saved run back.

A run directory (:class:`~pyromtl.rundir.RunDir`) holds ``config.toml`` (resolved: running it
again reproduces the run), ``metrics.json``, ``posterior.nc`` (ArviZ DataTree),
``checkpoint.pt`` and ``plots/``. Every file is written atomically.

A run is resolved once, into a :class:`~pyromtl.runspec.RunSpec` that the trainer, the Fit, its
files and the CLI all read. Every public entry point runs with Pyro's module-local parameters,
so two fits in one process never share a parameter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyromtl import backbones, collective, methods
from pyromtl import config as config_mod
from pyromtl.backbones import BackboneObject
from pyromtl.data.core import MultiTaskData
from pyromtl.evaluation import SplitPrediction, predict_split, score_prediction
from pyromtl.method import Method, MethodContext
from pyromtl.objective import Objective
from pyromtl.params import local_params
from pyromtl.predict import draw
from pyromtl.rundir import RunDir
from pyromtl.runspec import RunSpec
from pyromtl.schedules import TrainState
from pyromtl.train import TrainResult, build_objective, train

#: The fewest draws of the final evaluation: PSIS-LOO fits a tail to the top 20% of the draws
#: and needs at least 5 there (with a margin: 20).
MIN_DRAWS = 100


@dataclass
class Fit:
    """A trained method on a dataset: evaluate it, read task relatedness, export to ArviZ, save.

    Returned by :func:`fit` and :func:`load`; not built by hand. ``history`` holds the logged
    training steps (``{"step", "loss", ...}`` dicts, with the validation metric where evaluated).
    """

    spec: RunSpec
    objective: Objective
    state: TrainState
    train_info: dict[str, Any]
    history: list[dict[str, float]]
    #: The run directory the trainer checkpointed into, if any.
    trained_in: Path | None = None
    _doc: dict[str, Any] | None = field(default=None, repr=False)
    _predictions: dict[str, SplitPrediction] = field(default_factory=dict, repr=False)

    @property
    def method(self) -> Method:
        return self.spec.method

    @property
    def data(self) -> MultiTaskData:
        return self.spec.data

    @property
    def config(self) -> Mapping[str, Any]:
        return self.spec.config

    @property
    def device(self) -> torch.device:
        return self.spec.device

    @property
    def model(self):
        return self.objective.model

    @property
    def guide(self):
        return self.objective.guide

    @property
    def context(self) -> MethodContext:
        """What the method's callbacks are given about this fit (model, guide, data, history)."""
        return self.spec.context(self.state).replace(model=self.model, guide=self.guide, history=self.history)

    @local_params
    def predict(
        self, split: str = "test", num_samples: int | None = None, keep: tuple[str, ...] = ()
    ) -> SplitPrediction:
        """Monte-Carlo posterior predictive of a split (VMTL eq. 12), on the original target scale,
        with a replicated target per draw (``y_rep``), from ``num_samples`` model passes.

        By default it takes ``eval_samples`` passes, or more where those give fewer than
        :data:`~pyromtl.fit.MIN_DRAWS` draws (a pass of VMTL gives L·M). With the default and nothing kept, a
        split is predicted once and reused: the metrics and the ArviZ export read the same draws.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            num_samples: model passes (None: the default above).
            keep: names of model or guide sites whose draws to keep as well.

        Raises:
            ValueError: an unknown split.
        """
        cached = num_samples is None and not keep
        if cached and split in self._predictions:
            return self._predictions[split]
        n = num_samples or self._passes(split)
        torch.manual_seed(self.config["seed"])
        sp = predict_split(
            self.model,
            self.guide,
            self.data,
            split,
            num_samples=n,
            max_plate_nesting=self.method.max_plate_nesting,
            device=self.device,
            keep=keep,
            replicate=True,
        )
        if cached:
            self._predictions[split] = sp
        return sp

    def _passes(self, split: str) -> int:
        """The default number of model passes of :meth:`predict`."""
        return max(int(self.config["eval_samples"]), math.ceil(MIN_DRAWS / self.draws_per_pass(split)))

    @local_params
    def draws_per_pass(self, split: str = "test") -> int:
        """How many posterior draws one model pass gives (1; VMTL's inner plates give L·M), from one
        pass on a batch of ``split`` (the RNGs are left as they were).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Raises:
            ValueError: an unknown split.
        """
        batch = next(iter(self.data.eval_batches(split, self.device)))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return draw(self.model, self.guide, batch, 1, self.method.max_plate_nesting).loglik.shape[0]

    def evaluate(self, split: str = "test", num_samples: int | None = None) -> dict[str, dict]:
        """Per-task metrics and their average, shaped like ``metrics.json``'s ``tasks``/``average``.

        :param split: ``"train"``, ``"val"`` or ``"test"``.
        :param num_samples: model passes to average (default as in :meth:`predict`).
        :returns: ``{"tasks": {task: {metric: value}}, "average": {metric: value}}``, e.g.
            ``accuracy``, ``auc``, ``ece``, ``brier`` and ``nll`` for classification, ``mse``,
            ``mae`` and ``nmse`` for regression (:func:`pyromtl.metrics.task_metrics`).
        """
        return score_prediction(self.data, self.predict(split, num_samples))

    @local_params
    def relatedness(self) -> dict[str, np.ndarray]:
        """Task-by-task matrices of what the method learns about its tasks; empty for methods without any.

        :returns: ``{name: [T, T] array}`` with task order ``data.task_names``: ``alpha`` and
            ``beta`` (VMTL's mixture weights of the ``z`` and ``w`` priors, rows summing to 1),
            ``distance`` (HIB's eq. 11), ``gates`` (SMTL's ``α_t`` on the diagonal).
        """
        return self.context.relatedness()

    @local_params
    def export_pruned(self) -> torch.nn.Module:
        """A plain ``nn.Module`` holding only what inference uses (the method's ``export_pruned``).

        :raises ValueError: the method has none (SMTL's variants have one: each task keeps only
            the side its gate chose).
        """
        if self.method.export_pruned is None:
            raise ValueError(f"method {self.method.name!r} has no pruned export")
        with torch.no_grad():
            return self.method.export_pruned(self.context)

    @local_params
    def to_arviz(self, num_samples: int | None = None, split: str = "test"):
        """An ArviZ DataTree with posterior, posterior_predictive, log_likelihood, observed_data,
        from the draws of :meth:`predict` (by default those of the metrics).

        :param num_samples: model passes (default as in :meth:`predict`).
        :param split: the split whose predictions and observations it holds.
        :returns: an :class:`xarray.DataTree` with dimensions named ``task``, ``other_task``,
            ``class`` and ``latent_dim``; ``az.loo`` and ``az.compare`` read its
            ``log_likelihood`` group.
        """
        from pyromtl.export import to_datatree

        return to_datatree(self, num_samples=num_samples, split=split)

    def metrics(self) -> dict[str, Any]:
        """The ``metrics.json`` document of the test split: computed once (a reopened run's is the
        one its directory holds)."""
        if self._doc is not None:
            return self._doc
        scores = self.evaluate("test")
        doc = {
            "method": self.method.name,
            "dataset": self.data.name,
            "fraction": self.config["fraction"],
            "seed": self.config["seed"],
            "device": self.device.type,
            "split": "test",
            "tasks": scores["tasks"],
            "average": scores["average"],
            "train": self.train_info,
            "relatedness": {k: v.tolist() for k, v in self.relatedness().items()},
        }
        if self.data.relatedness is not None:  # the dataset knows it: the leaderboard scores recovery
            doc["true_relatedness"] = self.data.relatedness.tolist()
        if self.method.extra is not None and (extra := self.method.extra(self.context)):
            doc["extra"] = extra
        self._doc = doc
        return doc

    def checkpoint(self) -> dict[str, Any]:
        """A checkpoint of this fit's kept state (loadable with ``weights_only=True``)."""
        return {
            "step": self.train_info["steps"],
            "objective": self.objective.state_dict(),
            "best": {"state": None},
            "config": dict(self.config),
            "history": self.history,
        }

    def save(self, out: str | Path) -> Path:
        """Write the run directory; every file is replaced atomically, under the run's lock, and
        ``complete.json`` last (until then the run reads as incomplete).

        A checkpoint already there is kept only if it is this fit's own (the trainer wrote it
        while training into ``out``); any other is replaced by this fit's state.

        :param out: the run directory (created if missing).
        :returns: its path.
        :raises ValueError: ``out`` holds a different run, or another process is writing it.
        """
        from pyromtl.plots import plot_run

        with RunDir(out).writing() as run:
            run.clear_complete()
            run.write_config(self.config)
            if self.trained_in is None or self.trained_in.resolve() != run.path.resolve():
                run.write_checkpoint(self.checkpoint())
            doc = self.metrics()
            run.write_metrics(doc)
            # plots before the ArviZ export: ArviZ leaves a lazy `jax` module behind, and
            # matplotlib's unit lookup probes it, which imports jax (about a second)
            plot_run(run, doc=doc, history=self.history, context=self.context)
            run.write_posterior(self.to_arviz())
            run.mark_complete(self.train_info["steps"])
        return run.path


def fit(
    method: str,
    data: MultiTaskData | str | None = None,
    *,
    priors: dict[str, Any] | None = None,
    seed: int = 0,
    device: str = "auto",
    out: str | Path | None = None,
    backbone: str | BackboneObject | None = None,
    **options,
) -> Fit:
    """Train ``method`` on ``data`` (a :class:`MultiTaskData` or a dataset name) and return a :class:`Fit`.

    ``options`` are config keys (``steps``, ``epochs``, ``lr``, ``fraction``, ``latent_dim``, ...);
    unknown keys raise ``ValueError`` before anything is trained. With ``out``, checkpoints go
    there during training (an existing checkpoint is resumed) and the run directory is saved.

    ``backbone`` is the network in front of the method's own parts: a name (``"mlp"``, ``"cnn"``, a
    registered network), an ``nn.Module`` mapping ``[B, *input_shape]`` to ``[B, F]`` (a template:
    copies of it are trained, never it), or a callable ``factory(input_shape)`` returning one
    (see :mod:`pyromtl.backbones`).

    :param method: a registered method name (:func:`pyromtl.methods.available`).
    :param data: the data, or the name of a registered dataset (:func:`pyromtl.datasets.available`);
        ``None`` takes the config's ``data`` (the method's default dataset).
    :param priors: ``{site: spec}`` replacing the method's default priors (anything
        :func:`pyromtl.priors.parse_spec` takes).
    :param seed: seeds the data split, the initialisation and every draw.
    :param device: ``"auto"`` (CUDA where available), ``"cpu"`` or ``"cuda"``.
    :param out: a run directory to checkpoint into and save to (``pyromtl fit --out``).
    :param backbone: the network in front of the method's own parts (above).
    :param options: config keys (``pyromtl show METHOD`` lists a method's keys and defaults).
    :returns: the trained fit, its state the one model selection kept.
    :raises ValueError: an unknown method, dataset, prior kind or option, a value out of range,
        data the method cannot learn, or a run directory holding a different run.
    :raises ~pyromtl.errors.TrainingError: the loss became NaN or infinite.
    """
    m = methods.get(method)
    obj = None
    if backbone is not None:
        obj = None if isinstance(backbone, str) else backbone
        options["backbone"] = backbone if isinstance(backbone, str) else backbones.label(backbone)
    cfg = config_mod.resolve(m, {**options, "seed": seed, "device": device}, priors, data=data)
    return fit_resolved(m, cfg, data if isinstance(data, MultiTaskData) else None, out, backbone=obj)


@local_params
def fit_resolved(
    method: Method,
    cfg: Mapping[str, Any],
    data: MultiTaskData | None = None,
    out: str | Path | None = None,
    backbone: BackboneObject | None = None,
) -> Fit:
    """:func:`fit` from a config that :func:`pyromtl.config.resolve` returned (the CLI's path);
    ``backbone`` is the object the config's ``backbone`` labels, if it was given from Python.

    Builds the run's :class:`~pyromtl.runspec.RunSpec` (every check runs there, before anything is
    written). With ``out``, the run directory is locked for the whole call (a second writer is a
    ``ValueError`` naming the first): a checkpoint there is resumed if this config wrote it (else
    ``ValueError``); a run that is already complete is reopened as it is, with nothing trained or
    written (``Fit.train_info["complete"]`` is then true); a run trained to its end whose files
    were not all written (an interrupted or failed save) gets them, with nothing trained
    (``train_info["finished_save"]``).

    Args:
        method: the registered method.
        cfg: the resolved config.
        data: the data, or None to load the config's ``data``.
        out: a run directory to checkpoint into and save to, or None.
        backbone: the backbone object, if given from Python.

    Returns:
        The trained (or reopened) fit.

    Raises:
        ValueError: anything the run's checks refuse, a run directory holding a different run
            or being written by another process.
        ~pyromtl.errors.TrainingError: the loss became NaN or infinite.
    """
    if out is None:
        return _fit_spec(RunSpec.build(method, cfg, data, None, backbone))
    if collective.world_size(cfg) > 1 and collective.node_rank() > 0:
        # another machine of a multi-machine run: the one with NODE_RANK 0 holds the lock and writes
        return _fit_spec(RunSpec.build(method, cfg, data, out, backbone))
    with RunDir(out).writing():
        return _fit_spec(RunSpec.build(method, cfg, data, out, backbone))


def _fit_spec(spec: RunSpec) -> Fit:
    """Train (or reopen, or finish saving) the run ``spec`` describes; save it into its directory."""
    if spec.complete:
        done = _restore(spec)
        done.train_info["complete"] = True
        return done
    finishing = spec.trained
    result: TrainResult = train(spec)
    info = {
        "steps": result.steps,
        "seconds": round(result.seconds, 3),
        "final_loss": result.final_loss,
        "best_step": result.best_step,
        "best_val_score": result.best_score,
        "selected": result.selected,
        "parameters": sum(p.numel() for p in result.objective.trainable_parameters()),
    }
    f = Fit(
        spec=spec,
        objective=result.objective,
        state=result.state,
        train_info=info,
        history=result.history,
        trained_in=spec.run.path if spec.run is not None else None,
    )
    if spec.run is not None:
        f.save(spec.run.path)
    if finishing:  # not part of the run's record: metrics.json keeps the training's
        f.train_info = {**info, "finished_save": True}
    return f


def _restore(spec: RunSpec) -> Fit:
    """The :class:`Fit` a run directory holds: its checkpoint's kept state, and its ``metrics.json``."""
    run, saved = spec.run, spec.checkpoint
    if run is None or saved is None:
        raise ValueError(f"{run.path if run else 'the run'} holds no checkpoint to reopen")
    state = TrainState(total_steps=spec.total_steps)
    objective = build_objective(spec, state)
    best = saved.get("best") or {}
    try:
        objective.load_state_dict(best.get("state") or saved["objective"])
    except (RuntimeError, KeyError) as err:
        raise ValueError(
            f"{run.checkpoint_path} does not fit data {spec.data.name!r} "
            f"({' '.join(str(err).split())[:200]}); pass the data the run was fitted on"
        ) from None
    objective.eval()
    doc = run.read_metrics() if run.metrics_path.exists() else None
    info = dict(doc["train"]) if doc is not None else {"steps": saved["step"]}
    state.step = info.get("steps", 0)
    return Fit(
        spec=spec,
        objective=objective,
        state=state,
        train_info=info,
        history=list(saved.get("history", [])),
        trained_in=run.path,
        _doc=doc,
    )


@local_params
def load(
    run_dir: str | Path,
    data: MultiTaskData | None = None,
    device: str | None = None,
    backbone: BackboneObject | None = None,
) -> Fit:
    """Rebuild a saved :class:`Fit` from its run directory.

    Embedded and benchmark datasets are rebuilt from the config; a custom ``MultiTaskData``
    must be passed as ``data``, and a backbone given from Python as ``backbone`` (a registered
    one is found by its name, once the module that registers it is imported).

    :param run_dir: a directory written by :meth:`Fit.save` or ``pyromtl fit``.
    :param data: the data the run was fitted on, where it is not a registered dataset.
    :param device: where to load it (default: the run's own device setting).
    :param backbone: the backbone object the run was fitted with, where it was given from Python.
    :returns: the fit, as it was saved; nothing is trained.
    :raises ValueError: the directory is not a complete run, is being written by another
        process, or names a method, prior kind, dataset or network that is not registered.
    """
    run = RunDir(run_dir)
    for path in (run.config_path, run.checkpoint_path):
        if not path.exists():
            raise ValueError(f"{run.path} is not a pyromtl run directory (no {path.name})")
    with run.reading():
        return _load(run, data, device, backbone)


def _load(run: RunDir, data: MultiTaskData | None, device: str | None, backbone: BackboneObject | None) -> Fit:
    raw = run.read_config()
    name = raw.pop("method", "")
    if name not in methods.available():
        raise ValueError(
            f"unknown method {name!r} in {run.path}: a run of your own method reopens once the module that "
            "registers it is imported (on the command line, pass --import MODULE)"
        )
    m = methods.get(name)
    if data is None:
        from pyromtl import datasets

        name = raw.get("data", "")
        if name not in datasets.available():
            raise ValueError(
                f"{run.path} was fitted on data {name!r}, which is not a registered dataset: reopen it "
                "with pyromtl.load(RUN, data=...) from Python, or register a builder of that name "
                "(pyromtl.datasets.register) in a module and pass --import MODULE"
            )
    if device is not None:
        raw["device"] = device
    return _restore(RunSpec.build(m, config_mod.resolve(m, raw, data=data), data, run.path, backbone))
