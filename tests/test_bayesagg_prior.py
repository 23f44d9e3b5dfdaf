"""BayesAgg-MTL's full-data prior (``BayesAggObjective.end_epoch``): at every epoch's end, the
heads' posterior on every training example under ``N(0, γ² I)``, from one pass of the extractor
as it is then.

Each test trains through the real trainer and compares what the store holds after an epoch's
end with the posterior computed here, independently: the regression head's conjugate posterior
(precision ``XᵀX + I/γ²``, mean ``precision⁻¹ Xᵀy`` with ``X = [h, 1]`` and τ = 1, §3.1) and the
classification heads' Laplace posterior around the heads (one Newton step on the summed negative
log-likelihood plus ``|θ|²/(2γ²)``, with the exact Hessian, by autograd; eq. 8–10). The features
``h`` are those of the training split as ``MultiTaskData.split_arrays`` gives it, in eval mode.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pyro
import pytest
import torch
from torch import Tensor, nn

import pyromtl.train
from pyromtl import backbones, config, methods
from pyromtl.data.core import MultiTaskData
from pyromtl.infer.bayesagg import add_bias
from pyromtl.objective import Objective, TrainContext
from pyromtl.runspec import RunSpec
from tests.conftest import TINY, mixed_simo
from tests.test_bayesagg import GAMMA, _newton_step

# mixed_simo's tasks: 0 "cls" (3 classes), 1 "bin", 2 "reg"; its training split has 54 rows
CLS, BIN, REG = 0, 1, 2
BATCH = 16
PER_EPOCH = math.ceil(54 / BATCH)  # 4 independently drawn batches: some rows unseen, some twice


@pytest.fixture(autouse=True)
def _local_params():
    with pyro.settings.context(module_local_params=True):
        yield


# ----------------------------------------------------------------------------- the exact posterior
def _features(model: Any, data: MultiTaskData) -> tuple[Tensor, list[Tensor]]:
    """``h [N, d]`` (float64) of every training example in eval mode, and each task's labels ``[N]``."""
    xs, ys = data.split_arrays("train")
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            h = model.features(torch.as_tensor(xs[0], dtype=torch.float32)).double()
    finally:
        model.train(training)
    return h, [torch.as_tensor(y, dtype=torch.float64) for y in ys]


def exact_prior(model: Any, data: MultiTaskData) -> tuple[Tensor, Tensor]:
    """``(mean [T, P], precision [T, P, P])`` of the heads on every training example, float64.

    Rows a task does not use keep ``N(0, γ² I)``."""
    h, ys = _features(model, data)
    size = h.shape[1] + 1
    mean = torch.zeros(data.num_tasks, model.size, dtype=torch.float64)
    precision = torch.eye(model.size, dtype=torch.float64).repeat(data.num_tasks, 1, 1) / GAMMA**2
    x = add_bias(h)
    reg_precision = x.T @ x + torch.eye(size, dtype=torch.float64) / GAMMA**2
    mean[REG, :size] = torch.linalg.solve(reg_precision, x.T @ ys[REG])
    precision[REG, :size, :size] = reg_precision
    heads = model.heads.detach()
    for task, kind, rows in ((BIN, "binary", 1), (CLS, "multiclass", 3)):
        want_mean, hessian = _newton_step(h, ys[task], heads[task, :rows], kind)
        mean[task, : rows * size] = want_mean
        precision[task, : rows * size, : rows * size] = hessian
    return mean, precision


def stored_prior(model: Any) -> tuple[Tensor, Tensor, Tensor]:
    """A copy of the store: the full-data ``(mean, precision)`` and the regression mean, float64."""
    assert model.store.full_data is not None and model.store.regression_mean is not None
    mean, precision = model.store.full_data
    return mean.double().clone(), precision.double().clone(), model.store.regression_mean.double().clone()


