"""BayesAgg-MTL's tensor building blocks (pyromtl.infer.bayesagg) against independent references.

References: dense per-task solves, NumPyro NUTS, autograd (gradients, Hessians, LBFGS), and
brute-force Monte Carlo. Monte-Carlo comparisons allow Z standard errors, estimated from the
reference draws themselves (a variance's standard error from their fourth central moment).
Everything runs in float64 so rounding never competes with the statistical tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyromtl.infer.bayesagg import (
    GaussianStats,
    add_bias,
    aggregate,
    aggregation_weights,
    classification_gradient,
    classification_moments,
    laplace_as_prior,
    laplace_posterior,
    regression_gradient,
    regression_moments,
    regression_posterior,
    sufficient_stats,
)

DT = torch.float64
#: Standard errors allowed in a Monte-Carlo comparison: about 120 coordinates are compared per
#: test, and a 5-sigma miss has probability 6e-7 each.
Z = 5.0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(g: torch.Generator, batch: int, n: int, scale: float, ridge: float) -> torch.Tensor:
    """Random SPD matrices ``[batch, n, n]`` with strong off-diagonal terms."""
    a = torch.randn(batch, n, n, generator=g, dtype=DT)
    return scale * a @ a.mT / n + ridge * torch.eye(n, dtype=DT)


def _draws(g: torch.Generator, mean: torch.Tensor, cov: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` draws of ``N(mean_k, cov_k)`` for every task, shaped ``[num, *mean.shape]``."""
    eps = torch.randn((num,) + mean.shape, generator=g, dtype=DT)
    flat = eps.reshape(num, mean.shape[0], -1)
    return mean + (torch.linalg.cholesky(cov) @ flat.unsqueeze(-1)).squeeze(-1).view_as(eps)


def _sample_stats(samples: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sample mean and variance of ``[J, ...]`` draws, and their standard errors."""
    num = samples.shape[0]
    mean, var = samples.mean(0), samples.var(0)
    fourth = (samples - mean).pow(4).mean(0)
    return mean, var, (var / num).sqrt(), ((fourth - var.square()).clamp_min(0) / num).sqrt()


def _assert_within(value, ref, se, what, z=Z):
    excess = ((value - ref).abs() / (z * se + 1e-12)).max().item()
    assert excess <= 1, f"{what}: off by {excess * z:.2f} standard errors (allowed {z})"


def _assert_moments_match_draws(mu, var, samples, what, se_factor=1.0):
    """``(mu, var)`` agree with the draws' mean and variance within Z (scaled) standard errors."""
    ref_mean, ref_var, se_mean, se_var = _sample_stats(samples)
    _assert_within(mu, ref_mean, se_factor * se_mean, f"{what} mean")
    _assert_within(var, ref_var, se_factor * se_var, f"{what} variance")


# ----------------------------------------------------------------------------- regression posterior
def _dense_posterior(x, y, prior_mean, prior_precision, noise):
    """Eq. 2 one task at a time with a general solver."""
    means, covs = [], []
    for k in range(y.shape[1]):
        precision = prior_precision[k] + x.T @ x / noise[k] ** 2
        means.append(torch.linalg.solve(precision, prior_precision[k] @ prior_mean[k] + x.T @ y[:, k] / noise[k] ** 2))
        covs.append(torch.linalg.inv(precision))
    return torch.stack(means), torch.stack(covs)


def test_regression_posterior_matches_dense_solve():
    g = _gen(0)
    n, d, k = 30, 4, 3
    h, y = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, k, generator=g, dtype=DT)
    prior_mean = torch.randn(k, d, generator=g, dtype=DT)
    prior_precision = _spd(g, k, d, 2.0, 0.5)
    noise = torch.tensor([0.5, 1.0, 2.0], dtype=DT)

    mean, cov = regression_posterior(h, y, prior_mean, prior_precision, noise)
    ref_mean, ref_cov = _dense_posterior(h, y, prior_mean, prior_precision, noise)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(cov, ref_cov)

    # A shared prior and noise give one precision for every output, broadcast to [K, d, d].
    shared = prior_precision[0]
    mean, cov = regression_posterior(h, y, prior_mean[0], shared, 0.7)
    ref_mean, ref_cov = _dense_posterior(h, y, prior_mean[[0] * k], shared.expand(k, d, d), [0.7] * k)
    assert cov.shape == (k, d, d)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(cov, ref_cov)
    # the noise as a Python number (no tensor ops) and as a 0-dim tensor agree
    for got, want in zip(regression_posterior(h, y, prior_mean[0], shared, torch.tensor(0.7, dtype=DT)), (mean, cov)):
        torch.testing.assert_close(got, want)

    # A scalar prior precision is that multiple of the identity.
    mean, _ = regression_posterior(h, y, 0.0, 3.0)
    identity = torch.eye(d, dtype=DT).expand(k, d, d)
    ref_mean, _ = _dense_posterior(h, y, torch.zeros(k, d, dtype=DT), 3 * identity, [1.0] * k)
    torch.testing.assert_close(mean, ref_mean)


