"""Plots, the run directory written by ``pyromtl.fit(..., out=)`` and the markdown report."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import xarray as xr

import pyromtl
from pyromtl import config, methods
from pyromtl.method import MethodContext
from pyromtl.plots import plot_run
from pyromtl.report import report
from pyromtl.rundir import RunDir
from tests.conftest import TINY, blobs_mimo, mixed_simo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000, path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[pyromtl.Fit, Path]:
    out = tmp_path_factory.mktemp("vmtl-run")
    fit = pyromtl.fit("vmtl", blobs_mimo(), steps=10, **TINY, mc_z=2, mc_w=2, out=out)
    return fit, out


def test_fit_writes_the_run_directory(run) -> None:
    fit, out = run
    for name in ("config.toml", "metrics.json", "posterior.nc", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
    names = {p.name for p in (out / "plots").glob("*.png")}
    assert names == {"training.png", "task_metrics.png", "relatedness_alpha.png", "relatedness_beta.png"}
    for path in (out / "plots").glob("*.png"):
        assert_png(path)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*"))  # atomic writes leave no temp files
    with xr.open_datatree(out / "posterior.nc", engine="h5netcdf") as tree:
        assert {"posterior", "log_likelihood", "relatedness"} <= set(tree.children)
        assert list(tree["posterior"]["task"].values) == fit.data.task_names


def test_plot_run_without_relatedness(tmp_path: Path) -> None:
    fit = pyromtl.fit("stl", mixed_simo(), steps=2, **TINY)
    written = plot_run(RunDir(tmp_path), history=fit.history, doc=fit.metrics())
    assert {p.name for p in written} == {"training.png", "task_metrics.png"}
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"training.png", "task_metrics.png"}
    for path in written:
        assert_png(path)


def test_report(run) -> None:
    fit, out = run
    text = report(out)
    body, last = text.rstrip().rsplit("\n", 1)
    table = re.sub(r" +", " ", body)  # columns are padded to align
    assert Path(last) == out / "report.md" and (out / "report.md").read_text().strip() == body.strip()
    assert "# vmtl on blobs" in body
    assert "| task | accuracy | auc | ece | brier |" in table and "| average |" in table
    metrics = json.loads((out / "metrics.json").read_text())
    for name, values in metrics["tasks"].items():
        assert f"| {name} | {values['accuracy']:.4f} |" in table
    assert "α: classifier-prior mixing weights" in body and "β: representation-prior mixing weights" in body
    alpha = metrics["relatedness"]["alpha"]
    assert f"| {fit.data.task_names[0]} | 0.000 | {alpha[0][1]:.3f} | {alpha[0][2]:.3f} |" in table
    assert "lppd = " in body and "elpd_loo = " in body
    assert "(plots/relatedness_alpha.png)" in body and "(plots/training.png)" in body


def test_report_restores_missing_plots(run, tmp_path: Path) -> None:
    _, out = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "plots")
    report(copy)
    assert {p.name for p in (copy / "plots").glob("*.png")} == {p.name for p in (out / "plots").glob("*.png")}


def test_report_rejects_a_directory_that_is_no_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a pyromtl run directory"):
        report(tmp_path)
    (tmp_path / "metrics.json").write_text("{broken")
    with pytest.raises(ValueError, match="invalid JSON"):
        report(tmp_path)
    (tmp_path / "metrics.json").write_text('{"dataset": "d", "tasks": {"t0": {"accuracy": 0.5}}}')
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"checkpoint.pt cannot be read"):
        report(tmp_path)


def test_method_figures_are_drawn_only_when_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Figures are functions (HIB's dendrogram, the relatedness heatmap): existing files cost no drawing."""
    import pyromtl.models.hib as hib
    import pyromtl.plots as plots

    distance = [[0.0, 1.0, 3.0], [1.0, 0.0, 2.5], [3.0, 2.5, 0.0]]
    doc = {
        "method": "hib",
        "tasks": {name: {"accuracy": 0.5} for name in ("a", "b", "c")},
        "relatedness": {"distance": distance},
    }
    method = methods.get("hib")
    context = MethodContext(method, config.resolve(method, {}), doc=doc)
    run = RunDir(tmp_path)
    first = {p.name for p in plot_run(run, doc=doc, history=[], context=context)}
    assert {"relatedness_distance.png", "dendrogram_distance.png"} <= first

    def refuse(*args, **kwargs):
        raise AssertionError("drew a figure whose file exists")

    monkeypatch.setattr(plots, "plot_relatedness", refuse)
    monkeypatch.setattr(hib, "plot_dendrogram", refuse)
    assert plot_run(run, doc=doc, history=[], context=context, only_missing=True) == []
    (tmp_path / "plots" / "dendrogram_distance.png").unlink()
    with pytest.raises(AssertionError, match="drew a figure"):
        plot_run(run, doc=doc, history=[], context=context, only_missing=True)
