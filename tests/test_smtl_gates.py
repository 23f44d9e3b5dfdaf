"""SMTL's gates decide (issue 29): a task that needs its private encoder drives its α_t towards 0
under the soft (eq. 1) and the straight-through (eq. 3-4) gates, at the gates' own step size
``gate_lr``; at the trainer's step size (the old behaviour) they stay near the tie."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import pyromtl
from pyromtl import config, methods
from pyromtl.data.core import MultiTaskData
from pyromtl.runspec import RunSpec
from pyromtl.train import train
from tests.conftest import TINY, built, mixed_simo

#: A one-dimensional latent: the public encoder can carry one direction, and three noisy tasks on
#: ``x_0`` pull it there, so the fourth task (``b``, on ``x_1``) is served only by its private one.
SMALL = {"latent_dim": 1, "hidden": [], "eval_every": 50, "eval_samples": 2, "quiet": True, "device": "cpu"}


def _one_task_apart(n: int = 120, dim: int = 20, seed: int = 0) -> MultiTaskData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    y = {f"a{i}": x[:, 0] + rng.normal(size=n) for i in range(3)}
    y["b"] = x[:, 1] + 0.1 * rng.normal(size=n)
    return MultiTaskData.from_arrays(x, y, "regression", name="one-apart")


def _alpha(fit: pyromtl.Fit) -> np.ndarray:
    return fit.model.alpha().detach().numpy()


@pytest.mark.parametrize("name", ["smtl", "lsmtl"])
def test_the_task_that_needs_its_private_encoder_gates_it_in(name: str) -> None:
    torch.set_num_threads(1)
    data = _one_task_apart()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = pyromtl.fit(name, data, seed=0, steps=200, gate_init=0.5, **SMALL)  # from the tie
        old = pyromtl.fit(name, data, seed=0, steps=200, gate_init=0.5, gate_lr=3e-3, **SMALL)
    b = data.task_names.index("b")
    assert _alpha(default)[b] < 0.15  # private: α_t has left the tie for 0
    assert 0.3 < _alpha(old)[b] < 0.6  # the trainer's step size: still near 0.5 after 200 steps
    # the run's history tracks α_t per task over training
    logged = [h["alpha/b"] for h in default.history if "alpha/b" in h]
    assert len(logged) >= 4 and logged[-1] < logged[0]


@pytest.mark.parametrize(
    ("name", "gate_lr", "first"),
    [
        ("smtl", 0.05, 0.05),
        ("lsmtl-c", 0.2, 0.2),
        ("smtl-c", {"start": 0.01, "end": 0.1, "steps": 10}, 0.01),  # a schedule: its value at step 0
    ],
)
def test_joint_gates_step_with_their_own_learning_rate(name: str, gate_lr, first: float) -> None:
    """Adam's first step moves every logit by its step size (sign of its gradient), whatever the
    trainer's ``lr``; the trainer's optimiser does not hold the logits."""
    data = mixed_simo()
    m = methods.get(name)
    options = {**TINY, "steps": 1, "device": "cpu", "gate_lr": gate_lr, "gate_init": 0.5, "lr": 1e-4}
    result = train(RunSpec.build(m, config.resolve(m, options, data=data), data))
    objective = result.objective
    logit = objective.model.gate_logit
    assert id(logit) not in {id(p) for p in objective.trainable_parameters()}
    torch.testing.assert_close(logit.detach().abs(), torch.full((3,), first), rtol=1e-2, atol=0)
    assert logit.grad is None  # cleared after the gates' step: nothing accumulates into the next


def test_lite_gates_start_towards_private_and_soft_gates_at_the_tie() -> None:
    data = mixed_simo()
    for name, alpha in (("smtl", 0.5), ("smtl-c", 0.5), ("lsmtl", 0.25), ("lsmtl-c", 0.25)):
        m = methods.get(name)
        cfg = config.resolve(m, {**TINY, "device": "cpu"}, data=data)
        model, _ = built(m, cfg, data)
        torch.testing.assert_close(model.alpha().detach(), torch.full((3,), alpha))


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("gate_lr", 0.0, "gate_lr"),
        ("gate_lr", -0.1, "gate_lr"),
        ("gate_init", 0.0, "gate_init"),
        ("gate_init", 1.0, "gate_init"),
        ("temperature", 0.0, "temperature"),
        ("gate_lr", {"start": 0.0, "end": 0.1, "steps": 10}, "gate_lr"),
    ],
)
def test_bad_gate_options_fail_before_training(key: str, value, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        config.resolve(methods.get("lsmtl"), {key: value, "device": "cpu"})