def assert_exact(got: tuple[Tensor, Tensor, Tensor], want: tuple[Tensor, Tensor], what: str = "") -> None:
    mean, precision, regression = got
    size = regression.shape[-1]
    torch.testing.assert_close(mean, want[0], rtol=1e-4, atol=1e-4, msg=lambda m: f"{what} mean: {m}")
    torch.testing.assert_close(precision, want[1], rtol=1e-5, atol=1e-4, msg=lambda m: f"{what} precision: {m}")
    torch.testing.assert_close(
        regression, want[0][REG : REG + 1, :size], rtol=1e-4, atol=1e-4, msg=lambda m: f"{what} regression mean: {m}"
    )


# ----------------------------------------------------------------------------- training, watched
@contextlib.contextmanager
def watched(freeze: bool = False) -> Iterator[list[Objective]]:
    """Within the block, every run's objective is kept in the list yielded, its extractor frozen
    (``requires_grad_(False)``, so the trainer's optimiser leaves it out) with ``freeze``."""
    real = pyromtl.train.build_objective
    built: list[Objective] = []

    def build(*args: Any, **kwargs: Any) -> Objective:
        objective = real(*args, **kwargs)
        if freeze:
            objective.model.extractor.requires_grad_(False)
        built.append(objective)
        return objective

    with mock.patch.object(pyromtl.train, "build_objective", build):
        yield built


def _cfg(data: MultiTaskData, steps: int, **options: Any) -> dict[str, Any]:
    method = methods.get("bayesagg")
    kind = options.pop("kind", "full_data")
    return config.resolve(
        method,
        {**TINY, "steps": steps, "batch_size": BATCH, "device": "cpu", "eval_every": 1000, **options},
        priors={"w": {"kind": kind, "scale": GAMMA}},
        data=data,
    )


def train_watching(
    steps: int, freeze: bool = False, at_epoch_end: Callable[[Any], Any] | None = None, **options: Any
) -> tuple[list[Any], Objective]:
    """Train bayesagg on ``mixed_simo`` for ``steps``; ``at_epoch_end(model)`` runs right after each
    epoch's end (the trainer's callback follows ``end_epoch``) and its results are returned."""
    data = mixed_simo()
    method = methods.get("bayesagg")
    spec = RunSpec.build(method, _cfg(data, steps, **options), data)
    assert spec.steps_per_epoch == PER_EPOCH
    records: list[Any] = []
    with watched(freeze) as built:

        def callback(done: int, loss: float) -> None:
            if done % PER_EPOCH == 0 and at_epoch_end is not None:
                records.append(at_epoch_end(built[0].model))

        pyromtl.train.train(spec, callback=callback)
    return records, built[0]


def _store_and_exact(model: Any) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]:
    return stored_prior(model), exact_prior(model, mixed_simo())


# ----------------------------------------------------------------------------- the tests
def test_with_a_frozen_extractor_the_prior_is_the_exact_training_set_posterior() -> None:
    """The epoch's batches miss about a third of the rows and repeat others; the prior does not."""
    records, objective = train_watching(2 * PER_EPOCH, freeze=True, at_epoch_end=_store_and_exact, pretrain_steps=2)
    model = objective.model
    assert not any(p.requires_grad for p in model.extractor.parameters())
    assert len(records) == 2
    for epoch, (got, want) in enumerate(records, 1):
        assert_exact(got, want, f"epoch {epoch}")
    # the regression posterior reads only the (frozen) features: the same at both epochs; the
    # classification heads learned, so their Laplace posteriors moved
    (first, _), (second, _) = records
    torch.testing.assert_close(first[2], second[2], rtol=1e-6, atol=1e-6)
    assert (first[0][CLS] - second[0][CLS]).abs().max() > 1e-2
    # the next batch's prior is this posterior
    prior = model.prior()
    torch.testing.assert_close(prior.loc.squeeze(1).double(), model.store.full_data[0].double())


