"""A run worked out once: :class:`RunSpec` holds everything the trainer, ``Fit``, the plots and
the CLI need to know about a run, resolved in one place.

:meth:`RunSpec.build` takes a config that :func:`pyromtl.config.resolve` returned (final: the
fraction, the data's name and the root are resolved there) and adds what depends on the machine
and the files: the device, the data as the method trains on it, the step counts, and the
checkpoint to resume, read once. Nothing downstream resolves any of these again.

A spec describes one attempt at a run: after an interruption, build a new one, which reads the
checkpoint the attempt left.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from pyromtl import backbones, collective
from pyromtl.backbones import BackboneObject
from pyromtl.data.core import MultiTaskData
from pyromtl.method import Method, MethodContext
from pyromtl.nn import Backbone
from pyromtl.rundir import RunDir
from pyromtl.schedules import TrainState

#: Config keys that may differ when a run directory's checkpoint is resumed: where and how
#: long to train, not what is trained.
RESUMABLE_KEYS = frozenset({"device", "devices", "num_nodes", "quiet", "steps", "epochs", "checkpoint_every"})


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def steps_per_epoch(cfg: Mapping[str, Any], data: MultiTaskData) -> int:
    """Steps of one pass over the largest task's training split."""
    return math.ceil(max(data.split_sizes("train")) / cfg["batch_size"])


def total_steps(cfg: Mapping[str, Any], data: MultiTaskData) -> int:
    """``steps`` if set, else ``epochs`` passes over the largest task's training split."""
    if cfg["steps"]:
        return int(cfg["steps"])
    return int(cfg["epochs"]) * steps_per_epoch(cfg, data)


@dataclass(frozen=True)
class RunSpec:
    """One run, resolved: build it with :meth:`build`.

    :param method: the method.
    :param config: the final, resolved config (read-only).
    :param data: the data as the method trains on it (its fraction taken, ``prepare_data`` applied).
    :param device: where the run's tensors live.
    :param total_steps: the run's length in optimiser steps.
    :param steps_per_epoch: steps of one pass over the largest task's training split.
    :param run: the run directory that checkpoints and outputs go to, if any.
    :param checkpoint: the checkpoint in ``run`` that this run resumes (read once, on the CPU),
        or ``None`` to start afresh.
    :param backbone: the network in front of the method's own parts (:mod:`pyromtl.backbones`).
    """

    method: Method
    config: Mapping[str, Any]
    data: MultiTaskData
    device: torch.device
    total_steps: int
    steps_per_epoch: int
    run: RunDir | None = None
    checkpoint: Mapping[str, Any] | None = None
    backbone: Backbone = field(default_factory=Backbone)

    @classmethod
    def build(
        cls,
        method: Method,
        config: Mapping[str, Any],
        data: MultiTaskData | None = None,
        out: str | Path | None = None,
        backbone: BackboneObject | None = None,
    ) -> RunSpec:
        """Resolve a run of ``method`` under the resolved ``config``.

        ``data`` is a custom :class:`MultiTaskData` (else ``config["data"]`` names a dataset).
        ``backbone`` is the object that ``config["backbone"]`` labels, when it was given from Python.
        With ``out``, a checkpoint there is resumed if this config wrote it (else ``ValueError``
        naming the keys that differ). Every check runs here, before anything is trained or written.
        """
        cfg = MappingProxyType(dict(config))
        if data is not None and data.name != cfg["data"]:
            raise ValueError(
                f"the config was resolved for data {cfg['data']!r} but data {data.name!r} was given; "
                "resolve it with pyromtl.config.resolve(..., data=data)"
            )
        device = resolve_device(cfg["device"])
        dataset = _load_data(cfg, data)
        method.check_data(dataset)
        resolved = backbones.resolve(cfg, dataset.info.input_shape, backbone)
        dataset = method.prepare(MethodContext(method, cfg, device=device, data=dataset))
        _check_splits(dataset)
        world = collective.world_size(cfg)
        if world > 1 and device.type == "cuda" and cfg["devices"] > torch.cuda.device_count():
            raise ValueError(f"devices = {cfg['devices']} but torch sees {torch.cuda.device_count()} CUDA device(s)")
        n_steps = total_steps(cfg, dataset)
        run = RunDir(out) if out is not None else None
        checkpoint = _resumable_checkpoint(run, cfg, n_steps) if run is not None else None
        return cls(
            method=method,
            config=cfg,
            data=dataset,
            device=device,
            total_steps=n_steps,
            steps_per_epoch=steps_per_epoch(cfg, dataset),
            run=run,
            checkpoint=checkpoint,
            backbone=resolved,
        )

    def __reduce__(self):
        # A multi-process run sends the spec to its workers. The method goes by its registered
        # name (it holds closures, which do not pickle; the worker imports what registered it),
        # and the read-only config as a dict (a mappingproxy does not pickle).
        from pyromtl import methods

        if self.method.name not in methods.available() or methods.get(self.method.name) is not self.method:
            raise ValueError(
                f"method {self.method.name!r} is not the registered one of that name: register it "
                "(pyromtl.methods.register) to train it on several processes"
            )
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data = dataclasses.replace(self.data, _cache={})  # device copies are made again where needed
        return _unpickle, (fields | {"config": dict(self.config), "method": self.method.name, "data": data},)

    @property
    def complete(self) -> bool:
        """Whether the run directory already holds this run, trained to its end and every file saved."""
        return (
            self.run is not None
            and self.checkpoint is not None
            and self.checkpoint["step"] == self.total_steps
            and self.run.is_complete()
        )

    @property
    def trained(self) -> bool:
        """Whether the checkpoint to resume is already at the run's end (only its files may be missing)."""
        return self.checkpoint is not None and self.checkpoint["step"] == self.total_steps

    def context(self, state: TrainState | None = None) -> MethodContext:
        """The method's context for this run (``state``: the model's training state; fresh if none)."""
        state = state if state is not None else TrainState(total_steps=self.total_steps)
        return MethodContext(
            self.method, self.config, device=self.device, state=state, data=self.data, backbone=self.backbone
        )