def test_regression_posterior_with_missing_labels():
    """A mask gives each task the posterior of its observed rows only, in one shot and streamed."""
    g = _gen(32)
    n, d, k = 40, 3, 3
    h, y = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, k, generator=g, dtype=DT)
    mask = torch.rand(n, k, generator=g) < 0.6
    y = torch.where(mask, y, float("nan"))
    prior_precision = _spd(g, 1, d, 1.0, 0.5)[0]
    mean, cov = regression_posterior(h, y, 0.1, prior_precision, 0.8, mask=mask)
    for t in range(k):
        rows = mask[:, t]
        ref_mean, ref_cov = regression_posterior(h[rows], y[rows, t : t + 1], 0.1, prior_precision, 0.8)
        torch.testing.assert_close(mean[t], ref_mean[0])
        torch.testing.assert_close(cov[t], ref_cov[0])

    full = mask.clone()
    full[:15] = full[25:] = True  # the chunks without a mask count every row
    want = regression_posterior(h, y.nan_to_num(), 0.1, prior_precision, 0.8, mask=full)
    # summed at the end, or after every chunk (the masked chunk then turns the shared HᵀH into per-task ones)
    for flush_rows in (GaussianStats.flush_rows, 1):
        stats = GaussianStats()
        stats.flush_rows = flush_rows
        stats.update(h[:15], y[:15].nan_to_num(), None)  # a chunk without missing labels first ...
        stats.update(h[15:25], y[15:25], mask[15:25])  # ... then per-task sums from here on
        stats.update(h[25:], y[25:].nan_to_num(), None)
        torch.testing.assert_close(stats.posterior(0.1, prior_precision, 0.8), want)
    # the same sums handed over already made (as a batch posterior's are)
    stats = GaussianStats()
    for rows, chunk_mask in ((slice(0, 15), None), (slice(15, 25), mask[15:25]), (slice(25, n), None)):
        stats.add(*sufficient_stats(h[rows], y[rows].nan_to_num(), chunk_mask), rows=h[rows].shape[0])
    assert stats.count == n
    torch.testing.assert_close(stats.posterior(0.1, prior_precision, 0.8), want)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(5, 2), torch.zeros(4, 3), 0.0, 1.0), "y has shape"),
        ((torch.zeros(5, 2), torch.zeros(5, 3), 0.0, 1.0, 1.0, torch.ones(5, 2)), "mask has shape"),
        ((torch.zeros(5), torch.zeros(5, 3), 0.0, 1.0), "h has shape"),
        ((torch.zeros(5, 2), torch.zeros(5, 3), torch.zeros(2, 2), 1.0), "prior_mean has shape"),
        ((torch.zeros(5, 2), torch.zeros(5, 3), 0.0, torch.eye(3)), "prior_precision has shape"),
        ((torch.zeros(5, 2), torch.zeros(5, 3), 0.0, 1.0, torch.ones(2)), "noise has shape"),
        ((torch.zeros(5, 2), torch.zeros(5, 3), 0.0, 1.0, 0.0), "noise is 0.0"),
    ],
)
def test_regression_posterior_rejects_bad_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        regression_posterior(*args)


def test_posterior_rejects_an_indefinite_precision():
    with pytest.raises(ValueError, match="not positive definite"):
        regression_posterior(torch.zeros(3, 2), torch.zeros(3, 1), 0.0, -torch.eye(2))


