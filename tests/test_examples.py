"""The shipped examples: every ablation config in ``examples/configs`` and ``examples/custom_prior.py``."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.distributions import kl_divergence

import pyromtl
from pyromtl import cli, config, methods, priors
from tests.conftest import scaled

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
CUSTOM_PRIOR = ROOT / "examples" / "custom_prior.py"

#: One config per paper ablation (VMTL Tables 1 and 2, and the VSTL / VBMTL baselines).
ABLATIONS = {
    "table1_z_det_w_det",
    "table1_z_prob_w_det",
    "table1_z_det_w_prob",
    "table1_z_prob_w_prob",
    "table2_mean",
    "table2_learned",
    "table2_gumbel",
    "vstl",
    "vbmtl",
}

#: Small and short: these runs check that a config trains, not how well.
QUICK = ["steps=3", "latent_dim=8", "hidden=[16]", "eval_every=10", "eval_samples=2", "quiet=true"]
#: VMTL's Monte-Carlo draws, cut to one each for speed.
QUICK_MC = ["mc_z=1", "mc_w=1"]


def load(name: str) -> dict:
    return config.load_toml(CONFIGS / f"{name}.toml")


def test_one_config_per_ablation():
    assert {p.stem for p in CONFIGS.glob("*.toml") if not p.stem.startswith("hib_")} == ABLATIONS


def test_ablations_differ_only_where_the_paper_says():
    def table(name: str, site: str) -> dict:
        return load(name)["priors"][site]

    # Table 2 changes the mixture weights of both sites, nothing else
    base = {site: {k: v for k, v in table("table2_gumbel", site).items() if k != "temperature"} for site in "zw"}
    for name, weights in (
        ("table2_mean", "uniform"),
        ("table2_learned", "learned"),
        ("table2_gumbel", "gumbel_softmax"),
    ):
        for site in "zw":
            got = {k: v for k, v in table(name, site).items() if k != "temperature"}
            assert got == {**base[site], "weights": weights}
    # Table 1 switches each site between the full VMTL prior and a point estimate
    full = load("table2_gumbel")["priors"]
    assert load("table1_z_prob_w_prob")["priors"] == full
    for name in ("table1_z_det_w_det", "table1_z_prob_w_det", "table1_z_det_w_prob"):
        for site in "zw":
            want = full[site] if f"{site}_prob" in name else {"kind": "deterministic"}
            assert table(name, site) == want
    for name in ABLATIONS:
        doc = load(name)
        assert (doc["data"], doc["fraction"]) == ("digits-domains", 0.05)
        assert doc["method"] == (name if name in ("vstl", "vbmtl") else "vmtl")


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_config_resolves_to_its_priors_and_trains(name):
    path = CONFIGS / f"{name}.toml"
    doc = config.load_toml(path)
    method = methods.get(doc["method"])
    # the route of `pyromtl fit METHOD --config FILE --set ...`
    args = cli.build_parser().parse_args(
        [
            "fit",
            doc["method"],
            "--config",
            str(path),
            "--device",
            "cpu",
            *(a for s in QUICK + (QUICK_MC if "mc_z" in method.defaults else []) for a in ("--set", s)),
        ]
    )
    options = cli.fit_options(args)
    resolved = config.resolve(method, options)
    assert set(doc["priors"]) == set(method.priors)  # every latent site is spelled out
    for site, table in doc["priors"].items():
        assert {k: resolved["priors"][site][k] for k in table} == table  # the file's values, defaults around them

    options.pop("method")
    fit = pyromtl.fit(doc["method"], **options)
    assert fit.train_info["steps"] == 3 and np.isfinite(fit.train_info["final_loss"])
    assert (fit.data.name, fit.data.fraction) == ("digits-domains", 0.05)
    assert fit.config["priors"] == resolved["priors"]

    # the priors reach the model: a deterministic site is a point mass in the guide, the others
    # a Gaussian under the configured prior
    batch = fit.data.train_batch(4, torch.Generator().manual_seed(0), "cpu")
    guide_tr = poutine.trace(fit.guide).get_trace(batch)
    model_tr = poutine.trace(poutine.replay(fit.model, trace=guide_tr)).get_trace(batch)
    for site, table in doc["priors"].items():
        point = table["kind"] == "deterministic"
        assert (type(guide_tr.nodes[site]["fn"]).__name__ == "Delta") == point
        assert getattr(fit.model, f"{site}_prior").spec.to_dict() == resolved["priors"][site]
        assert (f"{site}_weights" in model_tr.nodes) == (table["kind"] == "task_mixture")
    mixtures = {"alpha": "w", "beta": "z"}
    expected = {k for k, site in mixtures.items() if doc["priors"][site]["kind"] == "task_mixture"}
    assert set(fit.relatedness()) == expected


# ----------------------------------------------------------------------- examples/custom_prior.py
def test_custom_prior_script_trains_and_prints_metrics():
    # one thread: tiny networks gain nothing from more, and a busy machine loses a lot
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(CUSTOM_PRIOR), "--steps", "5", "--device", "cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )
    assert done.returncode == 0, done.stderr
    average = re.search(r"^\|\s*average\s*\|\s*([0-9.]+)", done.stdout, flags=re.M)
    assert average and 0.0 <= float(average.group(1)) <= 1.0, done.stdout
    assert "accuracy" in done.stdout and "learned prior scale of w" in done.stdout


@pytest.fixture
def custom_prior_module():
    """The example imported in-process; its prior kind is unregistered afterwards."""
    before = set(priors.available())
    spec = importlib.util.spec_from_file_location("custom_prior_example", CUSTOM_PRIOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for kind in set(priors.available()) - before:
        del priors.registry._REGISTRY[kind]


def test_custom_prior_kind_uses_the_documented_api(custom_prior_module):
    """The kind registers from outside, validates its parameter and owns its learned scale."""
    assert "laplace" in priors.available() and priors.describe("laplace") == {"scale": 1.0}
    with pytest.raises(ValueError, match="positive"):
        priors.parse_spec({"kind": "laplace", "scale": -1.0})
    site = priors.PriorSite("w", {"kind": "laplace", "scale": 0.3})
    prior = site.build(batch_shape=(4, 1), event_shape=(3, 5), num_tasks=4)
    assert prior.batch_shape == (4, 1) and prior.event_shape == (3, 5)
    assert dict(site.named_parameters())["params.scale"].shape == (3, 5)
    torch.testing.assert_close(prior.base_dist.scale.expand(4, 1, 3, 5), torch.full((4, 1, 3, 5), 0.3))
    # the closed-form KL the example's docstring relies on (no Monte-Carlo fallback)
    guide = dist.Normal(torch.zeros(4, 1, 3, 5), 1.0).to_event(2)
    assert kl_divergence(guide, prior).shape == (4, 1)
    # a learned parameter: the log density moves it
    prior.log_prob(torch.ones(4, 1, 3, 5)).sum().backward()
    assert site.params["scale"].grad.abs().sum() > 0