def _unpickle(fields: dict[str, Any]) -> RunSpec:
    from pyromtl import methods

    return RunSpec(**(fields | {"config": MappingProxyType(fields["config"]), "method": methods.get(fields["method"])}))


def _load_data(cfg: Mapping[str, Any], data: MultiTaskData | None) -> MultiTaskData:
    """The data of a resolved config: ``data`` re-split to the config's fraction, or the named dataset."""
    from pyromtl import datasets

    if data is not None:
        return data.with_fraction(cfg["fraction"], cfg["seed"])
    options = {"root": cfg["root"]} if cfg["root"] else {}
    return datasets.load(cfg["data"], fraction=cfg["fraction"], seed=cfg["seed"], **options)


def _check_splits(data: MultiTaskData) -> None:
    """Every task needs test rows (metrics) and training rows; say which lacks them before training."""
    for split in ("train", "test"):
        empty = [name for name, n in zip(data.task_names, data.split_sizes(split)) if n == 0]
        if empty:
            raise ValueError(
                f"task(s) {', '.join(map(repr, empty))} of {data.name!r} have no {split} rows; "
                "give each task more samples or explicit splits"
            )


def _resumable_checkpoint(run: RunDir, cfg: Mapping[str, Any], n_steps: int) -> dict[str, Any] | None:
    """The checkpoint in ``run`` if this resolved config wrote it (else ``ValueError``), or None.

    A run directory is one run: its checkpoint is resumed only by the config that wrote it,
    compared after both are resolved, and only by a run at least as long.
    """
    if not run.has_checkpoint():
        return None
    saved = run.read_checkpoint()
    old = saved.get("config", {})
    changed = sorted(k for k in set(old) | set(cfg) if k not in RESUMABLE_KEYS and old.get(k) != cfg.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {cfg.get(k)!r}" for k in changed)
        raise ValueError(
            f"{run.path} holds a run with a different config ({diffs}); pass another run directory or remove it"
        )
    if saved["step"] > n_steps:
        raise ValueError(
            f"{run.checkpoint_path} holds {saved['step']} steps, more than the {n_steps} asked; "
            "ask for at least as many, or pass another run directory"
        )
    return saved