def test_streaming_stats_equal_the_one_shot_posterior():
    g = _gen(1)
    d, k = 5, 2
    chunks = [(torch.randn(n, d, generator=g), torch.randn(n, k, generator=g)) for n in (7, 13, 1, 29)]
    h = torch.cat([c[0] for c in chunks]).to(DT)
    y = torch.cat([c[1] for c in chunks]).to(DT)
    stats = GaussianStats()
    stats.flush_rows = 20  # sums after the second chunk and after the fourth
    for chunk in chunks[:3]:
        stats.update(*chunk)
    assert stats.count == 21 and stats.gram is not None  # 20 rows summed, one waiting
    stats.update(*chunks[3])
    assert stats.count == h.shape[0]
    saved = stats.state_dict()
    restored = GaussianStats()
    restored.load_state_dict(saved)
    torch.testing.assert_close(restored.posterior(0.0, 2.0, noise=0.5), stats.posterior(0.0, 2.0, noise=0.5))
    mean, cov = stats.posterior(0.0, 2.0, noise=0.5)
    assert mean.dtype == torch.float32  # the features' dtype; the sums were float64
    ref_mean, ref_cov = regression_posterior(h, y, 0.0, 2.0, noise=0.5)
    torch.testing.assert_close(mean, ref_mean.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cov, ref_cov.float(), rtol=1e-6, atol=1e-7)

    # The full-data posterior as the next prior: updating it with more data is the posterior on all of it.
    first = GaussianStats()
    first.update(h[:20], y[:20])
    updated = regression_posterior(h[20:], y[20:], *first.as_prior(0.0, 2.0))
    torch.testing.assert_close(updated, regression_posterior(h, y, 0.0, 2.0))

    stats.reset()
    with pytest.raises(ValueError, match="no data"):
        stats.posterior()
    stats.update(h[:3], y[:3])
    with pytest.raises(ValueError, match="earlier chunks"):
        stats.update(h[:3, :2], y[:3])
    with pytest.raises(ValueError, match="earlier chunks"):
        stats.add(*sufficient_stats(h[:3, :2], y[:3]), rows=3)
    with pytest.raises(ValueError, match=r"gram \[3, 3\] and cross \[2, 5\]"):
        stats.add(torch.zeros(3, 3), torch.zeros(2, 5), rows=3)


@pytest.mark.slow
def test_regression_posterior_matches_nuts():
    """Eq. 2 with a bias (``add_bias``), a correlated prior and τ ≠ 1 against NumPyro NUTS.

    1 chain of 3000 draws of a 3-d Gaussian: effective sizes are in the thousands, so a mean's
    error is about 0.02 sd and an sd's about 2%; tolerances are 0.1 sd and 8%.
    """
    numpyro = pytest.importorskip("numpyro")
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import numpyro.distributions as nd
    from numpyro.infer import MCMC, NUTS

    numpyro.set_platform("cpu")
    g = _gen(2)
    n, tau = 12, 0.7
    x = add_bias(torch.randn(n, 2, generator=g, dtype=DT))
    y = x @ torch.tensor([1.0, -0.5, 0.3], dtype=DT) + tau * torch.randn(n, generator=g, dtype=DT)
    prior_mean = torch.tensor([0.2, 0.0, -0.1], dtype=DT)
    prior_precision = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=DT)

    # The prior as a whitened transform, w = m_p + L⁻ᵀ z with Λ_p = L Lᵀ and z ~ N(0, I): NUTS on an
    # iid-Normal site compiles in about half the time of a MultivariateNormal one.
    factor = torch.linalg.cholesky(prior_precision)
    whiten = torch.linalg.solve_triangular(factor.mT, torch.eye(3, dtype=DT), upper=True)

    def model(x, y):
        z = numpyro.sample("z", nd.Normal(0.0, 1.0).expand([3]).to_event(1))
        w = numpyro.deterministic("w", jnp.asarray(prior_mean.numpy()) + jnp.asarray(whiten.numpy()) @ z)
        numpyro.sample("y", nd.Normal(x @ w, tau), obs=y)

    mcmc = MCMC(NUTS(model), num_warmup=300, num_samples=3000, num_chains=1, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), jnp.asarray(x.numpy()), jnp.asarray(y.numpy()))
    draws = torch.tensor(np.asarray(mcmc.get_samples()["w"]), dtype=DT)

    mean, cov = regression_posterior(x, y[:, None], prior_mean, prior_precision, tau)
    sd = cov[0].diagonal().sqrt()
    assert ((draws.mean(0) - mean[0]).abs() / sd).max() < 0.1
    assert (draws.std(0) / sd - 1).abs().max() < 0.08
    corr = cov[0] / (sd[:, None] * sd)
    torch.testing.assert_close(torch.corrcoef(draws.T), corr, atol=0.06, rtol=0)


# ----------------------------------------------------------------------------- gradients
def test_regression_gradient_equals_autograd():
    g = _gen(3)
    b, d, k = 6, 4, 3
    h = torch.randn(b, d, generator=g, dtype=DT, requires_grad=True)
    w = torch.randn(2, k, d, generator=g, dtype=DT)  # two draws of every head
    y = torch.randn(b, k, generator=g, dtype=DT)
    formula = regression_gradient(h.detach(), w, y)
    assert formula.shape == (2, b, k, d)
    for j in range(2):
        for t in range(k):
            # sample i's loss depends on h_i only, so differentiating the sum gives per-sample gradients
            loss = (y[:, t] - h @ w[j, t]).square().sum()
            (grad,) = torch.autograd.grad(loss, h)
            torch.testing.assert_close(formula[j, :, t], grad)


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_classification_gradient_equals_autograd(kind):
    g = _gen(4)
    b, d, k, c = 6, 4, 3, 5
    h = torch.randn(b, d, generator=g, dtype=DT, requires_grad=True)
    if kind == "binary":
        w = torch.randn(2, k, d + 1, generator=g, dtype=DT)
        y = (torch.rand(b, k, generator=g) < 0.5).to(DT)
    else:
        w = torch.randn(2, k, c, d + 1, generator=g, dtype=DT)
        y = torch.randint(0, c, (b, k), generator=g)
    formula = classification_gradient(h.detach(), w, y, kind)
    assert formula.shape == (2, b, k, d)
    for j in range(2):
        for t in range(k):
            logits = torch.einsum("bp,...p->b...", add_bias(h), w[j, t])  # [B] or [B, C]
            if kind == "binary":
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[:, t], reduction="sum")
            else:
                loss = torch.nn.functional.cross_entropy(logits, y[:, t], reduction="sum")
            (grad,) = torch.autograd.grad(loss, h)
            torch.testing.assert_close(formula[j, :, t], grad)


