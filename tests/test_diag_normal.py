"""DiagNormal: a diagonal Gaussian with unexpanded parameters, and its registered KLs."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import kl_divergence

from pyromtl.distributions import DiagNormal, TaskMixture
from pyromtl.priors import PriorSite

T, B, D = 3, 5, 4


@pytest.fixture(autouse=True)
def _validation():
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield


def full(d: DiagNormal) -> dist.Independent:
    """The same distribution written the usual way, broadcast to its full shape."""
    return dist.Normal(d.mean, d.stddev).to_event(len(d.event_shape))


def channel(dtype=torch.float64) -> DiagNormal:
    """HIB's layout: loc shared by the tasks [1, B, D], scale shared by the samples [T, 1, D]."""
    loc = torch.randn(1, B, D, dtype=dtype, requires_grad=True)
    scale = (torch.rand(T, 1, D, dtype=dtype) + 0.3).requires_grad_()
    return DiagNormal(loc, scale)


def test_shapes_log_prob_entropy_and_moments_match_the_expanded_normal():
    q = channel()
    assert q.batch_shape == (T, B) and q.event_shape == (D,)
    ref = full(q)
    x = torch.randn(2, T, B, D, dtype=torch.float64)
    torch.testing.assert_close(q.log_prob(x), ref.log_prob(x))
    torch.testing.assert_close(q.entropy(), ref.entropy())
    draws = q.rsample((20000,))
    assert draws.shape == (20000, T, B, D)
    torch.testing.assert_close(draws.mean(0), q.mean, atol=0.05, rtol=0)
    torch.testing.assert_close(draws.var(0), q.variance, atol=0.05, rtol=0.05)
    # reparameterised: the draw's gradient reaches both parameters
    draws[:10].sum().backward()
    assert q.loc.grad is not None and q.scale.grad is not None


def test_explicit_shape_and_event_broadcast():
    p = DiagNormal(torch.zeros(()), torch.full((), 2.0), event_dim=2, shape=(T, 1, B, D))
    assert p.batch_shape == (T, 1) and p.event_shape == (B, D)
    x = torch.randn(T, 1, B, D)
    torch.testing.assert_close(p.log_prob(x), full(p).log_prob(x))
    torch.testing.assert_close(p.entropy(), full(p).entropy())
    with pytest.raises(ValueError, match="do not broadcast"):
        DiagNormal(torch.zeros(2), torch.ones(2), shape=(3,))
    with pytest.raises(ValueError, match="do not broadcast"):
        DiagNormal(torch.zeros(2), torch.ones(3))


@pytest.mark.parametrize("prior_shapes", [((T, 1, D), (T, 1, D)), ((), ()), ((1, 1, D), (T, 1, 1))])
def test_closed_form_kls_match_torch_in_value_and_gradient(prior_shapes):
    q = channel()
    p_loc = torch.randn(prior_shapes[0], dtype=torch.float64, requires_grad=True)
    p_scale = (torch.rand(prior_shapes[1], dtype=torch.float64) + 0.5).requires_grad_()
    p = DiagNormal(p_loc, p_scale, shape=(T, B, D))
    ref = kl_divergence(full(q), full(p))
    params = (q.loc, q.scale, p_loc, p_scale)
    want = torch.autograd.grad(ref.sum(), params)
    for kl in (kl_divergence(q, p), kl_divergence(q, full(p)), kl_divergence(full(q), p)):
        assert kl.shape == (T, B)
        torch.testing.assert_close(kl, ref)
        for g, w in zip(torch.autograd.grad(kl.sum(), params), want):
            torch.testing.assert_close(g, w)


def test_kl_to_an_expanded_prior_and_from_an_event_free_normal():
    q = channel()
    prior = dist.Normal(torch.zeros(T, 1, D, dtype=torch.float64), 2.0).expand((T, B, D)).to_event(1)
    torch.testing.assert_close(kl_divergence(q, prior), kl_divergence(full(q), prior))
    q0 = dist.Normal(torch.randn(T, B), torch.rand(T, B) + 0.5)
    p0 = DiagNormal(torch.zeros(T, 1), torch.full((1, B), 1.5), event_dim=0)
    torch.testing.assert_close(kl_divergence(q0, p0), kl_divergence(q0, dist.Normal(p0.mean, p0.stddev)))
    with pytest.raises(ValueError, match="event shapes"):
        kl_divergence(q, DiagNormal(torch.zeros(T, B, D), torch.ones(T, B, D), event_dim=2))
    # no closed form from a non-Gaussian guide: the mean-field ELBO falls back to Monte Carlo
    with pytest.raises(NotImplementedError):
        kl_divergence(
            dist.Laplace(torch.zeros(T, B, D), 1.0).to_event(1),
            DiagNormal(torch.zeros(()), torch.ones(()), shape=(T, B, D)),
        )


def test_kl_to_a_task_mixture_is_the_bound_of_the_full_normal():
    q = channel(torch.float32)
    weights = torch.softmax(torch.randn(T, B, 2), -1)
    m = TaskMixture(weights, torch.randn(T, B, 2, D), torch.rand(T, B, 2, D) + 0.2, event_dim=1)
    torch.testing.assert_close(kl_divergence(q, m), kl_divergence(full(q), m))


