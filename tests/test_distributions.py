import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from torch.distributions import kl_divergence

from pyromtl.distributions import TaskMixture


@pytest.fixture(autouse=True)
def _validation():
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield


def random_mixture(batch=(3,), C=4, event=(2, 5), zero=True, kl="upper_bound"):
    weights = torch.rand(*batch, C) + 0.1
    if zero:
        weights[..., 0] = 0.0  # the task's own component, as in VMTL's priors
    weights = weights / weights.sum(-1, keepdim=True)
    loc = torch.randn(*batch, C, *event)
    scale = torch.rand(*batch, C, *event) + 0.2
    return TaskMixture(weights, loc, scale, event_dim=len(event), kl=kl)


def brute_log_prob(m: TaskMixture, value: torch.Tensor) -> torch.Tensor:
    """log Σ_c w_c Π N(value | loc_c, scale_c), one batch element and component at a time."""
    out = torch.empty(m.batch_shape)
    for b in itertools.product(*map(range, m.batch_shape)):
        total = 0.0
        for c in range(m.num_components):
            lp = torch.distributions.Normal(m.loc[b][c], m.scale[b][c]).log_prob(value[b]).sum()
            total += m.weights[b][c].item() * math.exp(lp.item())
        out[b] = math.log(total)
    return out


@pytest.mark.parametrize("batch, event", [((3,), (2, 5)), ((2, 3), (4,)), ((), (3,)), ((5,), ())])
def test_log_prob_matches_brute_force(batch, event):
    m = random_mixture(batch, C=3, event=event)
    assert m.batch_shape == batch and m.event_shape == event
    value = m.sample()
    assert value.shape == batch + event
    torch.testing.assert_close(m.log_prob(value), brute_log_prob(m, value), rtol=1e-5, atol=1e-5)


def test_zero_weight_components_give_no_nan_and_no_influence():
    weights = torch.tensor([0.0, 0.3, 0.7], requires_grad=True)
    loc = torch.randn(3, 4, requires_grad=True)
    scale = torch.rand(3, 4) + 0.5
    m = TaskMixture(weights, loc, scale, event_dim=1)
    value = torch.randn(4)
    lp = m.log_prob(value)
    lp.backward()
    assert torch.isfinite(lp)
    assert torch.isfinite(weights.grad).all() and torch.isfinite(loc.grad).all()
    assert torch.equal(loc.grad[0], torch.zeros(4))  # the weightless component does not matter
    # moving the weightless component changes nothing
    loc2 = loc.detach().clone()
    loc2[0] += 100.0
    torch.testing.assert_close(TaskMixture(weights.detach(), loc2, scale, event_dim=1).log_prob(value), lp.detach())


def test_batch_shape_broadcasts_weights_and_components():
    weights = torch.full((3, 1, 4), 0.25)
    loc = torch.zeros(1, 5, 4, 2)
    m = TaskMixture(weights, loc, torch.ones(4, 2), event_dim=1)
    assert m.batch_shape == (3, 5) and m.event_shape == (2,) and m.num_components == 4


def test_expand_returns_task_mixture():
    m = random_mixture(batch=(1,), C=3, event=(2,))
    e = m.expand((4, 6))
    assert type(e) is TaskMixture
    assert e.batch_shape == (4, 6) and e.event_shape == (2,) and e.kl == m.kl
    value = e.sample()
    torch.testing.assert_close(e.log_prob(value), m.log_prob(value))


def test_plate_keeps_task_mixture():
    m = random_mixture(batch=(), C=3, event=(2,))

    def model():
        with pyro.plate("tasks", 5, dim=-1):
            pyro.sample("x", m)

    tr = pyro.poutine.trace(model).get_trace()
    fn = tr.nodes["x"]["fn"]
    assert type(fn) is TaskMixture and fn.batch_shape == (5,)


def test_sample_moments_match_mean_and_variance():
    m = random_mixture(batch=(2,), C=3, event=(3,))
    x = m.sample((100_000,))
    assert x.shape == (100_000, 2, 3)
    torch.testing.assert_close(x.mean(0), m.mean, atol=0.03, rtol=0)
    torch.testing.assert_close(x.var(0), m.variance, atol=0.06, rtol=0.03)


def test_rsample_is_differentiable_in_loc_only():
    weights = torch.tensor([0.5, 0.5], requires_grad=True)
    loc = torch.zeros(2, 3, requires_grad=True)
    m = TaskMixture(weights, loc, torch.ones(2, 3), event_dim=1)
    assert not m.has_rsample
    m.rsample((10,)).sum().backward()
    assert loc.grad.sum() == 30.0 and weights.grad is None


def guide_normal(batch=(3,), event=(2, 5)):
    return dist.Normal(torch.randn(*batch, *event), torch.rand(*batch, *event) + 0.2).to_event(len(event))


def test_registered_kl_is_the_weighted_sum_of_component_kls():
    m = random_mixture(batch=(3,), C=4, event=(2, 5))
    q = guide_normal((3,), (2, 5))
    kl = kl_divergence(q, m)
    assert kl.shape == (3,)
    expected = torch.zeros(3)
    for c in range(4):
        comp = dist.Normal(m.loc[:, c], m.scale[:, c]).to_event(2)
        expected += m.weights[:, c] * kl_divergence(q, comp)
    torch.testing.assert_close(kl, expected)