# ----------------------------------------------------------------------------- regression moments
def test_regression_moments_match_monte_carlo():
    """Closed-form moments against 10⁵ draws of heads with full, strongly correlated covariances."""
    g = _gen(5)
    b, d, k = 5, 4, 3
    h = torch.randn(b, d, generator=g, dtype=DT)
    mean = torch.randn(k, d, generator=g, dtype=DT)
    cov = _spd(g, k, d, 0.5, 0.05)
    assert (cov - torch.diag_embed(cov.diagonal(dim1=-2, dim2=-1))).abs().max() > 0.1
    y = torch.randn(b, k, generator=g, dtype=DT)
    mu, var = regression_moments(h, mean, cov, y)
    assert mu.shape == var.shape == (b, k, d)
    draws = regression_gradient(h, _draws(g, mean, cov, 100_000), y)
    _assert_moments_match_draws(mu, var, draws, "regression")


def test_regression_moments_without_uncertainty_are_the_plain_gradient():
    g = _gen(6)
    h, mean, y = (
        torch.randn(4, 3, generator=g, dtype=DT),
        torch.randn(2, 3, generator=g, dtype=DT),
        torch.randn(4, 2, generator=g, dtype=DT),
    )
    mu, var = regression_moments(h, mean, torch.zeros(2, 3, 3, dtype=DT), y)
    torch.testing.assert_close(mu, regression_gradient(h, mean, y))
    assert var.abs().max() == 0


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (((4, 3), (2, 3), (2, 3, 3), (4, 3)), "y has shape"),
        (((4, 3), (2, 3), (2, 3, 2), (4, 2)), "cov has shape"),
        (((4, 3), (2, 4), (2, 4, 4), (4, 2)), "mean has shape"),
        (((4, 3, 1), (2, 3), (2, 3, 3), (4, 2)), "h has shape"),
    ],
)
def test_regression_moments_reject_bad_shapes(shapes, match):
    with pytest.raises(ValueError, match=match):
        regression_moments(*(torch.zeros(s) for s in shapes))


# ----------------------------------------------------------------------------- Laplace posterior
B_, D_, K_, C_ = 20, 2, 2, 3


def _classification_problem(kind: str, seed: int):
    """Features, labels, current heads and a full-covariance prior in the ``[w, b]`` layout."""
    g = _gen(seed)
    h = torch.randn(B_, D_, generator=g, dtype=DT)
    if kind == "binary":
        w, b = torch.randn(K_, D_, generator=g, dtype=DT), torch.randn(K_, generator=g, dtype=DT)
        y = (torch.rand(B_, K_, generator=g) < 0.4).to(DT)
        size, event = D_ + 1, (D_ + 1,)
    else:
        w, b = torch.randn(K_, C_, D_, generator=g, dtype=DT), torch.randn(K_, C_, generator=g, dtype=DT)
        y = torch.randint(0, C_, (B_, K_), generator=g)
        size, event = C_ * (D_ + 1), (C_, D_ + 1)
    prior_mean = 0.3 * torch.randn((K_,) + event, generator=g, dtype=DT)
    prior_precision = _spd(g, K_, size, 1.0, 0.5)
    return h, y, w, b, prior_mean, prior_precision


def _neg_log_joint(theta, task, kind, h, y, prior_mean, prior_precision):
    """−log p(y | h, θ) − log p(θ) + const for one task, written with torch's own losses."""
    if kind == "binary":
        nll = torch.nn.functional.binary_cross_entropy_with_logits(add_bias(h) @ theta, y[:, task], reduction="sum")
    else:
        logits = add_bias(h) @ theta.view(C_, D_ + 1).T
        nll = torch.nn.functional.cross_entropy(logits, y[:, task], reduction="sum")
    delta = theta - prior_mean[task].reshape(-1)
    return nll + 0.5 * delta @ prior_precision[task] @ delta


