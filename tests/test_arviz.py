"""ArviZ export: groups, dims and coordinates, summaries, PSIS-LOO and the netCDF round trip."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import arviz as az
import numpy as np
import pytest
import xarray as xr

import pyromtl
from pyromtl import methods
from pyromtl.data.core import MultiTaskData
from tests.conftest import TINY, blobs_mimo, mixed_simo

DRAWS = 30  # enough for PSIS-LOO's tail fit, few enough to stay fast
GROUPS = ("posterior", "posterior_predictive", "log_likelihood", "observed_data")


@pytest.fixture(scope="module")
def vmtl():
    fit = pyromtl.fit("vmtl", blobs_mimo(), steps=4, **TINY, mc_z=2, mc_w=2)
    return fit, fit.to_arviz(num_samples=DRAWS)


@pytest.fixture(scope="module")
def mixed():
    fit = pyromtl.fit("vbmtl", mixed_simo(), steps=4, **TINY)
    return fit, fit.to_arviz(num_samples=DRAWS)


def quiet_loo(tree):
    """``az.loo`` without its Pareto-k warnings (tiny runs have influential points)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return az.loo(tree)


def test_groups_dims_and_task_coords(vmtl) -> None:
    fit, tree = vmtl
    names = fit.data.task_names
    assert set(GROUPS) <= set(tree.children)
    post = tree["posterior"]
    assert post.sizes["chain"] == 1 and post.sizes["draw"] == DRAWS
    assert post["w"].dims == ("chain", "draw", "task", "class", "latent_dim")
    assert post["w"].shape[2:] == (3, 3, 8)
    for name in ("w_weights", "z_weights"):
        assert post[name].dims == ("chain", "draw", "task", "other_task")
    assert list(post["task"].values) == names and list(post["other_task"].values) == names
    n_obs = sum(fit.data.split_sizes("test"))
    for group in ("posterior_predictive", "log_likelihood"):
        assert tree[group]["y"].dims == ("chain", "draw", "obs") and tree[group]["y"].shape == (1, DRAWS, n_obs)
    obs = tree["observed_data"]
    assert obs["y"].dims == ("obs",)
    assert [int((obs["task"] == n).sum()) for n in names] == fit.data.split_sizes("test")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # mcse of the constant zero diagonal
def test_summary_is_finite(vmtl) -> None:
    _, tree = vmtl
    summary = az.summary(tree, var_names=["w", "w_weights", "z_weights"])
    assert len(summary) == 3 * 3 * 8 + 2 * 3 * 3
    assert np.isfinite(summary[["mean", "sd"]].to_numpy(dtype=float)).all()


def test_loo_is_finite(vmtl) -> None:
    _, tree = vmtl
    res = quiet_loo(tree)
    assert np.isfinite(res.elpd) and np.isfinite(res.se)
    assert res.n_data_points == tree["observed_data"].sizes["obs"]


def test_observed_data_matches_the_split(mixed) -> None:
    fit, tree = mixed
    obs = tree["observed_data"]
    targets = fit.predict("test", num_samples=1).y  # original scale
    for name, y in zip(fit.data.task_names, targets):
        np.testing.assert_allclose(obs["y"].where(obs["task"] == name, drop=True).values, y, rtol=1e-5)


def test_netcdf_round_trip(vmtl, tmp_path: Path) -> None:
    _, tree = vmtl
    path = tmp_path / "posterior.nc"
    tree.to_netcdf(path, engine="h5netcdf")
    with xr.open_datatree(path, engine="h5netcdf") as loaded:
        assert set(loaded.children) == set(tree.children)
        for group in tree.children:
            xr.testing.assert_equal(loaded[group].to_dataset(), tree[group].to_dataset())
    assert np.isfinite(quiet_loo(az.from_netcdf(path)).elpd)


