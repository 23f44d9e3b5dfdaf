"""BayesAgg measured against its baselines on one network (issue 27).

At their defaults ``bayesagg``, ``ls`` and the eleven other weighting baselines build the same
extractor (no activation after the latent layer) and heads from the same random numbers, and
``bayesagg`` with ``aggregate = false, predict = "learned"`` is ``ls`` to the last bit: the same
parameters, training losses, kept step and test metrics, from ``pyromtl.fit`` and from the CLI.
The other two controls (``aggregate = false`` with the posterior prediction, and the aggregation
with the learned heads) differ from these only where they say.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyro
import pytest
import torch

import pyromtl
from pyromtl import config, methods
from pyromtl.cli import main
from pyromtl.method import MethodContext
from pyromtl.models.bayesagg import head
from pyromtl.models.weighting import WEIGHTINGS
from pyromtl.objective import TrainContext
from pyromtl.schedules import TrainState
from tests.conftest import TINY, built, mixed_simo

#: The LS control: bayesagg training with linear scalarisation and predicting with its learned heads.
LS_CONTROL = {"aggregate": False, "predict": "learned"}


@pytest.fixture(autouse=True)
def _local_params():
    with pyro.settings.context(module_local_params=True):
        yield


def _built(name: str, data, **options: Any):
    method = methods.get(name)
    cfg = config.resolve(method, {"device": "cpu", **options}, data=data)
    torch.manual_seed(0)
    model, guide = built(method, cfg, data, TrainState(total_steps=100))
    return method, cfg, model, guide


def _matched(ls_model, bayesagg_model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each parameter of the shared network and the heads: ``{name: (ls's, bayesagg's)}``."""
    pairs = {
        f"net.{name}": (p, q)
        for (name, p), (_, q) in zip(
            ls_model.encoder.net.named_parameters(), bayesagg_model.extractor[0].named_parameters(), strict=True
        )
    }
    pairs["w"] = (ls_model.w_post.loc, bayesagg_model.weight)
    pairs["b"] = (ls_model.bias, bayesagg_model.bias)
    return pairs


@pytest.mark.parametrize("name", [w.name for w in WEIGHTINGS])
def test_at_the_defaults_bayesagg_builds_each_baselines_network(name: str) -> None:
    data = mixed_simo()
    _, _, baseline, _ = _built(name, data)
    _, _, bayesagg, _ = _built("bayesagg", data)
    for key, (a, b) in _matched(baseline, bayesagg).items():
        assert a.shape == b.shape and torch.equal(a, b), key
    # h is the baselines' z, the linear loc half of the encoder: no activation after the latent layer
    x = data.train_batch(32, torch.Generator().manual_seed(0), "cpu").x
    z, _ = baseline.encoder(x, True)
    assert torch.equal(bayesagg.representation(x), z)
    # and the heads' outputs: θ̂ = [w, b] against the baseline's head
    want = baseline.head(z, baseline.w_post.loc)
    assert torch.equal(head(bayesagg.representation(x), bayesagg.weight.squeeze(-3), bayesagg.bias), want)


def test_without_aggregation_bayesagg_fits_as_ls_to_the_last_bit() -> None:
    """Same seed and steps (two epochs' ends and four validations on the way): the same network,
    training losses, kept step and test metrics."""
    run = {"seed": 0, "device": "cpu", "steps": 40, "eval_every": 10, "quiet": True}
    ls = pyromtl.fit("ls", "digits-mixed", **run)
    control = pyromtl.fit("bayesagg", "digits-mixed", **run, **LS_CONTROL)
    for key, (a, b) in _matched(ls.model, control.model).items():
        assert torch.equal(a, b), key
    assert [h["loss"] for h in control.history] == [h["loss"] for h in ls.history]
    assert [h.get("val_score") for h in control.history] == [h.get("val_score") for h in ls.history]
    for key in ("final_loss", "best_step", "best_val_score"):
        assert control.train_info[key] == ls.train_info[key], key
    assert control.metrics()["tasks"] == ls.metrics()["tasks"]
    assert control.evaluate()["tasks"] == ls.evaluate()["tasks"]


def test_without_aggregation_bayesagg_fits_as_ls_from_the_cli(tmp_path: Path, capsys) -> None:
    common = ["--data", "digits-mixed", "--set", "steps=20", "--set", "eval_every=10", "--device", "cpu", "--quiet"]
    control = [arg for key, value in LS_CONTROL.items() for arg in ("--set", f"{key}={str(value).lower()}")]
    docs = {}
    for name, extra in (("ls", []), ("bayesagg", control)):
        code = main(["fit", name, *common, *extra, "--out", str(tmp_path / name)])
        assert code in (0, None), capsys.readouterr().err
        docs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert docs["bayesagg"]["tasks"] == docs["ls"]["tasks"]
    assert docs["bayesagg"]["average"] == docs["ls"]["average"]
    for key in ("final_loss", "best_step", "best_val_score"):
        assert docs["bayesagg"]["train"][key] == docs["ls"]["train"][key], key


def test_without_aggregation_every_step_is_linear_scalarisation() -> None:
    data = mixed_simo()
    method, cfg, model, guide = _built("bayesagg", data, **TINY, pretrain_steps=0, aggregate=False)
    objective = method.objective(MethodContext(method, cfg, model=model, guide=guide))
    batch = data.train_batch(16, torch.Generator().manual_seed(0), "cpu")
    model.state.step = 50
    objective.backward(batch)
    got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    objective(batch).backward()
    want = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(got) == len(want) == len(list(model.extractor.parameters())) + 2  # the network and the heads
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert objective.diagnostics() == {}  # no aggregation weights


@pytest.mark.parametrize(
    "aggregate, predict, regression_mean, full_data",
    [(False, "learned", False, False), (False, "posterior", True, False), (True, "learned", True, True)],
)
def test_an_epochs_end_builds_what_the_steps_and_the_prediction_read(
    aggregate: bool, predict: str, regression_mean: bool, full_data: bool
) -> None:
    data = mixed_simo()
    method, cfg, model, guide = _built("bayesagg", data, **TINY, aggregate=aggregate, predict=predict)
    objective = method.objective(MethodContext(method, cfg, model=model, guide=guide))
    objective.end_epoch(TrainContext(data, cfg, torch.device("cpu"), torch.Generator()))
    assert (model.store.regression_mean is not None) == regression_mean
    assert (model.store.full_data is not None) == full_data
    point = guide.prediction_heads().view_as(model.heads)
    if predict == "learned":  # every task, the regression one included, predicts with θ̂
        assert torch.equal(point, model.heads.detach())
    else:
        torch.testing.assert_close(point[2, 0], model.store.regression_mean[0])
        assert torch.equal(point[:2], model.heads.detach()[:2])


def test_the_aggregation_with_learned_heads_differs_from_bayesagg_in_the_regression_prediction_only() -> None:
    data = mixed_simo()
    run = {**TINY, "steps": 30, "batch_size": 16, "pretrain_steps": 10, "select": "last", "device": "cpu", "seed": 0}
    full = pyromtl.fit("bayesagg", data, **run)
    learned = pyromtl.fit("bayesagg", data, **run, predict="learned")
    for (name, a), (_, b) in zip(full.model.named_parameters(), learned.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in full.history] == [h["loss"] for h in learned.history]
    got, want = learned.evaluate()["tasks"], full.evaluate()["tasks"]
    assert got["cls"] == want["cls"] and got["bin"] == want["bin"]
    assert got["reg"] != want["reg"]


def test_an_unknown_prediction_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="config key 'predict' must be one of"):
        _built("bayesagg", mixed_simo(), **TINY, predict="mean")