def _theta(w, b):
    return torch.cat([w, b.unsqueeze(-1)], dim=-1).reshape(K_, -1)


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_laplace_mean_is_one_newton_step(kind):
    """Linear heads with canonical links: the GGN is the exact Hessian, so eq. 9 is Newton's step."""
    h, y, w, b, prior_mean, prior_precision = _classification_problem(kind, 7)
    prior_before = prior_precision.clone()
    mean, cov = laplace_posterior(h, y, w, b, prior_mean, prior_precision, kind=kind)
    assert torch.equal(prior_precision, prior_before)  # B̃ accumulates onto a copy of the prior
    theta = _theta(w, b)
    for task in range(K_):

        def objective(t, task=task):
            return _neg_log_joint(t, task, kind, h, y, prior_mean, prior_precision)

        grad = torch.autograd.functional.jacobian(objective, theta[task])
        hessian = torch.autograd.functional.hessian(objective, theta[task])
        torch.testing.assert_close(mean[task].reshape(-1), theta[task] - torch.linalg.solve(hessian, grad))
        torch.testing.assert_close(cov[task], torch.linalg.inv(hessian))
    # Summing over data in chunks changes nothing.
    chunked = laplace_posterior(h, y, w, b, prior_mean, prior_precision, kind=kind, chunk=7)
    torch.testing.assert_close(chunked, (mean, cov))
    assert torch.equal(prior_precision, prior_before)
    prior_mean_next, precision = laplace_as_prior(h, y, w, b, prior_mean, prior_precision, kind=kind)
    torch.testing.assert_close(prior_mean_next, mean)
    torch.testing.assert_close(precision, torch.linalg.inv(cov))


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_laplace_mean_stays_at_a_stationary_point(kind):
    h, y, w, b, prior_mean, prior_precision = _classification_problem(kind, 8)
    optimum = []
    for task in range(K_):
        theta = _theta(w, b)[task].clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [theta], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=0, line_search_fn="strong_wolfe"
        )

        def closure(task=task, theta=theta, opt=opt):
            opt.zero_grad()
            loss = _neg_log_joint(theta, task, kind, h, y, prior_mean, prior_precision)
            loss.backward()
            return loss

        opt.step(closure)
        optimum.append(theta.detach())
    optimum = torch.stack(optimum).view((K_,) + w.shape[1:-1] + (D_ + 1,))
    assert (optimum - _theta(w, b).view_as(optimum)).abs().max() > 0.1  # the start was not stationary
    mean, _ = laplace_posterior(h, y, optimum[..., :-1], optimum[..., -1], prior_mean, prior_precision, kind=kind)
    torch.testing.assert_close(mean, optimum, atol=1e-8, rtol=0)


def test_laplace_posterior_rejects_bad_input():
    h, y, w, b, prior_mean, prior_precision = _classification_problem("multiclass", 9)
    with pytest.raises(ValueError, match="kind"):
        laplace_posterior(h, y, w, b, prior_mean, prior_precision, kind="ordinal")
    with pytest.raises(ValueError, match="w_hat"):
        laplace_posterior(h, y, w[..., :1], b, prior_mean, prior_precision, kind="multiclass")
    with pytest.raises(ValueError, match="integer class"):
        laplace_posterior(h, y.to(DT), w, b, prior_mean, prior_precision, kind="multiclass")
    with pytest.raises(ValueError, match="prior_precision"):
        laplace_posterior(h, y, w, b, prior_mean, prior_precision[:, :3, :3], kind="multiclass")


# ----------------------------------------------------------------------------- classification moments
def _posterior_for_moments(kind: str, seed: int):
    """A broad posterior (logit sds of order 1–2), so gradients vary a lot between draws."""
    g = _gen(seed)
    b, d, k, c = 5, 4, 3, 3
    h = torch.randn(b, d, generator=g, dtype=DT)
    if kind == "binary":
        mean = torch.randn(k, d + 1, generator=g, dtype=DT)
        cov = _spd(g, k, d + 1, 0.6, 0.05)
        y = (torch.rand(b, k, generator=g) < 0.5).to(DT)
    else:
        mean = torch.randn(k, c, d + 1, generator=g, dtype=DT)
        cov = _spd(g, k, c * (d + 1), 0.4, 0.05)
        y = torch.randint(0, c, (b, k), generator=g)
    return h, mean, cov, y


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_classification_moments_match_monte_carlo(kind):
    """Both modes against 6·10⁴ brute-force draws of the heads.

    ``monte_carlo`` (independent draws, same number) must agree within √2 reference standard
    errors per unit of Z; binary quadrature is deterministic and multiclass quadrature's error
    is below that of plain draws of the same number, so √2 covers both.
    """
    h, mean, cov, y = _posterior_for_moments(kind, 10)
    num = 60_000
    draws = classification_gradient(h, _draws(_gen(11), mean, cov, num), y, kind)
    for moments in ("monte_carlo", "quadrature"):
        mu, var = classification_moments(
            h, mean, cov, y, kind, moments=moments, num_samples=num, nodes=32, chunk=8192, generator=_gen(12)
        )
        assert mu.shape == var.shape == h.shape[:1] + y.shape[1:] + h.shape[1:]
        _assert_moments_match_draws(mu, var, draws, f"{kind} {moments}", se_factor=math.sqrt(2))