def test_relatedness_rows_are_mixing_weights(vmtl) -> None:
    fit, tree = vmtl
    expected = fit.relatedness()
    rel = tree["relatedness"]
    assert set(rel.data_vars) == {"alpha", "beta"}
    for name, draws in (("alpha", "w_weights"), ("beta", "z_weights")):
        for matrix in (rel[name], tree["posterior"][draws]):
            np.testing.assert_allclose(matrix.sum("other_task"), 1.0, atol=1e-5)
            diagonal = np.diagonal(matrix.values, axis1=-2, axis2=-1)
            np.testing.assert_array_equal(diagonal, 0.0)
        np.testing.assert_allclose(rel[name].values, expected[name])
        assert rel[name].dims == ("task", "other_task")


def test_mixed_simo_tasks(mixed) -> None:
    _fit, tree = mixed
    post = tree["posterior"]
    assert list(post["regression_task"].values) == ["reg"]
    assert (post["noise"].values > 0).all()
    w = post["w"].sel(task="bin").values  # a binary head has one output: the padded classes are NaN
    assert np.isfinite(w[..., 0, :]).all() and np.isnan(w[..., 1:, :]).all()
    rep = tree["posterior_predictive"]["y"]
    assert set(np.unique(rep.where(rep["task"] == "cls", drop=True))) <= {0.0, 1.0, 2.0}
    assert set(np.unique(rep.where(rep["task"] == "bin", drop=True))) <= {0.0, 1.0}
    reg = rep.where(rep["task"] == "reg", drop=True)
    assert abs(float(reg.mean()) - 10.0) < 5.0  # draws on the target's scale (mean 10), not standardised
    assert "relatedness" not in tree.children and "w_weights" not in post
    assert np.isfinite(quiet_loo(tree).elpd)


@pytest.mark.parametrize("method", [m for m in methods.available() if m != "vmtl"])  # vmtl: the fixture
def test_every_method_exports(method: str) -> None:
    small_mc = {"mc_z": 2, "mc_w": 2} if "mc_z" in methods.get(method).defaults else {}
    data = blobs_mimo(n=30) if "mimo" in methods.get(method).settings else mixed_simo()
    fit = pyromtl.fit(method, data, steps=2, **TINY, **small_mc)
    tree = fit.to_arviz(num_samples=DRAWS)
    assert set(GROUPS) <= set(tree.children)
    assert ("relatedness" in tree.children) == bool(fit.relatedness())
    loglik = tree["log_likelihood"]["y"]
    assert np.isfinite(loglik).all()
    point = method in POINT_ESTIMATES
    assert tree.attrs["point_estimate"] == int(point)
    assert tree["posterior_predictive"].sizes["draw"] == DRAWS
    if not point:
        assert loglik.sizes["draw"] == DRAWS and np.isfinite(quiet_loo(tree).elpd)
        return
    # one draw of what does not vary, and a summary without r_hat warnings
    assert loglik.sizes["draw"] == 1 and tree["posterior"].sizes["draw"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        az.summary(tree)


def _documented_point_estimates() -> set[str]:
    """The list of point estimates in the ArviZ guide (``docs/guide/arviz.md``)."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "arviz.md").read_text(encoding="utf-8")
    start = page.index("Point estimates at their defaults:")
    return set(re.findall(r"`([^`]+)`", page[start : page.index("\n\n", start)]))


#: The ArviZ guide's list, which this file checks against each method's export.
POINT_ESTIMATES = _documented_point_estimates()


def test_the_arviz_guide_lists_point_estimates_among_the_methods() -> None:
    assert POINT_ESTIMATES and POINT_ESTIMATES <= set(methods.available())


def test_a_method_without_export_sites_still_has_sample_dims() -> None:
    """Cross-stitch on classification tasks exports no posterior variable; the group keeps chain and draw."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4))
    data = MultiTaskData.from_arrays(
        x, {"a": (x[:, 0] > 0).astype(int), "b": (x[:, 1] > 0).astype(int)}, ["binary", "binary"], name="two-binary"
    )
    fit = pyromtl.fit("cross-stitch", data, steps=2, **TINY)
    post = fit.to_arviz(num_samples=DRAWS)["posterior"]
    assert not post.data_vars
    assert dict(post.sizes) == {"chain": 1, "draw": 1}  # a point estimate: one draw
