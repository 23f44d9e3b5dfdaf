"""VMTL's z prior with a random subset of the other tasks' components (option ``z_components``).

With ``z_components = k < T - 1`` each training sample encodes ``q_φ(z | f(x_tn, D_i))`` (eq. 9)
for k other tasks drawn uniformly without replacement, and the KL bound ``Σ_i β_ti KL(q ‖ q_i)``
(eq. 11) is estimated by ``Σ_{i∈S} β_ti (T-1)/k KL(q ‖ q_i)``. These tests check that the
estimate is unbiased in value and gradient, that ``k >= T - 1`` is the exact bound, that the
step encodes ``T·B·k`` rows, and that invalid settings fail with a clear message.
"""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine

import pyromtl
from pyromtl.distributions import TaskMixture
from tests.conftest import blobs_mimo
from tests.test_vmtl import SMALL, build, diag_kl, elbo, train_batch, without_y

#: Noise-free β = softmax(π), so the component subset is the estimate's only randomness; w a point
#: estimate (flat prior), so the KL terms are z's alone.
Z_ONLY = {"z": {"weights": "learned"}, "w": "deterministic"}


@pytest.fixture(autouse=True)
def _local_params():
    pyro.set_rng_seed(0)
    with pyro.settings.context(module_local_params=True):
        yield


def _kl_loss_and_grads(model, guide, cfg, batch, params: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    """The KL terms of the ELBO (likelihood hidden) and their gradient w.r.t. ``params``, flattened."""
    loss = elbo("method", cfg).differentiable_loss(without_y(model), guide, batch)
    grads = torch.autograd.grad(loss, params)
    return loss.item(), torch.cat([g.flatten() for g in grads])


def test_sampled_estimate_is_unbiased_in_value_and_gradient():
    """Mean of many k-of-(T-1) estimates = the exact bound, for the loss, π and the guide's encoder."""
    data = blobs_mimo(num_tasks=6)
    T, k = data.num_tasks, 2
    model, guide, cfg = build(data=data, priors=Z_ONLY, z_components=k)
    batch = train_batch(data)
    elbo("method", cfg).loss(model, guide, batch)  # creates π
    pi = model.z_prior.params["logits"]
    with torch.no_grad():
        pi.copy_(torch.randn(pi.shape, generator=torch.Generator().manual_seed(1)))  # non-uniform β
    params = [pi, *guide.encoder.parameters()]

    model.z_num_components = T - 1
    exact_loss, exact_grad = _kl_loss_and_grads(model, guide, cfg, batch, params)
    model.z_num_components = k
    draws = [_kl_loss_and_grads(model, guide, cfg, batch, params) for _ in range(200)]
    losses = torch.tensor([d[0] for d in draws], dtype=torch.float64)
    grads = torch.stack([d[1] for d in draws]).double()
    n = len(draws)

    assert losses.std() > 0.01 * abs(exact_loss)  # a real random estimate, not the exact bound again
    assert abs(losses.mean() - exact_loss) < 4 * losses.std() / n**0.5
    # Without the (T-1)/k importance weights the mean would be k/(T-1) = 2/5 of the z term: far out.
    err = (grads.mean(0) - exact_grad.double()).abs()
    margin = 5 * grads.std(0) / n**0.5 + 1e-6 * exact_grad.abs().max()
    n_pi = pi.numel()
    assert (exact_grad[:n_pi].abs() > 0).all() and (exact_grad[n_pi:].abs() > 0).any()
    assert (err[:n_pi] <= margin[:n_pi]).all(), "∂/∂π is biased"
    assert (err[n_pi:] <= margin[n_pi:]).all(), "∂/∂φ (guide encoder) is biased"


@pytest.mark.parametrize("k", [4, 100])
def test_enough_components_give_the_exact_bound(k):
    """k >= T - 1: every other task, no random draw, and the bound of eq. 11 over all T components."""
    data = blobs_mimo(num_tasks=5)
    T = data.num_tasks
    model, guide, cfg = build(data=data, z_components=k)
    batch = train_batch(data)

    rng = torch.get_rng_state()
    (loc, _scale), extras = model.z_prior_inputs(batch)
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn
    assert loc.shape == (T, batch.size, T - 1, cfg["latent_dim"])  # the own task (weight 0) skipped
    assert extras["component_inclusion"] == 1.0

    pyro.set_rng_seed(3)
    loss = elbo("method", cfg).loss(without_y(model), guide, batch)
    pyro.set_rng_seed(3)
    guide_tr = poutine.trace(guide).get_trace(batch)
    model_tr = poutine.trace(poutine.replay(without_y(model), trace=guide_tr)).get_trace(batch)
    alpha, beta = model_tr.nodes["w_weights"]["value"], model_tr.nodes["z_weights"]["value"]
    assert model_tr.nodes["z"]["fn"].sampled is False
    with torch.no_grad():  # the bound from all T components, the own one at weight 0 (as before the option)
        w_loc, w_scale = (v.squeeze(1) for v in guide.w_post())
        bound_w = (alpha * diag_kl(w_loc[:, None], w_scale[:, None], w_loc[None], w_scale[None], 2)).sum(-1)
        z_loc, z_scale = guide.encoder(batch.x, False)
        attended = model.attention(batch.index)  # [T, B, T, D]
        c_loc, c_scale = guide.encoder(attended.reshape(T, -1, attended.shape[-1]), False)
        c_loc = c_loc.reshape(*attended.shape[:3], -1)
        c_scale = c_scale.clamp_min(cfg["z_component_min_scale"]).reshape(*attended.shape[:3], -1)
        bound_z = (beta[:, None, :] * diag_kl(z_loc.unsqueeze(2), z_scale.unsqueeze(2), c_loc, c_scale, 1)).sum(-1)
    expected = (
        cfg["kl_weights"]["w"] * bound_w.sum() + cfg["kl_weights"]["z"] * (bound_z * batch.scale * batch.mask).sum()
    )
    assert loss == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("T", [4, 8, 16])
def test_a_step_encodes_T_B_k_rows(T):
    """Encoder rows per training step: T·B for q(z|x), T·B·min(k, T-1) for the prior, linear in T."""
    k, B = 3, 8
    data = blobs_mimo(num_tasks=T, n=30)
    model, guide, cfg = build(data=data, z_components=k)
    batch = train_batch(data, size=B)
    rows: list[int] = []
    handle = guide.encoder.net.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[:-1].numel()))
    try:
        loss = elbo("method", cfg).differentiable_loss(model, guide, batch)
    finally:
        handle.remove()
    assert sorted(rows) == sorted([T * B, T * B * min(k, T - 1)])
    assert sum(rows) == T * B * (1 + min(k, T - 1))
    loss.backward()  # and the step runs through
    sampled = model.z_prior.build(
        batch_shape=(T, B),
        event_shape=(cfg["latent_dim"],),
        num_tasks=T,
        state=model.state,
        components=model.z_prior_inputs(batch)[0],
        task_axis=-2,
        extras=model.z_prior_inputs(batch)[1],
    )
    assert isinstance(sampled, TaskMixture) and sampled.sampled == (k < T - 1)