def test_binary_quadrature_converges_in_the_nodes():
    """Logit sds up to 2.7 here: 32 nodes are within 2e-4 of 100 (measured), 16 nodes ten times farther."""
    h, mean, cov, y = _posterior_for_moments("binary", 13)
    exact = classification_moments(h, mean, cov, y, "binary", nodes=100)

    def error(nodes):
        approx = classification_moments(h, mean, cov, y, "binary", nodes=nodes)
        return max(((a - b).abs() / b.abs().clamp_min(1e-3)).max().item() for a, b in zip(approx, exact))

    assert error(32) < 1e-3
    assert error(16) > 5 * error(32)


def test_multiclass_quadrature_beats_plain_monte_carlo_at_equal_draws():
    """Rao–Blackwellising over the logits: the spread of the variance estimate over seeds shrinks."""
    h, mean, cov, y = _posterior_for_moments("multiclass", 14)
    spread = {}
    for moments in ("monte_carlo", "quadrature"):
        runs = torch.stack(
            [
                classification_moments(
                    h, mean, cov, y, "multiclass", moments=moments, num_samples=64, generator=_gen(seed)
                )[1]
                for seed in range(20)
            ]
        )
        spread[moments] = (runs.std(0) / runs.mean(0)).median()
    assert spread["quadrature"] < 0.5 * spread["monte_carlo"], spread


@pytest.mark.parametrize(("points", "mean_bound", "var_bound"), [(None, 0.10, 0.08), (1024, 0.02, 0.02)])
def test_multiclass_moments_are_within_their_stated_error(points, mean_bound, var_bound):
    """The stated error of the logit points (docs/methods/bayesagg.md, "As implemented"): against 2¹⁴ points, the mean's
    relative error (norm over h's coordinates) for the worst row, and the variance's for the
    median row. At the default 64 points: under 10% and 8% (measured: at most 8% and 6% over 20
    scrambles of three such problems); at the paper's 1,024: under 2% for both. The posterior is
    a Laplace one from 64 rows around heads near the truth, as the method builds it."""
    from pyromtl.models.bayesagg import BayesAggOptions

    g = _gen(3)
    rows, d, c = 64, 16, 10
    h = torch.randn(rows, d, generator=g, dtype=DT)
    truth = 0.7 * torch.randn(c, d, generator=g, dtype=DT)
    y = (h @ truth.T + 0.5 * torch.randn(rows, c, generator=g, dtype=DT)).argmax(1)[:, None]
    mean, cov = laplace_posterior(h, y, 0.8 * truth[None], torch.zeros(1, c, dtype=DT), 0.0, 1.0, "multiclass")
    h, y = h[:16], y[:16]
    reference = classification_moments(h, mean, cov, y, "multiclass", num_samples=2**14, chunk=4096, generator=_gen(1))
    count = points if points is not None else BayesAggOptions().num_samples
    got = classification_moments(h, mean, cov, y, "multiclass", num_samples=count, generator=_gen(2))
    mu_err, var_err = (((a - b).norm(dim=-1) / b.norm(dim=-1)) for a, b in zip(got, reference))
    assert mu_err.max() < mean_bound, mu_err.max()
    assert var_err.median() < var_bound, var_err.median()


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_classification_moments_without_uncertainty_are_the_plain_gradient(kind):
    h, mean, cov, y = _posterior_for_moments(kind, 15)
    tiny = 1e-20 * torch.eye(cov.shape[-1], dtype=DT).expand_as(cov)
    mu, var = classification_moments(h, mean, tiny, y, kind, num_samples=8)
    torch.testing.assert_close(mu, classification_gradient(h, mean, y, kind))
    assert var.max() < 1e-9


