"""A run is worked out once (``RunSpec``): its config, device, data, steps and checkpoint are
resolved in one place, and its metrics and posterior come from one set of predictive draws."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from scipy.special import logsumexp

import pyromtl
from pyromtl import cli, config, datasets, methods, runspec
from pyromtl.fit import MIN_DRAWS, fit_resolved
from pyromtl.method import MethodContext
from pyromtl.rundir import RunDir
from pyromtl.runspec import RunSpec
from pyromtl.train import train
from tests.conftest import TINY, Interrupt, blobs_mimo


def _count(monkeypatch: pytest.MonkeyPatch, owner, name: str) -> list[int]:
    """Count the calls of ``owner.name`` (the function keeps working)."""
    calls: list[int] = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_the_config_is_final_after_resolve_and_read_only_after(tmp_path: Path) -> None:
    m = methods.get("bmtl")
    data = blobs_mimo()
    cfg = config.resolve(m, {**TINY, "steps": 4, "device": "cpu", "root": "~"}, data=data)
    assert cfg["data"] == "blobs" and cfg["fraction"] == 1.0 and cfg["root"] == str(Path.home().resolve())
    kept = copy.deepcopy(cfg)
    fit = fit_resolved(m, cfg, data, tmp_path / "run")
    assert cfg == kept  # nothing downstream edits it
    with pytest.raises(TypeError):
        fit.config["lr"] = 1.0  # type: ignore[index]
    assert config.load_toml(tmp_path / "run" / "config.toml") == kept


def test_device_fraction_and_length_are_resolved_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    devices = _count(monkeypatch, runspec, "resolve_device")
    fractions = _count(monkeypatch, datasets, "default_fraction")
    lengths = _count(monkeypatch, runspec, "total_steps")
    pyromtl.fit("vbmtl", "digits-domains", steps=3, device="cpu", out=tmp_path / "run", **TINY)
    assert (len(devices), len(fractions), len(lengths)) == (1, 1, 1)


def test_a_resumed_or_complete_run_reads_its_checkpoint_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    m = methods.get("vbmtl")
    data = blobs_mimo()
    cfg = config.resolve(m, {**TINY, "steps": 20, "checkpoint_every": 5, "device": "cpu"}, data=data)

    def stop(step: int, loss: float) -> None:
        if step == 12:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(RunSpec.build(m, cfg, data, tmp_path), callback=stop)
    reads = _count(monkeypatch, RunDir, "read_checkpoint")
    resumed = fit_resolved(m, cfg, data, tmp_path)
    assert len(reads) == 1 and resumed.train_info["steps"] == 20
    again = fit_resolved(m, cfg, data, tmp_path)
    assert len(reads) == 2 and again.train_info["complete"]


def test_fit_prints_the_metrics_it_wrote_without_reading_them_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    reads = _count(monkeypatch, RunDir, "read_metrics")
    out = tmp_path / "run"
    args = ["fit", "stl", "--data", "digits-domains", "--steps", "3", "--device", "cpu", "--quiet", "--out", str(out)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert reads == []
    doc = RunDir(out).read_metrics()
    for name, values in doc["tasks"].items():
        assert f"{values['accuracy']:.4f}" in printed, name


def test_metrics_and_posterior_come_from_the_same_draws(tmp_path: Path) -> None:
    """Each classification task's NLL in metrics.json is the mean negative log predictive density
    of the posterior.nc draws: both read one prediction of the test split."""
    fit = pyromtl.fit("vbmtl", blobs_mimo(), steps=10, device="cpu", out=tmp_path / "run", **TINY)
    doc = RunDir(tmp_path / "run").read_metrics()
    with xr.open_datatree(tmp_path / "run" / "posterior.nc", engine="h5netcdf") as tree:
        loglik = tree["log_likelihood"]["y"].load()
    assert loglik.sizes["draw"] == MIN_DRAWS and fit.config["eval_samples"] < MIN_DRAWS
    values = loglik.values.reshape(-1, loglik.sizes["obs"])
    lppd = logsumexp(values, axis=0) - np.log(values.shape[0])
    for name, metrics in doc["tasks"].items():
        mine = lppd[loglik["task"].values == name]
        assert -mine.mean() == pytest.approx(metrics["nll"], rel=1e-5), name
    # another draw count is another prediction, whose NLL differs
    other = fit.evaluate(num_samples=7)["tasks"]
    assert any(other[n]["nll"] != doc["tasks"][n]["nll"] for n in doc["tasks"])


def test_a_context_says_what_its_phase_lacks() -> None:
    m = methods.get("bmtl")
    ctx = MethodContext(m, config.resolve(m, {}))
    for name in ("data", "model", "guide", "doc"):
        with pytest.raises(RuntimeError, match=f"method 'bmtl' read ctx.{name}, which this phase"):
            getattr(ctx, name)
    later = ctx.replace(model="model", history=[{"step": 1}])
    assert later.model == "model" and later.history == [{"step": 1}] and later.config is ctx.config
    with pytest.raises(TypeError, match="no field"):
        ctx.replace(modle=1)


def test_a_config_for_other_data_is_refused_before_anything_runs() -> None:
    m = methods.get("stl")
    cfg = config.resolve(m, {"device": "cpu"})  # the default dataset, digits-domains at 5%
    with pytest.raises(ValueError, match="resolved for data 'digits-domains' but data 'blobs' was given"):
        RunSpec.build(m, cfg, blobs_mimo())


def test_the_spec_reads_a_checkpoint_onto_the_cpu(tmp_path: Path) -> None:
    """The checkpoint is held as read (CPU tensors) and the trainer copies it onto the device."""
    m = methods.get("bmtl")
    data = blobs_mimo()
    cfg = config.resolve(m, {**TINY, "steps": 4, "device": "cpu"}, data=data)
    fit_resolved(m, cfg, data, tmp_path)
    spec = RunSpec.build(m, cfg, data, tmp_path)
    assert spec.complete and spec.checkpoint is not None
    assert all(v.device == torch.device("cpu") for v in spec.checkpoint["objective"].values() if torch.is_tensor(v))