def test_nested_independent_and_plain_normal_guides():
    m = random_mixture(batch=(3,), C=4, event=(2, 5))
    q = guide_normal((3,), (2, 5))
    nested = dist.Normal(q.base_dist.loc, q.base_dist.scale).to_event(1).to_event(1)
    torch.testing.assert_close(kl_divergence(nested, m), kl_divergence(q, m))

    m0 = random_mixture(batch=(6,), C=2, event=())
    q0 = dist.Normal(torch.randn(6), torch.ones(6))
    expected = sum(m0.weights[:, c] * kl_divergence(q0, dist.Normal(m0.loc[:, c], m0.scale[:, c])) for c in range(2))
    torch.testing.assert_close(kl_divergence(q0, m0), expected)


def test_event_dim_mismatch_is_a_clear_error():
    m = random_mixture(batch=(3,), C=4, event=(2, 5))
    q = dist.Normal(torch.zeros(3, 2, 5), 1.0).to_event(1)
    with pytest.raises(ValueError, match=r"to_event\(2\)"):
        kl_divergence(q, m)


def test_bound_is_above_monte_carlo_kl():
    m = random_mixture(batch=(4,), C=3, event=(3,))
    q = guide_normal((4,), (3,))
    x = q.sample((200_000,))
    mc = (q.log_prob(x) - m.log_prob(x)).mean(0)
    bound = kl_divergence(q, m)
    se = (q.log_prob(x) - m.log_prob(x)).std(0) / math.sqrt(x.shape[0])
    assert (bound >= mc - 5 * se).all()


def test_monte_carlo_mode_has_no_closed_form():
    m = random_mixture(kl="monte_carlo")
    with pytest.raises(NotImplementedError):
        kl_divergence(guide_normal(), m)
    with pytest.raises(ValueError, match="kl must be one of"):
        random_mixture(kl="exact")


def _mean_field_loss(kl_mode: str, seed: int, q_loc, q_scale, weights, loc, scale, y):
    """ELBO loss of a model with a TaskMixture prior under a plate and a fixed observed site."""

    def model():
        with pyro.plate("task", q_loc.shape[0], dim=-1):
            pyro.sample("w", TaskMixture(weights, loc, scale, event_dim=1, kl=kl_mode))
        pyro.sample("y", dist.Normal(0.0, 1.0).expand(y.shape).to_event(1), obs=y)

    def guide():
        with pyro.plate("task", q_loc.shape[0], dim=-1):
            pyro.sample("w", dist.Normal(q_loc, q_scale).to_event(1))

    pyro.set_rng_seed(seed)
    return TraceMeanField_ELBO().differentiable_loss(model, guide)


def test_trace_mean_field_uses_the_analytic_bound():
    T, d = 4, 3
    q_loc, q_scale = torch.randn(T, d), torch.rand(T, d) + 0.3
    # one weight row shared by all tasks: the plate must expand the mixture (batch () -> (T,))
    weights = torch.tensor([0.0, 0.2, 0.3, 0.5])
    loc, scale = torch.randn(T, d), torch.rand(T, d) + 0.3
    y = torch.randn(5)
    args = (q_loc, q_scale, weights, loc, scale, y)

    loglik = dist.Normal(0.0, 1.0).log_prob(y).sum()
    bound = kl_divergence(dist.Normal(q_loc, q_scale).to_event(1), TaskMixture(weights, loc, scale, event_dim=1)).sum()
    losses = [_mean_field_loss("upper_bound", seed, *args) for seed in (0, 1, 2)]
    for loss in losses:
        torch.testing.assert_close(loss, -loglik + bound)

    mc = [_mean_field_loss("monte_carlo", seed, *args).item() for seed in (0, 1, 2)]
    assert len(set(mc)) == 3  # sampled: varies with the seed


def test_sampled_mixture_estimates_the_bound_and_is_the_renormalised_subset_otherwise():
    """``sampled=True``: importance weights (sum ≠ 1) accepted; the KL bound uses them as given,
    log_prob / sampling / mean use the subset renormalised; the exact MC KL is refused."""
    weights = torch.tensor([[0.3, 0.9], [0.0, 0.0]])  # row 1: a subset without mass
    loc, scale = torch.randn(2, 2, 3), torch.rand(2, 2, 3) + 0.3
    with pytest.raises(ValueError):  # not on the simplex: refused unless sampled
        TaskMixture(weights, loc, scale, event_dim=1)
    m = TaskMixture(weights, loc, scale, event_dim=1, sampled=True)
    assert m.expand((4, 2)).sampled
    with pytest.raises(ValueError, match="kl='monte_carlo' needs every component"):
        TaskMixture(weights, loc, scale, event_dim=1, kl="monte_carlo", sampled=True)
    with pytest.raises(ValueError):
        TaskMixture(-weights, loc, scale, event_dim=1, sampled=True)

    q_loc, q_scale = torch.randn(2, 3), torch.rand(2, 3) + 0.3
    pairs = torch.stack(
        [kl_divergence(dist.Normal(q_loc, q_scale), dist.Normal(loc[:, c], scale[:, c])).sum(-1) for c in range(2)], -1
    )
    torch.testing.assert_close(kl_divergence(dist.Normal(q_loc, q_scale).to_event(1), m), (weights * pairs).sum(-1))

    value = torch.randn(2, 3)
    renormalised = TaskMixture(torch.tensor([[0.25, 0.75], [0.5, 0.5]]), loc, scale, event_dim=1)
    torch.testing.assert_close(m.log_prob(value), renormalised.log_prob(value))
    torch.testing.assert_close(m.mean, renormalised.mean)
    assert m.sample((5,)).shape == (5, 2, 3) and torch.isfinite(m.sample((5,))).all()