def test_classification_moments_with_singular_covariances():
    """A rank-1 covariance (binary) and a zero one (multiclass) factorise with jitter in both modes."""
    h, mean, _, y = _posterior_for_moments("binary", 27)
    v = torch.randn(mean.shape, generator=_gen(28), dtype=DT)
    rank_one = v.unsqueeze(-1) * v.unsqueeze(-2)
    mu, var = classification_moments(h, mean, rank_one, y, "binary")
    draws = classification_gradient(h, _draws_rank_one(_gen(29), mean, v, 40_000), y, "binary")
    _assert_moments_match_draws(mu, var, draws, "rank-1 binary")
    mc = classification_moments(
        h, mean, rank_one, y, "binary", moments="monte_carlo", num_samples=40_000, chunk=8192, generator=_gen(30)
    )
    _assert_moments_match_draws(*mc, draws, "rank-1 binary monte_carlo", se_factor=math.sqrt(2))

    h, mean, cov, y = _posterior_for_moments("multiclass", 31)
    for moments in ("quadrature", "monte_carlo"):
        mu, var = classification_moments(h, mean, torch.zeros_like(cov), y, "multiclass", moments=moments)
        torch.testing.assert_close(mu, classification_gradient(h, mean, y, "multiclass"))
        assert var.max() < 1e-9


def _draws_rank_one(g: torch.Generator, mean: torch.Tensor, v: torch.Tensor, num: int) -> torch.Tensor:
    """Draws of ``mean + z v``, ``z ~ N(0, 1)``: the law ``N(mean, v vᵀ)`` without a Cholesky factor."""
    return mean + torch.randn(num, mean.shape[0], 1, generator=g, dtype=DT) * v


def test_classification_moments_reject_bad_input():
    h, mean, cov, y = _posterior_for_moments("multiclass", 16)
    with pytest.raises(ValueError, match="cov has shape"):
        classification_moments(h, mean, cov[:, 1:, 1:], y, "multiclass")
    with pytest.raises(ValueError, match="mean has shape"):
        classification_moments(h, mean, cov, y, "binary")
    with pytest.raises(ValueError, match="moments is"):
        classification_moments(h, mean, cov, y, "multiclass", moments="laplace")
    with pytest.raises(ValueError, match="num_samples"):
        classification_moments(h, mean, cov, y, "multiclass", num_samples=1)
    with pytest.raises(ValueError, match="y has shape"):
        classification_moments(h, mean, cov, y[:, :1], "multiclass")


# ----------------------------------------------------------------------------- aggregation
def _mu_var(seed: int, b=4, k=3, d=5):
    g = _gen(seed)
    return torch.randn(b, k, d, generator=g, dtype=DT), torch.rand(b, k, d, generator=g, dtype=DT) * 3 + 0.01


def test_aggregate_is_the_precision_weighted_mean():
    mu, var = _mu_var(17)
    weight = var.pow(-0.7)
    torch.testing.assert_close(aggregate(mu, var, 0.7), (weight * mu).sum(1) / weight.sum(1))
    g, weights = aggregate(mu, var, 0.7, return_weights=True)
    torch.testing.assert_close(weights, weight / weight.sum(1, keepdim=True))
    torch.testing.assert_close(g, aggregate(mu, var, 0.7))
    # s = 1: inverse-variance weighting
    torch.testing.assert_close(aggregate(mu, var, 1.0), (mu / var).sum(1) / (1 / var).sum(1))
    # s → 0: the plain mean over tasks
    torch.testing.assert_close(aggregate(mu, var, 0.0), mu.mean(1))
    torch.testing.assert_close(aggregate(mu, var, 1e-9), mu.mean(1))
    # one s per task
    s = torch.tensor([0.9, 0.05, 0.5], dtype=DT)
    weight = var.pow(-s[:, None])
    want = (weight * mu).sum(1) / weight.sum(1)
    torch.testing.assert_close(aggregate(mu, var, s), want)
    torch.testing.assert_close(aggregate(mu, var, s.tolist()), want)  # any sequence of K numbers
    # var is left alone unless the caller gives it up
    before = var.clone()
    aggregate(mu, var, s, return_weights=True)
    assert torch.equal(var, before)
    torch.testing.assert_close(aggregate(mu, var, s, overwrite_var=True), want)
    assert not torch.equal(var, before)
    # one s for all tasks (its own shortcut) agrees with the same s given per task
    var = before.clone()
    want = aggregate(mu, var, torch.full((3,), 0.7, dtype=DT))
    torch.testing.assert_close(aggregate(mu, var, 0.7), want)
    assert torch.equal(var, before)
    torch.testing.assert_close(aggregate(mu, var, 0.7, overwrite_var=True), want)
    assert not torch.equal(var, before)


def test_aggregate_is_stable_at_extreme_variances():
    mu, var = _mu_var(18)
    var[:, 0] = 0.0  # a certain task takes all the weight, without NaN
    torch.testing.assert_close(aggregate(mu, var, 0.5), mu[:, 0])
    var.fill_(0.0)  # all certain: a tie, the plain mean
    torch.testing.assert_close(aggregate(mu, var, 1.0), mu.mean(1))
    mu32, var32 = _mu_var(18)
    var32 = var32.float() * torch.tensor([1e-30, 1.0, 1e30])[:, None]  # 60 orders of magnitude apart
    out = aggregate(mu32.float(), var32, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, mu32[:, 0].float())