def test_delta_guide_scores_minus_the_log_density():
    p = DiagNormal(torch.zeros(T, 1, D), torch.full((T, 1, D), 0.7), shape=(T, B, D))
    v = torch.randn(T, B, D)
    torch.testing.assert_close(kl_divergence(dist.Delta(v, event_dim=1), p), -full(p).log_prob(v))


def test_plates_keep_the_type_and_the_mean_field_elbo_uses_the_closed_form():
    q = channel(torch.float32)
    prior = DiagNormal(torch.zeros(()), torch.ones(()), shape=(D,))
    assert isinstance(prior.expand((T, B)), DiagNormal)

    def model():
        with pyro.plate("t", T, dim=-2), pyro.plate("b", B, dim=-1):
            pyro.sample("w", prior)

    def guide():
        with pyro.plate("t", T, dim=-2), pyro.plate("b", B, dim=-1):
            pyro.sample("w", q)

    loss = pyro.infer.TraceMeanField_ELBO().differentiable_loss(model, guide)
    torch.testing.assert_close(loss, kl_divergence(full(q), full(prior.expand((T, B)))).sum())


def test_prior_sites_positive_parameters_are_plain_exp_of_the_stored_value():
    site = PriorSite("w", {"kind": "learned_normal", "scale": 0.4, "per_task": True})
    prior = site.build(batch_shape=(T, B), event_shape=(D,), num_tasks=T)
    assert isinstance(prior, DiagNormal) and prior.scale.shape == (T, 1, D)
    raw = dict(site.named_parameters())["params.scale"]
    torch.testing.assert_close(raw, torch.full((T, 1, D), 0.4).log())
    ref = torch.distributions.transform_to(torch.distributions.constraints.positive)(raw)
    assert torch.equal(prior.scale, ref)


@pytest.mark.parametrize("zero_side", ["prior", "guide"])
def test_a_known_zero_loc_gives_the_same_kl_in_value_and_gradient(zero_side):
    q = channel()
    p_scale = (torch.rand(T, 1, D, dtype=torch.float64) + 0.5).requires_grad_()
    p = DiagNormal(torch.zeros(T, 1, D, dtype=torch.float64), p_scale, shape=(T, B, D))
    if zero_side == "guide":  # KL(N(0, σ²) ‖ N(μ, ξ²)): the other loc is the one that counts
        q, p = DiagNormal(torch.zeros((), dtype=torch.float64), q.scale, shape=(T, B, D)), DiagNormal(q.loc, p_scale)
    flagged = DiagNormal(q.loc, q.scale, shape=(T, B, D), zero_loc=zero_side == "guide")
    prior = DiagNormal(p.loc, p.scale, shape=(T, B, D), zero_loc=zero_side == "prior")
    assert prior.expand((2, T, B)).zero_loc == (zero_side == "prior")  # plates keep the promise
    ref = kl_divergence(full(q), full(p))
    params = [t for t in (q.loc, q.scale, p_scale) if t.requires_grad]
    got = kl_divergence(flagged, prior)
    torch.testing.assert_close(got, ref)
    for g, w in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(ref.sum(), params)):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize(
    ("spec", "zero"),
    [
        ({"kind": "normal"}, True),
        ({"kind": "normal", "loc": 1.0}, False),
        ({"kind": "learned_normal", "learn_loc": False}, True),
        ({"kind": "learned_normal"}, False),
        ({"kind": "learned_normal", "learn_loc": False, "loc": 0.5}, False),
    ],
)
def test_gaussian_prior_kinds_promise_a_zero_loc_only_when_it_is_frozen_at_zero(spec, zero):
    prior = PriorSite("w", spec).build(batch_shape=(T, B), event_shape=(D,), num_tasks=T)
    assert prior.zero_loc is zero
    if zero:
        assert not prior.mean.any()


def test_mixture_bound_counts_an_event_dim_that_both_sides_broadcast():
    # q and the components constant along the event (stride-0 views, as plates make them): the
    # bound must equal the one on contiguous copies, not count that dim once
    weights = torch.softmax(torch.randn(T, B, 2, dtype=torch.float64), -1)
    loc, scale = torch.randn(T, B, 2, 1, dtype=torch.float64), torch.rand(T, B, 2, 1, dtype=torch.float64) + 0.2
    q_loc, q_scale = torch.randn(T, B, 1, dtype=torch.float64), torch.rand(T, B, 1, dtype=torch.float64) + 0.3
    broadcast = kl_divergence(
        dist.Normal(q_loc.expand(T, B, D), q_scale.expand(T, B, D)).to_event(1),
        TaskMixture(weights, loc.expand(T, B, 2, D), scale.expand(T, B, 2, D), event_dim=1),
    )
    dense = kl_divergence(
        dist.Normal(q_loc.expand(T, B, D).clone(), q_scale.expand(T, B, D).clone()).to_event(1),
        TaskMixture(weights, loc.expand(T, B, 2, D).clone(), scale.expand(T, B, 2, D).clone(), event_dim=1),
    )
    torch.testing.assert_close(broadcast, dense)
