"""No training step or prediction depends on where torch puts tensors made without a device.

Every registered method is trained a few steps on the CPU while torch's default device is
``meta`` (:func:`default_device_after_build`): the model and guide are built, and their lazy
parameters made, as usual; then every tensor made without ``device=`` inside a step (the ELBO,
``backward``, the optimiser, ``after_step``, ``end_epoch``), inside validation and model
selection, and inside ``Fit.predict``, ``to_arviz``, ``relatedness`` and ``metrics`` lands on
``meta``, where mixing it with a CPU tensor raises ("Tensor on device meta is not on the
expected device cpu!") and reading it back (``.item()``) raises too. So a ``torch.zeros(n)``
left in such a path fails here on a CPU-only machine, not on a user's GPU.

One exception, made in the library and explained there: torchjd's PCGrad draws its task orders
with ``torch.randperm(T)`` on the default device while it computes on the CPU;
``pyromtl.infer.weighting.PCGrad`` pins its default device to the CPU (that path is not
checked here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch

import pyromtl
import pyromtl.train
from pyromtl import config, likelihoods, methods
from pyromtl.data import MultiTaskData
from pyromtl.runspec import RunSpec
from tests.conftest import TINY, blobs_mimo, mixed_simo, regression_mimo

#: Read at collection: a newly registered method is checked without a change here.
METHODS = methods.available()

#: Short runs: every step ends an epoch (the data's training splits are below ``batch_size``),
#: so ``end_epoch`` runs at every step, and validation runs twice.
SHORT = {**TINY, "steps": 4, "eval_every": 2, "eval_samples": 1}

#: Options that take a method's default run down a path its defaults would reach only later.
REACH = {"bayesagg": {"pretrain_steps": 1}}  # its aggregation and full-data prior, after pre-training


@contextlib.contextmanager
def default_device_after_build(device: str = "meta") -> Iterator[dict[str, int]]:
    """Within the block, every run's objective is built as usual, then torch's default device
    becomes ``device`` until the block ends: its training steps, validation and everything done
    after it in the block see that default. Yields a counter of the objectives built, so that a
    test sees its run went through the hook."""
    real = pyromtl.train.build_training
    built = {"objectives": 0}

    def build_then_switch(*args: Any, **kwargs: Any):
        out = real(*args, **kwargs)
        built["objectives"] += 1
        torch.set_default_device(device)
        return out

    try:
        with mock.patch.object(pyromtl.train, "build_training", build_then_switch):
            yield built
    finally:
        torch.set_default_device(None)


def _data(name: str) -> MultiTaskData:
    return blobs_mimo() if "mimo" in methods.get(name).settings else mixed_simo()


def images(mimo: bool, n: int = 48, seed: int = 0) -> MultiTaskData:
    """Tiny ``1 x 6 x 6`` images, for the CNN backbone: SIMO with one task of each type, or three
    MIMO classification tasks."""
    rng = np.random.default_rng(seed)
    if mimo:
        xs = [rng.normal(size=(n, 1, 6, 6)) for _ in range(3)]
        return MultiTaskData.from_arrays(xs, [(x[:, 0, 0, 0] > 0).astype(int) for x in xs], "classification")
    x = rng.normal(size=(n, 1, 6, 6))
    y = {
        "cls": (x[:, 0, 0, 0] > 0).astype(int) + (x[:, 0, 1, 1] > 0).astype(int),
        "bin": (x[:, 0, 2, 2] > 0).astype(int),
        "reg": x[:, 0, 3, 3],
    }
    return MultiTaskData.from_arrays(x, y, ["classification", "binary", "regression"])


def _tensors(obj: Any, key: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield key, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{key}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{key}[{i}]")


def fit_and_use(name: str, data: MultiTaskData, **options: Any) -> None:
    """Fit ``name`` under a ``meta`` default device after the build, then predict, export and
    checkpoint it under that default too; every tensor of its checkpoint must be on the CPU."""
    with default_device_after_build() as built:
        fit = pyromtl.fit(name, data, device="cpu", seed=0, **{**SHORT, **options})
        assert built["objectives"] == 1 and torch.empty(()).device.type == "meta"
        fit.predict("test", num_samples=2)
        fit.to_arviz(num_samples=2, split="val")
        fit.relatedness()
        fit.metrics()
        elsewhere = {key: t.device for key, t in _tensors(fit.checkpoint()) if t.device.type != "cpu"}
        assert not elsewhere, elsewhere
        fit.objective.load_state_dict(fit.checkpoint()["objective"])
    assert torch.empty(()).device.type == "cpu"


def test_every_registered_method_is_checked() -> None:
    assert METHODS and set(METHODS) == set(methods.available())
    assert set(REACH) <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_training_and_prediction_make_no_tensor_on_the_default_device(name: str) -> None:
    fit_and_use(name, _data(name), **REACH.get(name, {}))


CNN = {"backbone": "cnn", "conv_channels": [4, 4]}

#: Option paths that the defaults do not take: ``(method, data, options)``.
VARIANTS: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "vmtl-component-subset": ("vmtl", blobs_mimo, {"z_components": 1}),
    "vmtl-learned-weights-monte-carlo": (
        "vmtl",
        blobs_mimo,
        {"z_prior_grad": True, "priors": {"z": {"kind": "task_mixture", "weights": "learned", "kl": "monte_carlo"}}},
    ),
    "vmtl-ac-regression": ("vmtl-ac", regression_mimo, {"z_components": 1}),
    "bayesagg-previous-batch-monte-carlo": (
        "bayesagg",
        mixed_simo,
        {"pretrain_steps": 1, "moments": "monte_carlo", "priors": {"w": "previous_batch"}},
    ),
    "smtl-bilevel": ("smtl", mixed_simo, {"gates": "bilevel"}),
    "lsmtl-bilevel": ("lsmtl", mixed_simo, {"gates": "bilevel"}),
    "lsmtl-c-gate-prior": ("lsmtl-c", mixed_simo, {"priors": {"gate": "relaxed_bernoulli"}}),
    "hib-fixed-noise-simo": ("hib", mixed_simo, {"noise": "fixed"}),
    "hib-released-noise-mean-w": ("hib", blobs_mimo, {"release_noise_at": 2, "predict_w": "mean"}),
    "mtvib-simo": ("mtvib", mixed_simo, {}),
    "vbmtl-learned-priors": (
        "vbmtl",
        blobs_mimo,
        {"priors": {"z": {"kind": "learned_normal", "per_task": True}, "w": "learned_normal"}},
    ),
    "pcgrad-simo": ("pcgrad", mixed_simo, {}),
    "nash-mtl-simo": ("nash-mtl", mixed_simo, {}),
    "dwa-simo": ("dwa", mixed_simo, {}),
    "bayesagg-cnn": ("bayesagg", lambda: images(mimo=False), {"pretrain_steps": 1, **CNN}),
    "vmtl-cnn": ("vmtl", lambda: images(mimo=True), CNN),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_option_paths_make_no_tensor_on_the_default_device(variant: str) -> None:
    name, data, options = VARIANTS[variant]
    fit_and_use(name, data(), **options)


def test_checkpoints_written_under_another_default_device_hold_cpu_tensors(tmp_path) -> None:
    method, data = methods.get("nash-mtl"), mixed_simo()  # its checkpoint holds its warm start
    cfg = config.resolve(method, {**SHORT, "device": "cpu", "checkpoint_every": 2}, data=data)
    spec = RunSpec.build(method, cfg, data, tmp_path)
    assert spec.run is not None
    spec.run.create()
    with default_device_after_build():
        pyromtl.train.train(spec)
    saved = spec.run.read_checkpoint()
    elsewhere = {key: t.device for key, t in _tensors(saved) if t.device.type != "cpu"}
    assert saved["step"] == SHORT["steps"] and not elsewhere, elsewhere


def test_a_tensor_made_without_a_device_in_a_step_fails_the_check(monkeypatch) -> None:
    log_prob = likelihoods.MultiTaskOutput.log_prob

    def planted(self, value: torch.Tensor) -> torch.Tensor:
        out = log_prob(self, value)
        return out + torch.zeros(out.shape[-1])  # the bug: no device=

    monkeypatch.setattr(likelihoods.MultiTaskOutput, "log_prob", planted)
    with pytest.raises(RuntimeError, match="meta"):
        fit_and_use("bmtl", mixed_simo())
    assert torch.empty(()).device.type == "cpu"  # the default is restored after a failure too
    monkeypatch.undo()
    fit_and_use("bmtl", mixed_simo())  # and the same run passes without the planted tensor


def test_a_tensor_made_without_a_device_in_prediction_fails_the_check(monkeypatch) -> None:
    """Prediction is checked too: a device-less tensor there (not in training) fails the check."""
    sample = likelihoods.MultiTaskOutput.sample

    def planted(self, sample_shape=torch.Size()) -> torch.Tensor:
        out = sample(self, sample_shape)
        return out + torch.tensor(0.0)  # the bug: no device=

    monkeypatch.setattr(likelihoods.MultiTaskOutput, "sample", planted)
    with pytest.raises(RuntimeError, match="meta"):
        fit_and_use("stl", mixed_simo())
    assert torch.empty(()).device.type == "cpu"