def test_aggregate_masks_missing_labels():
    mu, var = _mu_var(19)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[0, 1] = False
    mask[2] = False
    mu[0, 1], var[0, 1] = float("nan"), float("nan")
    out = aggregate(mu, var, 0.6, mask=mask)
    torch.testing.assert_close(out[0], aggregate(mu[:1, [0, 2]], var[:1, [0, 2]], 0.6)[0])
    torch.testing.assert_close(out[[1, 3]], aggregate(mu[[1, 3]], var[[1, 3]], 0.6))
    assert (out[2] == 0).all()


def test_aggregation_weights_are_the_unnormalised_weights_with_the_largest_one():
    mu, var = _mu_var(20)
    weights, total = aggregation_weights(var, 0.7)
    _, normalised = aggregate(mu, var, 0.7, return_weights=True)
    torch.testing.assert_close(weights / total.unsqueeze(1), normalised)
    torch.testing.assert_close(total, weights.sum(1))
    assert torch.equal(weights.amax(1), torch.ones_like(total))  # the most precise task has weight 1 exactly
    # a sample with no task: weights 0 and total 1, so a weighted sum divided by it is 0
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[1] = False
    weights, total = aggregation_weights(var, 0.7, mask=mask)
    assert (weights[1] == 0).all() and (total[1] == 1).all() and (total[[0, 2, 3]] >= 1).all()
    # a bad mask is refused before var, given up to be overwritten, is touched
    before = var.clone()
    with pytest.raises(ValueError, match="mask has shape"):
        aggregation_weights(var, 0.7, mask=mask.T, overwrite_var=True)
    assert torch.equal(var, before)


@pytest.mark.parametrize(
    ("mu", "var", "s", "mask", "match"),
    [
        ((4, 3), (4, 3), 0.5, None, "mu has shape"),
        ((4, 3, 2), (4, 3, 1), 0.5, None, "var has shape"),
        ((4, 3, 2), (4, 3, 2), torch.ones(2), None, "s has shape"),
        ((4, 3, 2), (4, 3, 2), -0.5, None, "s ≥ 0"),
        ((4, 3, 2), (4, 3, 2), 0.5, (3, 4), "mask has shape"),
    ],
)
def test_aggregate_rejects_bad_input(mu, var, s, mask, match):
    with pytest.raises(ValueError, match=match):
        aggregate(torch.ones(mu), torch.ones(var), s, mask=None if mask is None else torch.ones(mask, dtype=torch.bool))


# ----------------------------------------------------------------------------- devices and dtypes
def _every_function(device: str, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, ...]]:
    """Every public function on a small problem, inputs built on the CPU and moved, outputs back on the CPU."""
    h_bin, y_bin, w_bin, b_bin, pm_bin, pp_bin = _classification_problem("binary", 20)
    h_mc, y_mc, w_mc, b_mc, pm_mc, pp_mc = _classification_problem("multiclass", 21)
    h, mean, cov, _ = _posterior_for_moments("binary", 22)
    y = torch.randn(h.shape[0], mean.shape[0], generator=_gen(23), dtype=DT)

    def on(*ts):
        return [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in ts]

    stats = GaussianStats()
    stats.update(*on(h, y))
    out = {
        "posterior": regression_posterior(*on(h, y), 0.0, 1.0),
        "stats": stats.posterior(),
        "regression_moments": regression_moments(*on(h, mean[:, :-1], cov[:, :-1, :-1], y)),
        "laplace_binary": laplace_posterior(*on(h_bin, y_bin, w_bin, b_bin, pm_bin, pp_bin), kind="binary"),
        "laplace_multiclass": laplace_posterior(*on(h_mc, y_mc, w_mc, b_mc, pm_mc, pp_mc), kind="multiclass"),
        "aggregate": (aggregate(*on(*_mu_var(24)), 0.5),),
    }
    for kind, seed in (("binary", 25), ("multiclass", 26)):
        hh, mm, cc, yy = on(*_posterior_for_moments(kind, seed))
        out[f"quadrature_{kind}"] = classification_moments(hh, mm, cc, yy, kind, num_samples=4)
    for name, tensors in out.items():
        for t in tensors:
            assert t.device.type == device and t.dtype == dtype, (name, t.device, t.dtype)
    return {name: tuple(t.cpu() for t in tensors) for name, tensors in out.items()}


def test_outputs_keep_the_input_dtype():
    _every_function("cpu", torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cpu, cuda = _every_function("cpu", DT), _every_function("cuda", DT)
    for name in cpu:
        if name != "quadrature_multiclass":  # random draws differ between devices
            torch.testing.assert_close(cuda[name], cpu[name], msg=name)
