"""HIB's building blocks (``pyromtl.infer.hib``): eq. 7-8, eq. 11, task clustering, plots, eq. 10."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.cluster import hierarchy
from torch.distributions import Normal, kl_divergence

from pyromtl.infer.hib import (
    channel_kl,
    cluster_tasks,
    clustering_margin,
    clustering_success,
    gaussian_optimal_precisions,
    noise_distance,
    two_task_gaussian,
)
from pyromtl.plots import plot_dendrogram

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hib_gaussian_theory.py"

#: Four tasks in two pairs, {0, 1} and {2, 3}; every within-pair distance is below every across.
PAIRS = np.array(
    [
        [0.0, 1.0, 4.0, 5.0],
        [1.0, 0.0, 3.5, 6.0],
        [4.0, 3.5, 0.0, 2.0],
        [5.0, 6.0, 2.0, 0.0],
    ]
)
PAIR_LABELS = np.array([0, 0, 1, 1])


def _kl_inputs(seed: int, batch: int = 7, tasks: int = 3, dim: int = 5):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    log_var = torch.randn(tasks, dim, generator=gen, dtype=torch.float64)
    loc = torch.randn(tasks, dim, generator=gen, dtype=torch.float64)
    prior_log_var = torch.randn(tasks, dim, generator=gen, dtype=torch.float64)
    return z, log_var, loc, prior_log_var


# --------------------------------------------------------------------------- eq. 7-8


def test_channel_kl_is_the_gaussian_kl_for_every_sample_and_task():
    z, log_var, loc, prior_log_var = _kl_inputs(0)
    got = channel_kl(z, log_var, loc, prior_log_var)
    channel = Normal(z[:, None, :], torch.exp(0.5 * log_var))  # [B, T, D]
    marginal = Normal(loc, torch.exp(0.5 * prior_log_var))  # [T, D]
    assert got.shape == (7, 3)
    torch.testing.assert_close(got, kl_divergence(channel, marginal).sum(-1))


def test_channel_kl_differs_from_printed_eq8_by_the_missing_half():
    z, log_var, loc, prior_log_var = _kl_inputs(1)
    var, xi2 = log_var.exp(), prior_log_var.exp()
    # eq. 8 exactly as printed: log(ξ²/σ²) without the ½
    printed = (torch.log(xi2 / var) + (var + (loc - z[:, None, :]) ** 2) / (2 * xi2) - 0.5).sum(-1)
    half_log_ratio = 0.5 * (prior_log_var - log_var).sum(-1)
    torch.testing.assert_close(channel_kl(z, log_var, loc, prior_log_var), printed - half_log_ratio)


def test_printed_eq8_at_its_best_marginal_is_the_kl_bound_with_beta_doubled():
    z, log_var, _, _ = _kl_inputs(4, batch=50)
    loc = torch.zeros(5, dtype=torch.float64)
    second_moment = z.square().mean(0)  # E (z − ν)², ν = 0
    var = log_var.exp()
    # the best ξ² over the batch: σ² + E z² for the KL, half that for the printed form
    kl_bound = channel_kl(z, log_var, loc, torch.log(var + second_moment)).mean(0)
    xi2 = 0.5 * (var + second_moment)
    printed = (torch.log(xi2 / var) + (var + z[:, None, :] ** 2) / (2 * xi2) - 0.5).sum(-1).mean(0)
    torch.testing.assert_close(printed, 2 * kl_bound + 5 * (0.5 - math.log(2)))


def test_channel_kl_and_noise_distance_stay_on_the_inputs_device():
    meta = torch.device("meta")  # shapes only: fails if anything is created on the CPU
    kl = channel_kl(
        torch.zeros(4, 5, device=meta),
        torch.zeros(3, 5, device=meta),
        torch.zeros(5, device=meta),
        torch.zeros(3, 5, device=meta),
    )
    assert kl.device == meta and kl.shape == (4, 3)
    assert noise_distance(torch.zeros(3, 5, device=meta)).shape == (3, 3)


def test_channel_kl_shared_prior_broadcasts_and_is_zero_at_the_prior():
    z, log_var, _, _ = _kl_inputs(2)
    loc, prior_log_var = torch.zeros(5, dtype=torch.float64), torch.full((5,), 0.3, dtype=torch.float64)
    torch.testing.assert_close(
        channel_kl(z, log_var, loc, prior_log_var), channel_kl(z, log_var, loc.expand(3, 5), prior_log_var.expand(3, 5))
    )
    # the channel equals the marginal when z = ν and σ² = ξ²
    at_prior = channel_kl(torch.zeros(1, 5, dtype=torch.float64), prior_log_var.expand(3, 5), loc, prior_log_var)
    torch.testing.assert_close(at_prior, torch.zeros(1, 3, dtype=torch.float64))


def test_channel_kl_gradients_reach_every_input():
    z, log_var, loc, prior_log_var = (t.requires_grad_() for t in _kl_inputs(3))
    channel_kl(z, log_var, loc, prior_log_var).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (z, log_var, loc, prior_log_var))


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((4,), (3, 5), (5,), (5,)), "z"),
        (((4, 5), (5,), (5,), (5,)), "log_var"),
        (((4, 6), (3, 5), (5,), (5,)), "dimensions"),
        (((4, 5), (3, 5), (2, 5), (5,)), "prior_loc"),
        (((4, 5), (3, 5), (5,), (3, 4)), "prior_log_var"),
    ],
)
def test_channel_kl_rejects_shapes_that_do_not_fit(shapes, message):
    with pytest.raises(ValueError, match=message):
        channel_kl(*(torch.zeros(s) for s in shapes))


# --------------------------------------------------------------------------- eq. 11


def test_noise_distance_hand_example():
    log_var = torch.tensor([[0.0, 1.0, -2.0], [0.5, 1.0, 2.0], [0.0, -1.0, -2.0]])
    want = torch.tensor([[0.0, 4.5, 2.0], [4.5, 0.0, 6.5], [2.0, 6.5, 0.0]])
    torch.testing.assert_close(noise_distance(log_var), want)


def test_noise_distance_rejects_a_vector():
    with pytest.raises(ValueError, match="log_var"):
        noise_distance(torch.zeros(4))


# --------------------------------------------------------------------------- clustering


@pytest.mark.parametrize(
    "groups", [PAIR_LABELS, (PAIR_LABELS[:, None] == PAIR_LABELS).astype(float)], ids=["labels", "matrix"]
)
def test_clustering_success_and_margin_on_separated_pairs(groups):
    assert clustering_success(PAIRS, groups)
    # smallest across (3.5) minus largest within (2.0)
    assert clustering_margin(PAIRS, groups) == pytest.approx(1.5)


def test_clustering_fails_when_one_pair_is_farther_than_an_across_distance():
    d = PAIRS.copy()
    d[2, 3] = d[3, 2] = 3.8  # the pair {2, 3} is now wider than the across distance 3.5
    assert not clustering_success(d, PAIR_LABELS)
    assert clustering_margin(d, PAIR_LABELS) == pytest.approx(-0.3)
    # ties do not count as success: the criterion is strict
    d[2, 3] = d[3, 2] = 3.5
    assert not clustering_success(d, PAIR_LABELS)


def test_clustering_success_reads_the_relatedness_of_digits_grouped_style():
    # 6 tasks, 2 clusters of 3, a 1-on-the-diagonal indicator as MultiTaskData.relatedness holds
    labels = np.array([0, 0, 0, 1, 1, 1])
    rng = np.random.default_rng(0)
    points = labels[:, None] * 10.0 + rng.uniform(size=(6, 3))
    d = np.abs(points[:, None] - points[None]).sum(-1)
    assert clustering_success(torch.from_numpy(d), torch.from_numpy((labels[:, None] == labels).astype(float)))
    assert not clustering_success(d, np.array([0, 1, 0, 1, 0, 1]))


@pytest.mark.parametrize(
    "distance, groups, message",
    [
        (PAIRS[:3], PAIR_LABELS, "square"),
        (PAIRS + np.eye(4), PAIR_LABELS, "diagonal"),
        (PAIRS + np.triu(np.ones((4, 4)), 1), PAIR_LABELS, "symmetric"),
        (-PAIRS, PAIR_LABELS, "negative"),
        (PAIRS, np.array([0, 0, 1]), "groups"),
        (PAIRS, 2 * np.eye(4), "0 and 1"),
        (PAIRS, np.array([0, 1, 2, 3]), "same group"),
        (PAIRS, np.zeros(4), "different groups"),
    ],
)
def test_clustering_rejects_bad_input(distance, groups, message):
    with pytest.raises(ValueError, match=message):
        clustering_margin(distance, groups)


def test_cluster_tasks_recovers_the_pairs():
    linkage = cluster_tasks(PAIRS)
    assert linkage.shape == (3, 4)
    clusters = hierarchy.fcluster(linkage, t=2, criterion="maxclust")
    assert clusters[0] == clusters[1] != clusters[2] == clusters[3]
    # average linkage: the last merge is at the mean across distance
    assert linkage[-1, 2] == pytest.approx(np.mean([4.0, 5.0, 3.5, 6.0]))
    with pytest.raises(ValueError, match="method"):
        cluster_tasks(PAIRS, method="ward")


# --------------------------------------------------------------------------- figures


def test_dendrogram_has_one_labelled_leaf_per_task():
    names = ["a", "b", "c", "d"]
    linkage = cluster_tasks(PAIRS)
    ax = plot_dendrogram(linkage, names).axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert sorted(labels) == names
    assert labels == [names[i] for i in hierarchy.leaves_list(linkage)]
    # the pairs are adjacent leaves
    assert abs(labels.index("a") - labels.index("b")) == 1
    with pytest.raises(ValueError, match="linkage"):
        plot_dendrogram(np.zeros((2, 3)), names)
    with pytest.raises(ValueError, match="task_names"):
        plot_dendrogram(linkage, names[:3])


# --------------------------------------------------------------------------- Section IV, eq. 10


def _random_joint(seed: int, dim_x: int = 4, dim_y: int = 4):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(dim_x + dim_y, dim_x + dim_y, generator=gen, dtype=torch.float64)
    joint = g @ g.T / (dim_x + dim_y) + 0.1 * torch.eye(dim_x + dim_y, dtype=torch.float64)
    return joint[:dim_x, :dim_x], joint[:dim_x, dim_x:], joint[dim_x:, dim_x:]


def _ib_objective(b, cov_x, cov_xy, cov_y, beta):
    """Eq. 9, ``−I(Y; W) + β I(X; W)``, for ``W = B X + E`` with ``E ~ N(0, I)``, from log-determinants.

    ``I(Y; W)`` comes from the joint covariance of (W, Y), not from ``C_{X|Y}``, so the check does
    not reuse the derivation behind eq. 10.
    """
    c_w = torch.eye(b.shape[0], dtype=b.dtype) + b @ cov_x @ b.T
    c_wy = b @ cov_xy
    joint = torch.cat([torch.cat([c_w, c_wy], 1), torch.cat([c_wy.T, cov_y], 1)], 0)
    i_xw = 0.5 * torch.logdet(c_w)
    i_yw = 0.5 * (torch.logdet(c_w) + torch.logdet(cov_y) - torch.logdet(joint))
    return -i_yw + beta * i_xw


def _minimise(fn, x0):
    x = x0.clone().requires_grad_()
    opt = torch.optim.LBFGS(
        [x],
        lr=1.0,
        max_iter=2000,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        value = fn(x)
        value.backward()
        return value

    opt.step(closure)
    return x.detach()


def _numeric_precisions(directions, covs, beta):
    """Minimise eq. 9 over the noise precisions ``θ²`` of the channel ``W = diag(θ) A X + E``."""
    # unit noise after scaling W by its precision; θ = 0 is a closed dimension, reached smoothly
    theta = _minimise(
        lambda t: _ib_objective(t[:, None] * directions, *covs, beta),
        torch.ones(directions.shape[0], dtype=torch.float64),
    )
    return theta.square()


def test_eq10_matches_the_numerical_optimum_of_eq9_at_every_beta():
    covs = _random_joint(2)
    _, _, lambdas = gaussian_optimal_precisions(*covs, 0.5)
    critical = torch.sort(1.0 - lambdas).values
    assert (critical.diff() > 0.05).all() and critical[0] > 0.05, "pick a seed with well separated λ"
    # one β between each pair of critical values, plus one above all (everything closed)
    edges = torch.cat([torch.zeros(1, dtype=torch.float64), critical, torch.ones(1, dtype=torch.float64)])
    betas = (0.5 * (edges[:-1] + edges[1:])).tolist()
    open_counts = []
    for beta in betas:
        precisions, directions, lambdas = gaussian_optimal_precisions(*covs, beta)
        numeric = _numeric_precisions(directions, covs, beta)
        is_open = numeric > 1e-8
        assert torch.equal(is_open, precisions > 0), f"β = {beta}"
        assert torch.equal(is_open, beta < 1.0 - lambdas), f"β = {beta}: critical values are 1 − λ"
        torch.testing.assert_close(numeric, precisions, rtol=1e-5, atol=1e-8)
        open_counts.append(int(is_open.sum()))
    # decreasing β opens one dimension at each critical value 1 − λ_i
    assert open_counts == [4, 3, 2, 1, 0]


def test_eq10_channel_is_optimal_among_all_linear_channels():
    covs = _random_joint(0)
    beta = 0.4
    precisions, directions, _ = gaussian_optimal_precisions(*covs, beta)
    at_eq10 = _ib_objective(precisions.sqrt()[:, None] * directions, *covs, beta)
    gen = torch.Generator().manual_seed(1)
    b = _minimise(lambda m: _ib_objective(m, *covs, beta), torch.randn(4, 4, generator=gen, dtype=torch.float64))
    free = _ib_objective(b, *covs, beta)
    assert float(free) == pytest.approx(float(at_eq10), abs=1e-7)


def test_eq10_is_invariant_to_a_change_of_feature_basis():
    covs = _random_joint(2)
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(4, 4, generator=gen, dtype=torch.float64) + 2 * torch.eye(4, dtype=torch.float64)
    p1, v1, l1 = gaussian_optimal_precisions(*covs, 0.3)
    p2, v2, l2 = gaussian_optimal_precisions(m @ covs[0] @ m.T, m @ covs[1], covs[2], 0.3)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(p1, p2)
    # the same projections of the data: v2ᵀ (M x) = ± v1ᵀ x
    torch.testing.assert_close((v2 @ m).abs(), v1.abs())


def test_eq10_rejects_bad_input():
    cov_x, cov_xy, cov_y = _random_joint(0)
    with pytest.raises(ValueError, match="beta"):
        gaussian_optimal_precisions(cov_x, cov_xy, cov_y, 0.0)
    with pytest.raises(ValueError, match="cov_xy"):
        gaussian_optimal_precisions(cov_x, cov_xy[:, :3], cov_y, 0.5)
    with pytest.raises(ValueError, match="cov_x: not positive definite"):
        gaussian_optimal_precisions(-cov_x, cov_xy, cov_y, 0.5)
    with pytest.raises(ValueError, match="joint covariance"):
        gaussian_optimal_precisions(cov_x, 10 * cov_xy, cov_y, 0.5)


def test_two_task_problem_has_the_requested_eigenvalues_and_disjoint_open_sets():
    problem = two_task_gaussian(lambdas=((0.1, 0.3, 0.9), (0.2, 0.35, 0.95)), shared=0, seed=4)
    for task in (0, 1):
        _, _, lambdas = gaussian_optimal_precisions(*problem.task_covariances(task), 0.5)
        # the coordinates a task does not read have λ = 1
        want = torch.cat([problem.lambdas[task], torch.ones(3, dtype=torch.float64)]).sort().values
        torch.testing.assert_close(lambdas, want)
    is_open = problem.latent_precisions(0.5) > 0
    assert is_open.tolist() == [[True, True, False, False, False, False], [False, False, False, True, True, False]]
    # the sampler agrees with the covariances it reports
    x, x_latent, y = problem.sample(200_000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.cov(x.T), problem.task_covariances(0)[0], atol=0.03, rtol=0.03)
    torch.testing.assert_close(
        x_latent.T @ y[:, 1] / len(y), problem.task_covariances(1, latent=True)[1], atol=0.03, rtol=0.03
    )


@pytest.mark.slow  # about 5 s: 600 Adam steps
def test_gaussian_example_learns_the_open_closed_pattern_of_eq10(tmp_path):
    spec = importlib.util.spec_from_file_location("hib_gaussian_theory", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    summary = example.main(["--out", str(tmp_path), "--steps", "600", "--seed", "0"])
    assert summary["pattern_matches"], summary["learned_nats"]
    assert summary["theory_open"] == [[True, False, True, False, False], [False, False, True, True, False]]
    assert summary["open_abs_error_log_var"]["max"] < 0.1
    written = json.loads((tmp_path / "hib_gaussian_theory.json").read_text())
    assert written["learned_open"] == summary["theory_open"]
    assert (tmp_path / "hib_gaussian_theory.png").stat().st_size > 0
    assert math.isfinite(written["theory_minimum"])