def test_outside_training_every_component_is_the_samples_own_posterior():
    """Eval batches: no draw, no extras, T copies of q(z|x) (predictions use the guide anyway)."""
    data = blobs_mimo(num_tasks=6)
    model, guide, cfg = build(data=data, z_components=2)
    batch = next(data.eval_batches("test", "cpu"))
    rng = torch.get_rng_state()
    (loc, scale), extras = model.z_prior_inputs(batch)
    assert torch.equal(torch.get_rng_state(), rng) and extras == {}
    own_loc, own_scale = guide.encoder(batch.x, False)
    assert loc.shape == (6, batch.size, 6, cfg["latent_dim"])
    assert torch.equal(loc, own_loc.unsqueeze(2).expand_as(loc)) and torch.equal(
        scale, own_scale.unsqueeze(2).expand_as(scale)
    )


@pytest.mark.parametrize("k", [0, -1])
def test_invalid_z_components_is_refused(k):
    with pytest.raises(ValueError, match="z_components"):
        pyromtl.fit("vmtl", blobs_mimo(), steps=1, device="cpu", z_components=k, **SMALL)


def test_monte_carlo_kl_needs_every_component():
    """The exact mixture KL cannot come from a subset: refused before training, unless k >= T - 1."""
    data = blobs_mimo(num_tasks=5)
    mc = {"z": {"kl": "monte_carlo"}}
    with pytest.raises(ValueError, match=r"monte_carlo.*z_components >= 4"):
        build(data=data, priors=mc, z_components=2)
    model, guide, cfg = build(data=data, priors=mc, z_components=4)
    assert torch.isfinite(elbo("method", cfg).differentiable_loss(model, guide, train_batch(data)))
