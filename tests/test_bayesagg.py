"""BayesAgg-MTL as a method: the objective's gradients, the guide's posteriors, the per-epoch prior,
exact resume and learning (``models/bayesagg.py``, ``guides/bayesagg.py``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pyro
import pytest
import torch
import torch.nn.functional as F

import pyromtl
from pyromtl import config, methods
from pyromtl.cli import main
from pyromtl.distributions import GaussianPrecision
from pyromtl.infer.bayesagg import (
    add_bias,
    aggregate,
    classification_moments,
    laplace_posterior,
    regression_moments,
    regression_posterior,
)
from pyromtl.method import MethodContext
from pyromtl.objective import TrainContext
from pyromtl.runspec import RunSpec
from pyromtl.schedules import TrainState
from pyromtl.train import train
from tests.conftest import TINY, built, interrupted_then_resumed, mixed_simo

GAMMA = 0.7
# mixed_simo's tasks: 0 "cls" (3 classes), 1 "bin", 2 "reg"
CLS, BIN, REG = 0, 1, 2


@pytest.fixture(autouse=True)
def _local_params():
    with pyro.settings.context(module_local_params=True):
        yield


def _build(kind: str = "isotropic", **options: Any):
    data = mixed_simo()
    method = methods.get("bayesagg")
    cfg = config.resolve(
        method,
        {**TINY, "device": "cpu", "pretrain_steps": 0, **options},
        priors={"w": {"kind": kind, "scale": GAMMA}},
        data=data,
    )
    torch.manual_seed(0)
    model, guide = built(method, cfg, data, TrainState(total_steps=100))
    return data, cfg, model, guide, method.objective(MethodContext(method, cfg, model=model, guide=guide))


def _batch(data, size: int = 16, seed: int = 0):
    return data.train_batch(size, torch.Generator().manual_seed(seed), "cpu")


def _newton_step(h: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One Newton step on ``NLL + |θ|²/(2γ²)`` from ``θ`` (``[C, d+1]``), by autograd; returns (mean, Hessian)."""
    x = add_bias(h.double())

    def objective(flat: torch.Tensor) -> torch.Tensor:
        logits = x @ flat.view_as(theta).T
        if kind == "binary":
            nll = F.binary_cross_entropy_with_logits(logits[:, 0], y.double(), reduction="sum")
        else:
            nll = F.cross_entropy(logits, y.long(), reduction="sum")
        return nll + flat.square().sum() / (2 * GAMMA**2)

    flat = theta.double().flatten()
    grad = torch.autograd.functional.jacobian(objective, flat)
    hessian = torch.autograd.functional.hessian(objective, flat)
    return flat - torch.linalg.solve(hessian, grad), hessian


def _expected_g(model, h: torch.Tensor, y: torch.Tensor, s_reg: float, s_cls: float) -> torch.Tensor:
    """Eq. 7 from per-task posteriors and moments, one task at a time (the method batches them)."""
    d, heads = h.shape[1], model.heads.detach()
    moments = {}
    mean, cov = regression_posterior(add_bias(h), y[REG][:, None], 0.0, 1 / GAMMA**2)
    mu, var = regression_moments(add_bias(h), mean, cov, y[REG][:, None])
    moments[REG] = mu[..., :d], var[..., :d]
    for task, kind in ((BIN, "binary"), (CLS, "multiclass")):
        theta = heads[task, :1] if kind == "binary" else heads[task][None]
        labels = y[task][:, None] if kind == "binary" else y[task][:, None].long()
        mean, cov = laplace_posterior(h, labels, theta[..., :d], theta[..., d], 0.0, 1 / GAMMA**2, kind)
        moments[task] = classification_moments(h, mean, cov, labels, kind, "quadrature", num_samples=64, nodes=32)
    order = (CLS, BIN, REG)
    mu = torch.cat([moments[t][0] for t in order], 1)
    var = torch.cat([moments[t][1] for t in order], 1)
    return aggregate(mu, var, torch.tensor([s_cls, s_cls, s_reg]))


# ----------------------------------------------------------------------------- the objective's gradients
def _head_grads(model) -> torch.Tensor:
    """The learned heads' gradients in the ``[T, K, d+1]`` layout of ``model.heads``."""
    return torch.cat([model.weight.grad.squeeze(1), model.bias.grad.squeeze(1).unsqueeze(-1)], -1)