def test_the_prior_is_rebuilt_exactly_at_every_epochs_end_with_that_epochs_extractor() -> None:
    """Refreshed at every epoch's end (not once, nor every other epoch), mean included."""
    records, _ = train_watching(3 * PER_EPOCH, at_epoch_end=_store_and_exact, pretrain_steps=2, lr=1e-2)
    assert len(records) == 3
    for epoch, (got, want) in enumerate(records, 1):
        assert_exact(got, want, f"epoch {epoch}")
    for epoch in (1, 2):  # the extractor moved between epochs, and the prior with it, far beyond the tolerance
        (before, _), (after, _) = records[epoch - 1], records[epoch]
        assert (before[0] - after[0]).abs().max() > 1e-2, f"epochs {epoch} and {epoch + 1}: the same mean"
        assert (before[2] - after[2]).abs().max() > 1e-2, f"epochs {epoch} and {epoch + 1}: the same regression mean"
        assert (before[1] - after[1]).abs().max() > 1e-1, f"epochs {epoch} and {epoch + 1}: the same precision"
    # the regression mean is far from the prior's (zero): the data's, not dropped
    assert records[0][0][2].abs().max() > 0.1


def test_a_first_epoch_of_pretraining_alone_gives_the_exact_prior() -> None:
    """Every step of the first epoch is linear-scalarisation pre-training: the prior at its end
    still exists and is the exact posterior, and the first aggregated step runs under it."""
    records, objective = train_watching(
        PER_EPOCH + 1, at_epoch_end=_store_and_exact, pretrain_steps=PER_EPOCH, checkpoint_every=1000
    )
    assert len(records) == 1
    got, want = records[0]
    assert_exact(got, want, "epoch 1")
    assert objective.diagnostics(), "the step after the pre-training aggregated nothing"


@pytest.mark.parametrize("kind", ["isotropic", "previous_batch"])
def test_other_prior_kinds_still_predict_regression_from_the_training_set_posterior(kind: str) -> None:
    def regression_mean(model: Any) -> tuple[Tensor | None, Tensor, Tensor]:
        assert model.store.full_data is None
        return model.store.regression_mean.double().clone(), exact_prior(model, mixed_simo())[0]

    records, _ = train_watching(PER_EPOCH, at_epoch_end=regression_mean, pretrain_steps=2, kind=kind)
    ((got, want),) = records
    size = got.shape[-1]
    torch.testing.assert_close(got, want[REG : REG + 1, :size], rtol=1e-4, atol=1e-4)


def test_the_pass_runs_in_eval_mode_and_leaves_batchnorm_statistics_alone() -> None:
    """With BatchNorm in the backbone, the prior reads its running statistics and updates none."""
    data = mixed_simo()
    norm_backbone = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU())
    method = methods.get("bayesagg")
    cfg = _cfg(data, PER_EPOCH, pretrain_steps=2, backbone=backbones.label(norm_backbone))
    spec = RunSpec.build(method, cfg, data, backbone=norm_backbone)
    objective, optim = pyromtl.train.build_training(spec)
    model = objective.model
    gen = torch.Generator().manual_seed(0)
    for step in range(3):  # the running statistics move away from their initial values
        model.state.step = step
        optim.zero_grad()
        objective.backward(data.train_batch(BATCH, gen, "cpu"))
        optim.step()
    (norm,) = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    buffers = copy.deepcopy(dict(norm.named_buffers()))
    assert int(buffers["num_batches_tracked"]) == 3
    objective.end_epoch(TrainContext(data, cfg, torch.device("cpu"), gen, step=PER_EPOCH, epoch=1))
    for name, value in norm.named_buffers():
        torch.testing.assert_close(value, buffers[name], rtol=0, atol=0, msg=name)
    assert norm.training, "the pass left the model in eval mode"
    assert_exact(stored_prior(model), exact_prior(model, data))


def test_a_checkpoint_with_the_old_epoch_statistics_still_loads() -> None:
    """Checkpoints from before the pass carried the epoch's collected statistics; they are dropped."""
    _, objective = train_watching(PER_EPOCH, pretrain_steps=2)
    state = objective.state_dict()
    assert "_extra_state" not in state
    old = {**copy.deepcopy(state), "_extra_state": {"stats": {"gram": None, "cross": None, "count": 0}, "seen": None}}
    objective.load_state_dict(old)
    for key, value in objective.state_dict().items():
        if torch.is_tensor(value):
            torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
