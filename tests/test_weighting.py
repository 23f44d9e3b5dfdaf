"""The gradient-weighting baselines (``models/weighting.py``): training, gradients against torchjd
computed directly, ``ls`` against ``bmtl``, exact resume of stateful weightings, the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchjd import aggregation

import pyromtl
from pyromtl import config, methods
from pyromtl.likelihoods import MultiTaskOutput
from pyromtl.method import MethodContext
from pyromtl.params import local_params
from pyromtl.rundir import RunDir
from pyromtl.runspec import RunSpec
from pyromtl.schedules import TrainState
from pyromtl.train import train
from tests.conftest import TINY, blobs_mimo, built, mixed_simo

WEIGHTINGS = ["ls", "si", "rlw", "dwa", "uw", "mgda", "pcgrad", "cagrad", "imtl-g", "nash-mtl", "aligned-mtl", "upgrad"]

#: A fresh torchjd aggregator per Jacobian-descent method (``ls``: the plain sum), built here
#: and not read from the method, so the test checks the method's choice too.
REFERENCE = {
    "ls": aggregation.Sum,
    "mgda": aggregation.MGDA,
    "pcgrad": aggregation.PCGrad,
    "cagrad": lambda: aggregation.CAGrad(c=0.4),
    "imtl-g": aggregation.IMTLG,
    "nash-mtl": lambda: aggregation.NashMTL(n_tasks=3),
    "aligned-mtl": aggregation.AlignedMTL,
    "upgrad": aggregation.UPGrad,
}


def _setup(method: str, data=None, **options):
    """A freshly built objective (seed 0) and a fixed training batch of 16 rows."""
    data = data or mixed_simo()
    m = methods.get(method)
    cfg = config.resolve(m, {**TINY, **options}, data=data)
    torch.manual_seed(0)
    model, guide = built(m, cfg, data, TrainState(total_steps=100))
    objective = m.objective(MethodContext(m, cfg, model=model, guide=guide))
    batch = data.train_batch(16, torch.Generator().manual_seed(0), "cpu")
    objective(batch)  # creates lazy parameters, as the trainer does
    return objective, batch


def _task_losses(model, batch) -> torch.Tensor:
    """The per-task negative log-likelihoods written out by hand, without a Pyro trace."""
    loc, _ = model.encoder(batch.x, batch.simo)
    log_lik = MultiTaskOutput(model.head(loc, model.w_post.loc), model.info, model.noise).log_prob(batch.y)
    return -torch.where(batch.mask, log_lik * batch.scale, 0.0).sum(-1)


def _flat_grads(params) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in params])


def _grads(objective) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in objective.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", WEIGHTINGS)
@local_params
def test_every_method_trains_on_mixed_simo_data(method):
    data = mixed_simo()
    m = methods.get(method)
    cfg = config.resolve(m, {**TINY, "steps": 30, "batch_size": 16, "seed": 0}, data=data)
    losses: list[float] = []
    result = train(RunSpec.build(m, cfg, data), callback=lambda step, loss: losses.append(loss))
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    fit = pyromtl.fit(method, data, steps=5, **TINY)
    assert set(fit.evaluate()["tasks"]) == set(data.task_names)
    assert result.objective.model.noise.tolist() == [1.0, 1.0, 1.0]  # fixed unless learn_noise


def test_weighting_works_on_mimo_data_too():
    fit = pyromtl.fit("upgrad", blobs_mimo(), steps=10, **TINY)
    assert np.isfinite(fit.train_info["final_loss"])


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("method", sorted(REFERENCE))
@local_params
def test_encoder_gets_torchjds_aggregation_of_the_task_jacobian(method):
    objective, batch = _setup(method)
    model = objective.model
    shared = list(model.encoder.parameters())
    losses = _task_losses(model, batch)
    jacobian = torch.stack(
        [torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)]) for loss in losses]
    )
    torch.manual_seed(1)  # PCGrad draws random task orders
    expected = REFERENCE[method]()(jacobian)

    torch.manual_seed(1)
    total = objective.backward(batch)
    torch.testing.assert_close(total, losses.sum().detach())
    torch.testing.assert_close(_flat_grads(shared), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ls", "mgda", "pcgrad", "upgrad", "nash-mtl"])
@local_params
def test_each_head_gets_the_ordinary_gradient_of_its_own_task(method):
    objective, batch = _setup(method)
    model = objective.model
    heads = [model.w_post.loc, model.bias_unconstrained]
    losses = _task_losses(model, batch)
    per_task = [torch.autograd.grad(loss, heads, retain_graph=True) for loss in losses]
    objective.backward(batch)
    for i, p in enumerate(heads):
        for t, grads in enumerate(per_task):
            others = torch.arange(len(losses)) != t
            assert torch.all(grads[i][others] == 0)  # task t's loss reaches only head t
            torch.testing.assert_close(p.grad[t], grads[i][t], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("learn_noise", [True, False])
@local_params
def test_ls_gives_bmtls_gradient(learn_noise):
    ls, batch = _setup("ls", learn_noise=learn_noise)
    bmtl, _ = _setup("bmtl")
    ls.backward(batch)
    bmtl.backward(batch)
    got, want = _grads(ls), _grads(bmtl)
    if not learn_noise:
        assert "loss.model.noise_unconstrained" not in got  # the noise stays 1: it gets no gradient
        want.pop("loss.model.noise_unconstrained")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)


@local_params
def test_si_divides_each_task_gradient_by_its_loss():
    si, batch = _setup("si")
    model = si.model
    params = [p for p in si.parameters() if p.requires_grad]
    losses = _task_losses(model, batch)
    assert (losses > 0).all()
    expected = torch.autograd.grad((losses / losses.detach()).sum(), params, allow_unused=True)
    si.backward(batch)
    for p, g in zip(params, expected):
        if g is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


@local_params
def test_uw_learns_one_log_variance_per_task():
    uw, batch = _setup("uw")
    log_var = uw.combine.log_var
    assert log_var.shape == (3,) and any(p is log_var for p in uw.trainable_parameters())
    losses = _task_losses(uw.model, batch).detach()
    uw.backward(batch)
    torch.testing.assert_close(log_var.grad, 0.5 - 0.5 * losses)  # d/ds of e^{-s} L / 2 + s / 2 at s = 0


# ---------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("si", {"learn_noise": True}, "positive task losses"),
        ("uw", {"learn_noise": True}, "positive task losses"),
        ("upgrad", {"per_task_encoder": True}, "one shared encoder"),
        ("pcgrad", {"priors": {"w": "normal"}}, "must be 'deterministic'"),
    ],
)
def test_configurations_that_change_the_network_are_refused(method, options, match):
    with pytest.raises(ValueError, match=match):
        pyromtl.fit(method, mixed_simo(), steps=1, **TINY, **options)


# ---------------------------------------------------------------------------- resume
class _Interrupt(Exception):
    pass


def _state(objective) -> dict:
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in objective.state_dict().items()}


@pytest.mark.parametrize("method", ["dwa", "uw", "nash-mtl"])
@local_params
def test_resumed_run_ends_where_an_uninterrupted_one_would(method, tmp_path):
    # 4 steps an epoch, checkpoints mid-epoch: DWA's running sum and its history must both survive
    data = mixed_simo()
    m = methods.get(method)
    cfg = config.resolve(m, {**TINY, "steps": 30, "batch_size": 16, "checkpoint_every": 6, "seed": 2}, data=data)
    full = _state(train(RunSpec.build(m, cfg, data)).objective)

    def stop_at_21(step: int, loss: float) -> None:
        if step == 21:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(RunSpec.build(m, cfg, data, tmp_path), callback=stop_at_21)
    assert RunDir(tmp_path).read_checkpoint()["step"] == 18
    resumed = _state(train(RunSpec.build(m, cfg, data, tmp_path)).objective)
    assert resumed.keys() == full.keys()
    torch.testing.assert_close(resumed, full, rtol=0, atol=0)
    if method == "dwa":
        averages = full["combine._extra_state"]["averages"]
        assert len(averages) == 2 and not torch.equal(averages[0], averages[1])  # the weights were not uniform


# ---------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_fits_pcgrad_on_digits_mixed_and_compares_with_stl(tmp_path, capsys):
    from pyromtl import cli

    small = [
        "--set",
        "steps=4",
        "--set",
        "latent_dim=8",
        "--set",
        "hidden=[16]",
        "--set",
        "eval_samples=2",
        "--set",
        "quiet=true",
        "--device",
        "cpu",
    ]
    for method in ("pcgrad", "stl"):
        assert cli.main(["fit", method, "--data", "digits-mixed", "--out", str(tmp_path / method), *small]) == 0
    capsys.readouterr()
    assert cli.main(["compare", str(tmp_path / "pcgrad"), "--baseline", str(tmp_path / "stl")]) == 0
    out = capsys.readouterr().out
    assert "Δm" in out and "pcgrad" in out
    loaded = pyromtl.load(tmp_path / "pcgrad")
    assert set(loaded.evaluate()["tasks"]) == {"angle", "even", "digit"}