def test_extractor_gets_the_aggregated_gradient_and_heads_their_ordinary_one() -> None:
    data, cfg, model, _guide, objective = _build()
    batch = _batch(data)
    torch.manual_seed(1)
    objective.backward(batch)
    got = {n: p.grad.clone() for n, p in model.extractor.named_parameters()}
    got_heads = _head_grads(model)

    h = model.features(batch.x)
    torch.manual_seed(1)  # the multiclass logit draws, in the same order
    g = _expected_g(model, h.detach(), batch.y, cfg["s_regression"], cfg["s_classification"])
    scale = data.split_sizes("train")[0] / batch.size  # the LS loss's N / B
    expected = torch.autograd.grad(h, list(model.extractor.parameters()), g * scale)
    for (name, value), want in zip(got.items(), expected):
        torch.testing.assert_close(value, want, msg=name)

    # the heads: the gradient of the summed task losses at θ̂ (N / B times their batch sums), features held fixed
    heads = model.heads.detach().clone().requires_grad_()
    x, y = add_bias(h.detach()), batch.y
    logits = x @ heads[CLS, :3].T
    loss = scale * (
        F.cross_entropy(logits, y[CLS].long(), reduction="sum")
        + F.binary_cross_entropy_with_logits(x @ heads[BIN, 0], y[BIN], reduction="sum")
        + 0.5 * (x @ heads[REG, 0] - y[REG]).square().sum()
    )
    torch.testing.assert_close(got_heads, torch.autograd.grad(loss, heads)[0])


def test_pretraining_is_linear_scalarisation() -> None:
    data, _cfg, model, _guide, objective = _build(pretrain_steps=5)
    batch = _batch(data)
    objective.backward(batch)
    got = [p.grad.clone() for p in model.extractor.parameters()]
    model.zero_grad()
    objective(batch).backward()
    for a, p in zip(got, model.extractor.parameters()):
        torch.testing.assert_close(a, p.grad)


# ----------------------------------------------------------------------------- the guide
def test_guide_posterior_is_the_conjugate_solve_and_one_newton_step() -> None:
    data, _cfg, model, guide, _objective = _build()
    batch = _batch(data, size=24)
    post = guide.posterior(batch)
    mean, precision = post.loc.squeeze(1).double(), post.precision.squeeze(1).double()
    h = model.features(batch.x).detach()
    d = h.shape[1]
    size = d + 1
    # regression: (I/γ² + XᵀX) m = Xᵀy
    x = add_bias(h.double())
    want_precision = torch.eye(size, dtype=torch.float64) / GAMMA**2 + x.T @ x
    torch.testing.assert_close(precision[REG, :size, :size], want_precision, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        mean[REG, :size], torch.linalg.solve(want_precision, x.T @ batch.y[REG].double()), rtol=1e-4, atol=1e-4
    )
    # classification: one Newton step from θ̂, with the exact Hessian
    heads = model.heads.detach()
    for task, kind, rows in ((BIN, "binary", 1), (CLS, "multiclass", 3)):
        want_mean, hessian = _newton_step(h, batch.y[task], heads[task, :rows], kind)
        used = rows * size
        torch.testing.assert_close(mean[task, :used], want_mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(precision[task, :used, :used], hessian, rtol=1e-4, atol=1e-4)
    # unused rows keep the prior; the regression and binary heads use row 0 only
    torch.testing.assert_close(mean[BIN, size:], torch.zeros_like(mean[BIN, size:]))
    torch.testing.assert_close(precision[REG, size:, size:], torch.eye(2 * size, dtype=torch.float64) / GAMMA**2)


def test_prediction_uses_the_full_data_mean_for_regression_and_the_heads_otherwise() -> None:
    data, cfg, model, guide, objective = _build("full_data")
    for seed in range(3):
        objective.backward(_batch(data, seed=seed))
    objective.end_epoch(TrainContext(data, cfg, torch.device("cpu"), torch.Generator()))
    point = guide.prediction_heads().view_as(model.heads)
    torch.testing.assert_close(point[:2], model.heads.detach()[:2])
    torch.testing.assert_close(point[REG, 0], model.store.regression_mean[0])


# ----------------------------------------------------------------------------- the per-epoch prior
# (its exactness at every epoch's end: tests/test_bayesagg_prior.py)
@pytest.mark.parametrize("kind", ["isotropic", "previous_batch", "full_data"])
def test_prior_kinds_switch_from_the_config(kind: str) -> None:
    data, _cfg, model, guide, objective = _build(kind)
    batch = _batch(data)
    objective.backward(batch)
    if kind == "previous_batch":  # the last batch's posterior, under the isotropic prior it had
        prior = model.prior()
        model.store.previous_batch = None
        want = guide.posterior(batch)
        torch.testing.assert_close(prior.loc, want.loc, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prior.precision, want.precision, rtol=1e-5, atol=1e-4)
    prior = model.prior()
    torch.testing.assert_close(prior.loc, torch.zeros_like(prior.loc))
    torch.testing.assert_close(prior.precision, torch.eye(prior.loc.shape[-1]) / GAMMA**2)


def test_a_built_prior_is_kept_until_the_store_changes() -> None:
    data, cfg, model, guide, objective = _build("full_data")
    batch = _batch(data)
    features = add_bias(model.features(batch.x).detach())
    objective.backward(batch)
    first = objective._priors()
    assert objective._priors()[0] is first[0]  # nothing changed: the same prior
    isotropic = objective.aggregated_gradient(features, batch.y)
    objective.end_epoch(TrainContext(data, cfg, torch.device("cpu"), torch.Generator()))
    prior, _ = objective._priors()
    assert prior is not first[0]
    torch.testing.assert_close(prior.loc, model.prior().loc)
    # the step under the new prior is what an objective that never built one computes
    method = methods.get("bayesagg")
    torch.manual_seed(1)  # the multiclass task's logit draws
    want = method.objective(MethodContext(method, cfg, model=model, guide=guide)).aggregated_gradient(features, batch.y)
    torch.manual_seed(1)
    got = objective.aggregated_gradient(features, batch.y)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, isotropic, atol=1e-4)  # the prior matters to the step
    # a checkpoint load replaces the store's entry: built again
    model.store.set_extra_state(copy.deepcopy(model.store.get_extra_state()))
    assert objective._priors()[0] is not prior


