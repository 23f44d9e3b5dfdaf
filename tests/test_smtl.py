"""The SMTL family: gates at 0 and 1 are STL and hard sharing, straight-through gates, real pruning,
η̂ and Δ_I of ``pyromtl compare``, bi-level gates and their checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine
from pyro.nn import PyroModule

import pyromtl
from pyromtl import config, methods
from pyromtl.cli import main
from pyromtl.method import MethodContext
from pyromtl.params import local_params
from pyromtl.predict import draw
from pyromtl.rundir import RunDir
from pyromtl.runspec import RunSpec
from pyromtl.schedules import TrainState
from pyromtl.train import train
from tests.conftest import TINY, built, mixed_simo

VARIANTS = ("smtl", "lsmtl", "smtl-c", "lsmtl-c")


@local_params
def _build(name: str, data, **options):
    m = methods.get(name)
    cfg = config.resolve(m, {**TINY, "device": "cpu", **options}, data=data)
    torch.manual_seed(0)
    return built(m, cfg, data, TrainState(total_steps=100))


@local_params
def _outputs(model, guide, batch) -> torch.Tensor:
    return draw(model, guide, batch, 1, 2).outputs[0]


def _copy_baseline_weights(smtl, baseline, guide, encoder: torch.nn.Module) -> None:
    """Give ``encoder`` (SMTL's public or private side) and SMTL's decoders the baseline's weights.

    The baseline's encoder emits ``(loc, scale)``; its point-estimate ``z`` is the ``loc`` half.
    """
    d = smtl.decoder[-1].weight.shape[1]
    per_task = baseline.encoder.per_task
    with torch.no_grad():
        for s, t in zip(baseline.encoder.net.parameters(), encoder.parameters()):
            if s.shape != t.shape:  # the last layer
                s = s[..., :d] if per_task else s[:d]
            t.copy_(s)
        smtl.decoder[-1].weight.copy_(guide.w_post.loc.squeeze(1).transpose(-1, -2))
        smtl.decoder[-1].bias.copy_(baseline.bias)


@pytest.mark.parametrize("alpha, baseline", [(0.0, "stl"), (1.0, "bmtl")])
def test_fixed_gates_reproduce_stl_and_hard_sharing(alpha: float, baseline: str) -> None:
    """α_t = 0 is STL and α_t = 1 is hard sharing (§3.2): same weights, same predictions."""
    data = mixed_simo()
    model, guide = _build("smtl", data)
    base, base_guide = _build(baseline, data)
    _copy_baseline_weights(model, base, base_guide, model.private if alpha == 0 else model.public)
    with torch.no_grad():
        model.gate_logit.fill_(math.inf if alpha == 1 else -math.inf)
    assert torch.equal(model.alpha(), torch.full((3,), alpha))
    batch = next(data.eval_batches("test", "cpu"))
    torch.testing.assert_close(_outputs(model, guide, batch), _outputs(base, base_guide, batch), rtol=1e-6, atol=1e-6)


def _trace(model, batch):
    return local_params(poutine.trace(model).get_trace)(batch)


@pytest.mark.parametrize("name", ["lsmtl", "lsmtl-c"])
def test_straight_through_gates_are_hard_forward_and_carry_gradient(name: str) -> None:
    """Eq. 3 forward (a hard 0/1 gate), eq. 4 backward (the relaxed sample's gradient reaches α_t)."""
    data = mixed_simo()
    model, _ = _build(name, data, temperature=0.5)
    batch = data.train_batch(16, torch.Generator().manual_seed(0), "cpu")
    torch.manual_seed(3)
    tr = _trace(model, batch)
    gate = tr.nodes["gate"]["value"]
    assert gate.shape == (3, 1) and set(gate.unique().tolist()) <= {0.0, 1.0}
    (-tr.nodes["y"]["fn"].log_prob(batch.y).sum()).backward()
    grad = model.gate_logit.grad
    assert grad is not None and torch.isfinite(grad).all() and (grad != 0).all()
    with torch.no_grad():  # predicting: the test-time gate 1[α_t >= 0.5], no draw
        model.gate_logit.copy_(torch.tensor([-0.1, 0.1, 2.0]))
        gate = _trace(model, batch).nodes["gate"]["value"]
    assert gate.flatten().tolist() == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("name", ["lsmtl", "lsmtl-c"])
def test_pruned_export_matches_the_gated_model(name: str) -> None:
    fit = pyromtl.fit(name, mixed_simo(), steps=3, device="cpu", **TINY)
    with torch.no_grad():
        fit.model.gate_logit.copy_(torch.tensor([1.0, -1.0, 2.0]))  # tasks 0, 2 public; 1 private
    pruned = fit.export_pruned()
    assert not any(isinstance(m, PyroModule) for m in pruned.modules())  # a plain nn.Module
    batch = next(fit.data.eval_batches("test", "cpu"))
    with torch.no_grad():
        torch.testing.assert_close(pruned(batch.x), _outputs(fit.model, fit.guide, batch), rtol=0, atol=1e-6)
    # the public encoder, one private encoder of three, and one decoder per task
    model = fit.model
    assert _count(pruned) == _count(model.public) + _count(model.private) // 3 + _count(model.decoder)
    with torch.no_grad():
        fit.model.gate_logit.fill_(-1.0)  # every task private: no public encoder left
    assert fit.export_pruned().public is None


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_soft_gates_cannot_be_pruned() -> None:
    fit = pyromtl.fit("smtl", mixed_simo(), steps=2, device="cpu", **TINY)
    with pytest.raises(ValueError, match="lite variant"):
        fit.export_pruned()
    with pytest.raises(ValueError, match="no pruned export"):
        pyromtl.fit("stl", mixed_simo(), steps=2, device="cpu", **TINY).export_pruned()


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_fits_mixed_task_types_and_reports_its_gates(name: str) -> None:
    fit = pyromtl.fit(name, mixed_simo(), steps=20, device="cpu", **TINY)
    gates = fit.relatedness()["gates"]
    assert gates.shape == (3, 3) and (gates == gates.diagonal() * torch.eye(3).numpy()).all()
    assert ((0 < gates.diagonal()) & (gates.diagonal() < 1)).all()
    assert set(fit.evaluate()["tasks"]) == {"cls", "bin", "reg"}
    draws = methods.get(name).export[0].draw(fit.context, 5)
    assert draws.shape == (5, 3)


def test_registered_networks_run_as_one_batched_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered backbone's private copies and a registered decoder's run as one vmapped stack each,
    and the pruned network keeps the chosen ones (their buffers sliced with their parameters)."""
    from pyromtl import networks
    from pyromtl.nn import TaskStack

    monkeypatch.setattr(networks, "_REGISTRY", {})
    networks.register("tiny", tiny_encoder)
    networks.register("linear", torch.nn.Linear)
    fit = pyromtl.fit("lsmtl-c", mixed_simo(), steps=5, device="cpu", backbone="tiny", decoder="linear", **TINY)
    assert isinstance(fit.model.private.backbone, TaskStack) and isinstance(fit.model.decoder, TaskStack)
    assert fit.model.private.backbone.stacked[0].shape[0] == 3
    batch = next(fit.data.eval_batches("test", "cpu"))
    with torch.no_grad():
        fit.model.gate_logit.copy_(torch.tensor([1.0, -1.0, 1.0]))
        torch.testing.assert_close(
            fit.export_pruned()(batch.x), _outputs(fit.model, fit.guide, batch), rtol=0, atol=1e-6
        )
    with pytest.raises(
        ValueError,
        match="config key 'decoder' names network 'tiny_encoder', which is not registered "
        r"\(registered: linear, tiny\)",
    ):
        pyromtl.fit("smtl", mixed_simo(), steps=1, device="cpu", decoder="tiny_encoder", **TINY)


def tiny_encoder(input_shape: tuple[int, ...]) -> torch.nn.Module:
    """A backbone with a BatchNorm: its running statistics are stacked per task too."""
    return torch.nn.Sequential(torch.nn.Linear(input_shape[0], 12), torch.nn.BatchNorm1d(12), torch.nn.Tanh())


# ----------------------------------------------------------------------------- η̂ and Δ_I against STL
def _compare_rows(capsys, runs: list[Path], baseline: Path) -> dict[str, list[str]]:
    """The Δ_I and η̂ rows of ``pyromtl compare``, cells by column."""
    assert main(["compare", *map(str, runs), "--baseline", str(baseline)]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("Δ_I% ↑", "η̂ ↑"):
            rows[cells[0]] = cells[2:]
    return rows


def _run(path: Path, tasks: dict[str, float]) -> Path:
    path.mkdir()
    doc = {
        "method": path.name,
        "dataset": "digits-conflict",
        "fraction": 1.0,
        "seed": 0,
        "tasks": {t: {"accuracy": a} for t, a in tasks.items()},
    }
    (path / "metrics.json").write_text(json.dumps(doc))
    return path


def test_compare_reports_eta_hat_and_delta_i_by_hand(tmp_path: Path, capsys) -> None:
    stl = _run(tmp_path / "stl", {"digit": 0.80, "even": 0.90, "large": 0.50, "clockwise": 0.60})
    # better on digit and even, tied on large (ties are safe), worse on clockwise
    bmtl = _run(tmp_path / "bmtl", {"digit": 0.88, "even": 0.99, "large": 0.50, "clockwise": 0.45})
    smtl = _run(tmp_path / "smtl", {"digit": 0.84, "even": 0.90, "large": 0.55, "clockwise": 0.66})
    rows = _compare_rows(capsys, [bmtl, smtl, stl], stl)
    # Δ_I = mean_t (M_t − STL_t) / STL_t × 100
    bmtl_di = (0.08 / 0.80 + 0.09 / 0.90 + 0.0 - 0.15 / 0.60) / 4 * 100  # = -1.25
    smtl_di = (0.04 / 0.80 + 0.0 + 0.05 / 0.50 + 0.06 / 0.60) / 4 * 100  # = +6.25
    assert rows["Δ_I% ↑"] == [f"{bmtl_di:+.2f}", f"{smtl_di:+.2f}", "—"] == ["-1.25", "+6.25", "—"]
    assert rows["η̂ ↑"] == ["75.0", "100.0", "—"]  # bmtl: negative sharing on one task of four


@pytest.mark.slow
def test_hard_sharing_is_worse_than_stl_on_the_conflicting_angle() -> None:
    """Negative sharing on digits-mixed at the defaults and the 1,000 steps of docs/methods/smtl.md: ``bmtl``'s
    angle NMSE is above ``stl``'s (25-35 s on two cores).

    Its five seeds put bmtl 8-16% above stl on every seed; seed 3 (16%) is checked
    with a 5% margin, which leaves room for numerical drift between library versions.
    """
    # validation checks every distribution built; off, the two fits take a third less time
    with pyro.validation_enabled(False):
        nmse = {
            name: pyromtl.fit(name, "digits-mixed", seed=3, steps=1000, device="cpu", quiet=True).evaluate()["tasks"][
                "angle"
            ]["nmse"]
            for name in ("stl", "bmtl")
        }
    assert nmse["bmtl"] > 1.05 * nmse["stl"], nmse


@pytest.mark.slow
def test_compare_of_fitted_runs_against_stl(tmp_path: Path, capsys) -> None:
    """A tiny SMTL run and an STL run on the conflict data: compare's rows match metrics.json by hand."""
    tiny = {**TINY, "steps": 20, "device": "cpu"}
    dirs = {}
    for name in ("lsmtl", "stl"):
        dirs[name] = tmp_path / name
        pyromtl.fit(name, "digits-conflict", out=dirs[name], **tiny)
    acc = {n: {t: m["accuracy"] for t, m in RunDir(d).read_metrics()["tasks"].items()} for n, d in dirs.items()}
    rel = [(acc["lsmtl"][t] - acc["stl"][t]) / acc["stl"][t] for t in acc["stl"]]
    rows = _compare_rows(capsys, [dirs["lsmtl"], dirs["stl"]], dirs["stl"])
    assert rows["Δ_I% ↑"][0] == f"{100 * sum(rel) / len(rel):+.2f}"
    assert rows["η̂ ↑"][0] == f"{100 * sum(r >= 0 for r in rel) / len(rel):.1f}"


# ----------------------------------------------------------------------------- bi-level gates
def test_bilevel_gates_learn_on_a_val_part_that_model_selection_never_sees() -> None:
    data = mixed_simo()
    m = methods.get("smtl")
    cfg = config.resolve(m, {**TINY, "steps": 10, "device": "cpu", "gates": "bilevel", "gate_lr": 0.05}, data=data)
    prepared = m.prepare(MethodContext(m, cfg, data=data))
    gates, val = prepared.splits["gates"][0], prepared.splits["val"][0]
    assert set(gates.tolist()).isdisjoint(val.tolist())
    assert sorted(gates.tolist() + val.tolist()) == sorted(data.splits["val"][0].tolist())
    assert len(val) == round(len(data.splits["val"][0]) * cfg["selection_fraction"])
    assert (
        m.prepare(MethodContext(m, config.resolve(m, {**TINY, "device": "cpu"}), data=data)) is data
    )  # joint: untouched
    result = train(RunSpec.build(m, cfg, prepared))
    objective = result.objective
    logit = objective.model.gate_logit
    assert id(logit) not in {id(p) for p in objective.trainable_parameters()}
    assert not torch.equal(logit.detach(), torch.zeros(3))  # moved by the gates' own optimiser only
    assert len(objective.gate_optim.state_dict()["state"]) == 1


@pytest.mark.parametrize("gates", ["joint", "bilevel"])
def test_gates_resume_exactly_from_a_checkpoint(tmp_path: Path, gates: str) -> None:
    """A run stopped at step 25 and resumed to 30 ends where one run of 30 steps ends: every
    parameter, the gates and their own optimiser's moments (joint and bi-level alike)."""
    m = methods.get("lsmtl")
    data = mixed_simo()
    cfg = config.resolve(
        m,
        {**TINY, "steps": 30, "checkpoint_every": 10, "device": "cpu", "gates": gates, "gate_lr": 0.05},
        data=data,
    )
    train(RunSpec.build(m, cfg, data, tmp_path / "once"))
    train(RunSpec.build(m, {**cfg, "steps": 25}, data, tmp_path / "resumed"))
    train(RunSpec.build(m, cfg, data, tmp_path / "resumed"))
    once, resumed = (RunDir(tmp_path / d).read_checkpoint() for d in ("once", "resumed"))
    assert once["step"] == resumed["step"] == 30
    a, b = once["objective"], resumed["objective"]
    assert a.keys() == b.keys()
    for k, v in a.items():
        if torch.is_tensor(v):
            torch.testing.assert_close(b[k], v, rtol=0, atol=0, msg=k)
    moments = [o["_extra_state"]["gate_optim"]["state"][0] for o in (a, b)]
    torch.testing.assert_close(moments[1], moments[0], rtol=0, atol=0)
    assert not torch.equal(moments[0]["exp_avg"], torch.zeros(3))


def test_bilevel_needs_val_rows_on_both_sides() -> None:
    with pytest.raises(ValueError, match="selection_fraction"):
        pyromtl.fit("smtl", mixed_simo(), steps=1, device="cpu", gates="bilevel", selection_fraction=1.0, **TINY)
    with pytest.raises(ValueError, match="gates must be one of"):
        pyromtl.fit("smtl", mixed_simo(), steps=1, device="cpu", gates="upper", **TINY)


# ----------------------------------------------------------------------------- Bayesian gates (beyond the paper)
@pytest.mark.parametrize("name", ["smtl", "lsmtl"])
def test_bayesian_gate_elbo_carries_its_monte_carlo_kl(name: str) -> None:
    """Under ``priors.gate = relaxed_bernoulli`` the loss is −(log p(y|g) + log p(g) − log q(g)) at
    the guide's draw, with the prior scoring the relaxed value behind a hard draw (finite)."""
    data = mixed_simo()
    m = methods.get(name)
    cfg = config.resolve(m, {**TINY, "device": "cpu"}, priors={"gate": {"kind": "relaxed_bernoulli"}}, data=data)
    assert cfg["priors"]["gate"] == {"kind": "relaxed_bernoulli", "probs": 0.5}
    model, guide = _build(name, data, priors={"gate": "relaxed_bernoulli"})
    with torch.no_grad():
        model.gate_logit.copy_(torch.tensor([1.5, -0.5, 0.2]))  # q ≠ p, so the KL term is not zero
    batch = data.train_batch(16, torch.Generator().manual_seed(0), "cpu")
    loss_fn = local_params(lambda: m.elbo(MethodContext(m, cfg))(model, guide))()
    torch.manual_seed(5)
    loss = local_params(loss_fn)(batch)
    torch.manual_seed(5)
    guide_tr = _trace(guide, batch)
    model_tr = local_params(poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace)(batch)
    log_q = guide_tr.nodes["gate"]["fn"].log_prob(guide_tr.nodes["gate"]["value"]).sum()
    log_p = model_tr.nodes["gate"]["fn"].log_prob(model_tr.nodes["gate"]["value"]).sum()
    log_lik = (model_tr.nodes["y"]["fn"].log_prob(batch.y) * batch.scale).sum()
    assert torch.isfinite(log_q) and torch.isfinite(log_p) and log_q != log_p
    torch.testing.assert_close(loss, -(log_lik + log_p - log_q))
    if name == "lsmtl":
        assert set(guide_tr.nodes["gate"]["value"].unique().tolist()) <= {0.0, 1.0}
    loss.backward()
    assert (model.gate_logit.grad != 0).all()
