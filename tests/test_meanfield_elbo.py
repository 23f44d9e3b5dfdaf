"""MeanFieldELBO computes TraceMeanField_ELBO's loss and gradients while scoring fewer sites."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from pyromtl import methods
from pyromtl.config import resolve
from pyromtl.infer.meanfield import MeanFieldELBO
from pyromtl.schedules import TrainState
from tests.conftest import TINY, blobs_mimo, built, mixed_simo


def _loss_and_grads(elbo_cls, model, guide, batch, num_particles, seed):
    fn = elbo_cls(num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=4)(model, guide)
    torch.manual_seed(seed)
    fn(batch)  # creates lazily built parameters
    for p in fn.parameters():
        p.grad = None
    torch.manual_seed(seed + 1)
    loss = fn(batch)
    loss.backward()
    return loss.detach(), [None if p.grad is None else p.grad.clone() for p in fn.parameters()]


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize(
    "name, simo, extra",
    [
        ("vmtl", False, {}),
        ("vmtl", False, {"priors": {"z": {"kl": "monte_carlo"}}}),  # no closed form: Monte-Carlo KL
        ("vbmtl", True, {"num_particles": 3}),  # vectorised particles
        ("stl", True, {}),  # point-mass guide, flat prior
        ("hib", True, {"task_beta": {"cls": 0.3}}),  # per-task KL scales
        ("mtvib", True, {}),  # a SIMO representation shared by the tasks
        ("lsmtl", True, {}),  # straight-through gates
    ],
)
def test_matches_trace_mean_field_elbo(name, simo, extra, validate):
    data = mixed_simo() if simo else blobs_mimo()
    method = methods.get(name)
    cfg = resolve(method, {**TINY, **extra, "kl_weight": 0.7}, data=data)
    batch = data.train_batch(16, torch.Generator().manual_seed(0), "cpu")
    with pyro.settings.context(module_local_params=True), pyro.validation_enabled(validate):
        state = TrainState(step=50, total_steps=400)  # mid-way through the KL warm-up
        model, guide = built(method, cfg, data, state)
        ref_loss, ref_grads = _loss_and_grads(TraceMeanField_ELBO, model, guide, batch, cfg["num_particles"], 3)
        loss, grads = _loss_and_grads(MeanFieldELBO, model, guide, batch, cfg["num_particles"], 3)
    torch.testing.assert_close(loss, ref_loss)
    assert len(grads) == len(ref_grads)
    for g, ref in zip(grads, ref_grads):
        assert (g is None) == (ref is None)
        if g is not None:
            torch.testing.assert_close(g, ref)


def test_skips_prior_log_density_of_latents_with_a_closed_form_kl():
    calls = []

    class Spy(dist.Normal):
        def log_prob(self, value):
            calls.append(value.shape)
            return super().log_prob(value)

    def model():
        with pyro.plate("n", 3):
            z = pyro.sample("z", Spy(torch.zeros(3), 1.0))
            pyro.sample("y", dist.Normal(z, 1.0), obs=torch.ones(3))

    loc = torch.zeros(3, requires_grad=True)

    def guide():
        with pyro.plate("n", 3):
            pyro.sample("z", dist.Normal(loc, 1.0))

    with pyro.validation_enabled(False):
        loss = MeanFieldELBO().differentiable_loss(model, guide)
    assert calls == []  # KL(Normal, Normal) is analytic: the prior's log_prob is never evaluated
    assert torch.isfinite(loss) and loss.requires_grad


def test_loss_is_a_float_matching_the_differentiable_loss():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))

    def guide():
        pyro.sample("z", dist.Normal(torch.tensor(0.2), 0.8))

    elbo = MeanFieldELBO()
    loss = elbo.loss(model, guide)
    assert isinstance(loss, float)
    torch.testing.assert_close(torch.tensor(loss), elbo.differentiable_loss(model, guide).detach())


def test_lean_traces_hold_the_sites_pyro_records() -> None:
    """Without validation the ELBO's own traces hold exactly Pyro's sample sites, minus the
    plates' subsample sites, with the same values, scales and masks."""
    data = mixed_simo()
    method = methods.get("hib")
    cfg = resolve(method, TINY, data=data)
    batch = data.train_batch(16, torch.Generator().manual_seed(0), "cpu")
    elbo = MeanFieldELBO(max_plate_nesting=2)
    with pyro.settings.context(module_local_params=True), pyro.validation_enabled(False):
        model, guide = built(method, cfg, data)
        torch.manual_seed(0)
        lean_model, lean_guide = elbo._get_trace(model, guide, (batch,), {})
        torch.manual_seed(0)
        guide_tr = pyro.poutine.trace(guide).get_trace(batch)
        model_tr = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_tr)).get_trace(batch)
    for lean, ref in ((lean_model, model_tr), (lean_guide, guide_tr)):
        sample_sites = [n for n, s in ref.nodes.items() if s["type"] == "sample"]
        assert list(lean.nodes) == sample_sites == [n for n in sample_sites if n in ("w", "y")]
        for name in lean.nodes:
            torch.testing.assert_close(lean.nodes[name]["value"], ref.nodes[name]["value"], rtol=0, atol=0)
            assert str(lean.nodes[name]["scale"]) == str(ref.nodes[name]["scale"])
            assert lean.nodes[name]["fn"].batch_shape == ref.nodes[name]["fn"].batch_shape
    assert lean_model.nodes["w"]["value"] is lean_guide.nodes["w"]["value"]  # replayed