@pytest.fixture
def annealed_kind():
    """A prior kind that reads the step, registered for one test."""

    @pyromtl.priors.register("test_annealed", defaults={"scale": 1.0}, uses_components=False)
    def annealed(spec, ctx):
        eye = torch.eye(ctx.event_shape[-1], dtype=ctx.dtype, device=ctx.device)
        return GaussianPrecision(ctx.full(ctx.batch_shape + ctx.event_shape, 0.0), eye * (1.0 + ctx.step))

    yield "test_annealed"
    del pyromtl.priors.registry._REGISTRY["test_annealed"]


def test_other_prior_kinds_are_built_every_step(annealed_kind: str) -> None:
    _, _, model, _, objective = _build(annealed_kind)
    for step in (0, 4):
        model.state.step = step
        prior, groups = objective._priors()
        torch.testing.assert_close(prior.precision, torch.eye(model.size) * (1.0 + step))
        torch.testing.assert_close(groups[0][1], torch.eye(groups[0][1].shape[-1]) * (1.0 + step))


# ----------------------------------------------------------------------------- checkpoints and learning
def _assert_same(a: Any, b: Any, key: str) -> None:
    if torch.is_tensor(a):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=key)
    elif isinstance(a, dict):
        for k in a:
            _assert_same(a[k], b[k], f"{key}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), key
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_same(u, v, f"{key}[{i}]")
    else:
        assert a == b, key


@pytest.mark.parametrize("kind", ["full_data", "previous_batch"])
def test_checkpoint_and_resume_are_exact(tmp_path: Path, kind: str) -> None:
    data = mixed_simo()
    method = methods.get("bayesagg")
    cfg = config.resolve(
        method,
        {**TINY, "steps": 30, "batch_size": 16, "pretrain_steps": 6, "checkpoint_every": 10, "device": "cpu"},
        priors={"w": {"kind": kind}},
        data=data,
    )
    full = train(RunSpec.build(method, cfg, data))
    resumed = interrupted_then_resumed(method, data, cfg, tmp_path, at=25)
    want, got = full.objective.state_dict(), resumed.objective.state_dict()
    assert want.keys() == got.keys()
    for key, value in want.items():
        _assert_same(value, got[key], key)
    assert full.objective.model.store.full_data is not None or kind != "full_data"


@pytest.mark.slow
def test_bayesagg_learns_a_mixed_simo_set() -> None:
    fit = pyromtl.fit(
        "bayesagg",
        mixed_simo(n=300),
        steps=300,
        batch_size=32,
        pretrain_steps=50,
        device="cpu",
        **{**TINY, "eval_every": 50},
    )
    tasks = fit.evaluate()["tasks"]
    assert tasks["cls"]["accuracy"] > 0.6  # 3 classes
    assert tasks["bin"]["accuracy"] > 0.75
    assert tasks["reg"]["nmse"] < 0.3


@pytest.mark.slow
def test_aggregation_weights_are_logged_after_pretraining_and_plotted(tmp_path: Path) -> None:
    """The paper's Fig. 3: each task's share of the shared gradient (eq. 7) over training."""
    data = mixed_simo(n=120)
    fit = pyromtl.fit(
        "bayesagg",
        data,
        steps=40,
        batch_size=32,
        pretrain_steps=20,
        eval_every=20,
        device="cpu",
        **{k: v for k, v in TINY.items() if k != "eval_every"},
    )
    logged = [h for h in fit.history if "aggregation_weight_0" in h]
    assert logged and min(h["step"] for h in logged) > 20  # none in the LS pre-training
    for h in logged:  # a distribution over the tasks
        assert sum(h[f"aggregation_weight_{t}"] for t in range(data.num_tasks)) == pytest.approx(1.0, abs=1e-5)
    weights = fit.metrics()["extra"]["aggregation_weights"]
    assert list(weights) == ["step", *data.task_names] and len(weights["step"]) == len(logged)
    fit.save(tmp_path / "run")
    assert (tmp_path / "run" / "plots" / "aggregation_weights.png").stat().st_size > 1000


def test_cli_fits_bayesagg_with_another_prior(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "fit",
            "bayesagg",
            "--data",
            "digits-binary",
            "--set",
            "steps=4",
            "--set",
            "pretrain_steps=2",
            "--set",
            "priors.w.kind=isotropic",
            "--set",
            "eval_every=2",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code in (0, None), capsys.readouterr().err
    assert 'kind = "isotropic"' in (out / "config.toml").read_text()
    assert (out / "metrics.json").exists()


def test_regression_moments_use_a_shared_covariance_once() -> None:
    gen = torch.Generator().manual_seed(3)
    h, y = torch.randn(7, 4, generator=gen), torch.randn(7, 5, generator=gen)
    root = torch.randn(4, 4, generator=gen)
    shared = (root @ root.T + torch.eye(4)).expand(5, 4, 4)  # stride 0, as regression_posterior returns
    mean = torch.randn(5, 4, generator=gen)
    fast = regression_moments(h, mean, shared, y)
    dense = regression_moments(h, mean, shared.contiguous(), y)
    for a, b in zip(fast, dense):
        torch.testing.assert_close(a, b)
    # coords: the leading coordinates only, the same numbers (shared and per-head covariances)
    for cov in (shared, shared.contiguous()):
        for part, full in zip(regression_moments(h, mean, cov, y, coords=3), fast):
            assert part.shape == (7, 5, 3)
            torch.testing.assert_close(part, full[..., :3])
    with pytest.raises(ValueError, match="coords is 5"):
        regression_moments(h, mean, shared, y, coords=5)


def test_shared_prior_rows_skip_the_comparison_and_give_the_same_prior() -> None:
    from pyromtl.guides.bayesagg import group_prior, head_groups, share_rows

    info = mixed_simo().info  # out_dim 3
    gen = torch.Generator().manual_seed(5)
    size = 3 * (4 + 1)  # out_dim × (d + 1) at d = 4
    root = torch.randn(size, size, generator=gen)
    one = root @ root.T + torch.eye(size)
    shared = share_rows(one.expand(3, size, size).clone())
    assert shared.stride(0) == 0
    distinct = one.expand(3, size, size) + torch.arange(3.0)[:, None, None] * torch.eye(size)
    assert share_rows(distinct) is distinct
    loc = torch.randn(3, 1, size, generator=gen)
    for group in head_groups(info):
        fast = group_prior(GaussianPrecision(loc, shared.unsqueeze(1)), group, 4)
        dense = group_prior(GaussianPrecision(loc, shared.contiguous().unsqueeze(1)), group, 4)
        torch.testing.assert_close(fast[0], dense[0])
        torch.testing.assert_close(fast[1].expand_as(dense[1]), dense[1])  # one matrix, or one per task


def test_gaussian_precision_matches_multivariate_normal() -> None:
    gen = torch.Generator().manual_seed(4)
    root = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)
    precision = root @ root.mT + torch.eye(3, dtype=torch.float64)
    loc = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    mine, ref = (
        GaussianPrecision(loc, precision),
        torch.distributions.MultivariateNormal(loc, precision_matrix=precision),
    )
    value = torch.randn(5, 2, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(mine.log_prob(value), ref.log_prob(value))
    torch.manual_seed(0)
    draws = mine.expand((4, 2)).rsample((20_000,))
    assert draws.shape == (20_000, 4, 2, 3)
    cov = torch.einsum("nbi,nbj->bij", draws[:, 0] - loc, draws[:, 0] - loc) / 20_000
    torch.testing.assert_close(cov, torch.linalg.inv(precision), rtol=0.1, atol=0.02)


def test_head_groups_index_consecutive_tasks_by_a_slice_and_others_by_index() -> None:
    from pyromtl.data.core import MultiTaskData
    from pyromtl.guides.bayesagg import group_prior, head_groups

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(12, 3, generator=gen).numpy()
    y = {
        f"t{i}": (
            torch.randn(12, generator=gen) if kind == "regression" else torch.randint(0, 2, (12,), generator=gen)
        ).numpy()
        for i, kind in enumerate(["regression", "binary", "binary", "regression"])
    }
    info = MultiTaskData.from_arrays(x, y, ["regression", "binary", "binary", "regression"]).info
    groups = {g.kind: g for g in head_groups(info)}
    assert groups["binary"].rows == slice(1, 3)  # a view
    assert torch.equal(groups["regression"].rows, torch.tensor([0, 3]))  # a gather
    labels = torch.randn(4, 12, generator=gen)
    size = 3 + 1
    loc = torch.randn(4, 1, size, generator=gen)
    root = torch.randn(4, size, size, generator=gen)
    precision = (root @ root.mT + torch.eye(size)).unsqueeze(1)
    for group in groups.values():
        assert torch.equal(group.labels(labels), labels[group.tasks].T)
        mean_p, precision_p = group_prior(GaussianPrecision(loc, precision), group, 3)
        torch.testing.assert_close(mean_p, loc[group.tasks, 0])
        torch.testing.assert_close(precision_p, precision[group.tasks, 0])


def test_regression_scale_halves_a_regression_tasks_moments_only() -> None:
    """``regression_scale = "gaussian"``: the regression task's moments are those of ½(y − ŷ)², half
    the mean and a quarter of the variance of eq. 3's; the classification tasks' are unchanged."""
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for scale in ("squared", "gaussian"):
        data, _, model, _, objective = _build(regression_scale=scale)
        batch = _batch(data)
        features = add_bias(model.features(batch.x).detach())
        moments = objective.moments

        def spy(*args, _moments=moments, _scale=scale):
            mu, var, s = _moments(*args)
            captured[_scale] = (mu.clone(), var.clone())
            return mu, var, s

        objective.moments = spy
        torch.manual_seed(1)  # the multiclass task's logit draws
        objective.aggregated_gradient(features, batch.y)
    (mu, var), (half_mu, half_var) = captured["squared"], captured["gaussian"]
    column = int((objective.order == REG).nonzero())  # the tasks stack in group order
    others = [c for c in range(mu.shape[1]) if c != column]
    torch.testing.assert_close(half_mu[:, column], 0.5 * mu[:, column])
    torch.testing.assert_close(half_var[:, column], 0.25 * var[:, column])
    torch.testing.assert_close(half_mu[:, others], mu[:, others])
    torch.testing.assert_close(half_var[:, others], var[:, others])
    with pytest.raises(ValueError, match="regression_scale"):
        _build(regression_scale="half")
