"""VMTL's learned relatedness (issue 30): α separates known clusters at the default settings, and
the option that gives the mixture logits π (eq. 7) their own learning rate is checked before
training and leaves the loss and its gradients alone."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch

import pyromtl
from pyromtl import config, methods
from pyromtl.data import MultiTaskData
from pyromtl.data.digit_tasks import clustered_tasks
from pyromtl.data.embedded import _arrays
from pyromtl.objective import TrainContext
from pyromtl.runspec import RunSpec
from pyromtl.train import build_training
from tests.conftest import TINY, blobs_mimo


@pytest.fixture(autouse=True)
def _local_params():
    pyro.set_rng_seed(0)
    with pyro.settings.context(module_local_params=True):
        yield


def digits_permuted(seed: int = 0) -> MultiTaskData:
    """6 MIMO digit tasks in 2 clusters of 3: cluster 1 labels digit d as (d + 5) mod 10."""
    arrays = _arrays("plain")  # the embedded digits, from the on-disk cache
    xs, ys, names, ncls, rel = clustered_tasks(arrays["x"], arrays["digit"], "permuted")
    return MultiTaskData.from_arrays(
        xs, ys, "classification", names, num_classes=ncls, relatedness=rel, name="digits-permuted", seed=seed
    )


def margin(weights: np.ndarray, related: np.ndarray) -> float:
    """Mean over tasks of (mean weight on same-cluster tasks) − (mean weight on the others), diagonal excluded."""
    off = ~np.eye(len(weights), dtype=bool)
    same, cross = related.astype(bool) & off, ~related.astype(bool) & off
    return float(np.mean([weights[t, same[t]].mean() - weights[t, cross[t]].mean() for t in range(len(weights))]))


def test_alpha_and_beta_separate_the_clusters_at_the_default_settings():
    """VMTL's defaults (100 steps at 10% of train, lr 3e-3, λ = 1e-2, τ 5 → 0.5, the default
    ``mixture_lr_scale``) but 2 x 2 draws instead of 10 x 10 and no validation, for speed (~1 s).

    Uniform weights give a margin of 0, all of a task's mass on its 2 cluster partners 0.5.
    With one optimiser for everything (``mixture_lr_scale = 1``, the paper's setting) the
    margins stay about 0.08 here: Adam moves a logit at most about lr a step, 0.3 in the run.
    """
    data = digits_permuted()
    fit = pyromtl.fit("vmtl", data, fraction=0.1, device="cpu", quiet=True, mc_z=2, mc_w=2, eval_every=1000)
    assert fit.config["mixture_lr_scale"] == methods.get("vmtl").defaults["mixture_lr_scale"]
    rel = fit.data.relatedness
    weights = fit.relatedness()
    assert margin(weights["alpha"], rel) > 0.10
    assert margin(weights["beta"], rel) > 0.10


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), "fast", True, None])
def test_a_bad_mixture_lr_scale_is_refused_before_anything_is_built(bad):
    with pytest.raises(ValueError, match="mixture_lr_scale"):
        config.resolve(methods.get("vmtl"), {"mixture_lr_scale": bad}, data=blobs_mimo())


def _objective(scale: float, weights: str = "gumbel_softmax"):
    """The objective and optimiser of vmtl on 3 blob tasks, as the trainer builds them (KL at full weight)."""
    data = blobs_mimo()
    m = methods.get("vmtl")
    cfg = config.resolve(
        m,
        {**TINY, "mc_z": 2, "mc_w": 2, "kl_weight": 1.0, "steps": 10, "mixture_lr_scale": scale},
        {"w": {"weights": weights}, "z": {"weights": weights}},
        data=data,
    )
    spec = RunSpec.build(m, cfg, data)
    torch.manual_seed(0)
    objective, optim = build_training(spec)
    return spec, objective, optim


def _logits(objective) -> list[torch.Tensor]:
    model = objective.model
    return [model.w_prior.params["logits"], model.z_prior.params["logits"]]


@pytest.mark.parametrize("weights", ["gumbel_softmax", "learned"])
def test_the_logits_learning_rate_leaves_the_loss_and_its_gradients_alone_and_scales_their_step(weights):
    """Same loss and gradients whatever ``mixture_lr_scale``; the logits' first Adam step is
    ``lr · mixture_lr_scale`` (Adam's first step is lr times the gradient's sign), the other
    parameters' ``lr``."""
    runs = {}
    for scale in (1.0, 10.0):
        spec, objective, optim = _objective(scale, weights)
        batch = spec.data.train_batch(8, torch.Generator().manual_seed(0), "cpu")
        before = [p.detach().clone() for p in _logits(objective)]
        other = objective.model.w_post.loc.detach().clone()
        optim.zero_grad(set_to_none=True)
        pyro.set_rng_seed(1)
        loss = objective.backward(batch)
        grads = [p.grad.clone() for p in _logits(objective)]
        optim.step()
        objective.after_step(TrainContext(data=spec.data, cfg=spec.config, device=spec.device, generator=None))
        steps = [(p.detach() - b) for p, b in zip(_logits(objective), before)]
        moved = objective.model.w_post.loc.detach() - other
        runs[scale] = (loss, grads, steps, moved, objective)
    (loss1, grads1, steps1, moved1, obj1), (loss10, grads10, steps10, moved10, obj10) = runs[1.0], runs[10.0]
    assert torch.equal(loss1, loss10)
    for g1, g10 in zip(grads1, grads10):
        torch.testing.assert_close(g1, g10)
    lr = obj1.logit_optim if obj1.logit_optim is not None else None
    assert lr is None  # scale 1: the trainer's optimiser steps the logits
    lr = 3e-3  # TrainOptions' default lr
    for s1, s10, g in zip(steps1, steps10, grads1):
        nonzero = g.abs() > 1e-6
        assert nonzero.any()
        torch.testing.assert_close(s1[nonzero].abs(), torch.full_like(s1[nonzero], lr), rtol=1e-3, atol=0)
        torch.testing.assert_close(s10[nonzero].abs(), torch.full_like(s10[nonzero], 10 * lr), rtol=1e-3, atol=0)
    torch.testing.assert_close(moved1, moved10)  # the other parameters take the trainer's step either way
    # the logits are the objective's own at scale 10, the trainer's at scale 1; their gradients are cleared
    logit_ids = {id(p) for p in _logits(obj10)}
    assert logit_ids == {id(p) for p in obj10.own_parameters()}
    assert not logit_ids & {id(p) for p in obj10.trainable_parameters()}
    assert not obj1.own_parameters()
    assert all(p.grad is None for p in _logits(obj10))


def test_the_logits_optimiser_is_checkpointed():
    """A resumed run continues the logits' Adam moments (``get_extra_state``)."""
    spec, objective, optim = _objective(10.0)
    batch = spec.data.train_batch(8, torch.Generator().manual_seed(0), "cpu")
    ctx = TrainContext(data=spec.data, cfg=spec.config, device=spec.device, generator=None)
    optim.zero_grad(set_to_none=True)
    objective.backward(batch)
    optim.step()
    objective.after_step(ctx)
    state = objective.state_dict()
    _, fresh, _ = _objective(10.0)
    fresh.load_state_dict(state)
    saved = objective.logit_optim.state_dict()["state"]
    loaded = fresh.logit_optim.state_dict()["state"]
    assert saved.keys() == loaded.keys() and saved
    for k in saved:
        torch.testing.assert_close(saved[k]["exp_avg"], loaded[k]["exp_avg"])
