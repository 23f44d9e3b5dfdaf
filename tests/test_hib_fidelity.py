"""HIB's fidelity to the paper where a unit test of the model and guide cannot see it: the trainer's step.

``tests/test_hib.py`` already fails fast if eq. 11's distance reads σ² or the marginal's ξ²
instead of log σ², if the learned marginal q_j = N(0, ξ_j²) (eq. 7-8) is detached from the KL,
or if the default β moves (each change was planted in the library and caught; see the HIB
issue's report). What it does not see is a marginal whose parameters get the KL's gradient but
never reach the trainer's optimiser (a prior site not registered as a submodule, or its lazily
made parameters created after the optimiser is built): ξ_j then stays at its start, 1, for the
whole run, and q_j is not learned. The test here takes the trainer's first step and checks
where ξ_j went against the KL's gradient computed by hand.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from pyromtl import config, methods
from pyromtl.runspec import RunSpec
from pyromtl.schedules import TrainState
from pyromtl.train import build_training
from tests.conftest import TINY, mixed_simo

#: ξ_j's start: HIB's default marginal is ``learned_normal`` with ``scale = 1`` (stored as log ξ_j).
XI_START = 1.0


@pytest.fixture(autouse=True)
def _local_params():
    with pyro.settings.context(module_local_params=True):
        yield


def adam_first_step(grad: torch.Tensor, lr: float, clip: float) -> torch.Tensor:
    """The change Adam's first step makes (Pyro's ClippedAdam: betas 0.9, 0.999, eps 1e-8, no decay)."""
    grad = grad.clamp(-clip, clip)
    root = math.sqrt(1 - 0.999)
    return -lr * root * grad / (root * grad.abs() + 1e-8)


def test_the_trainers_step_moves_the_learned_marginal_along_its_kl_gradient():
    """After one step, log ξ_j moved by Adam's first step on ∂KL/∂log ξ_j = β (N/B) Σ_b [1 − (σ_j² + z_b²)/ξ_j²].

    Fails if the marginal is not in the trainer's optimiser or is detached (it would not move),
    or if the KL's sign or ξ's place in it is wrong (it would move the wrong way where the
    gradient's two terms disagree: the test's σ_j² lie on both sides of 1 − z²).
    """
    data = mixed_simo()
    hib = methods.get("hib")
    # log σ_j² starts at N(0, 1), not 0.01·N(0, 1), so the gradient takes both signs
    cfg = config.resolve(hib, {**TINY, "latent_dim": 4, "lr": 0.01, "init_log_var_std": 1.0}, data=data)
    assert cfg["beta"] == 0.1 and cfg["task_beta"] == {} and cfg["kl_weight"] == 1.0
    spec = RunSpec.build(hib, cfg, data)

    # the trainer's start and first step (pyromtl.train.train): seed, build, draw, step
    seed = int(cfg["seed"])
    pyro.set_rng_seed(seed)
    objective, optim = build_training(spec, TrainState(total_steps=spec.total_steps))
    model, guide = objective.model, objective.guide
    assert "scale" in model.w_prior.params, "the marginal's ξ_j must exist before the optimiser is built"
    log_xi = model.w_prior.params["scale"]  # log ξ_j, [T, 1, D]
    torch.testing.assert_close(log_xi.detach(), torch.full_like(log_xi, math.log(XI_START)))
    batch = data.train_batch(cfg["batch_size"], torch.Generator().manual_seed(seed), "cpu")
    with torch.no_grad():
        z = guide.represent(batch)[0]  # [B, D]: SIMO, one Z for every task
        ratio = (guide.log_var.exp()[:, None] + z.square()) / XI_START**2  # [T, B, D]
        grad = cfg["beta"] * batch.scale[:, :, None] * (1.0 - ratio).sum(1, keepdim=True)  # [T, 1, D]
    assert grad.abs().min() > 1e-3  # every element's direction is decided
    assert (grad > 0).any() and (grad < 0).any()  # both directions occur
    expected = log_xi.detach() + adam_first_step(grad, cfg["lr"], cfg["clip_norm"])

    objective.train()
    optim.zero_grad(set_to_none=True)
    objective.backward(batch)
    optim.step()
    torch.testing.assert_close(log_xi.detach(), expected, rtol=0.0, atol=1e-5)
