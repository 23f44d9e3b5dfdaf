"""``pyromtl bench``: the grid, resumable cells, and the leaderboard's numbers."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
from scipy import stats

import pyromtl
from pyromtl import bench, metrics
from pyromtl.cli import main

TINY = {"steps": 5, "hidden": [8], "latent_dim": 4, "eval_every": 5}


def test_the_grid_pairs_methods_with_the_data_they_accept_and_adds_the_baseline():
    cells = bench.plan(None, ["digits-mixed"], seeds=2, grid={"beta": [0.1, 1.0]})
    names = {c.method for c in cells}
    assert "stl" in names and "bayesagg" in names
    assert "vmtl" not in names  # MIMO only: digits-mixed is SIMO
    hib = sorted((c.seed, c.options) for c in cells if c.method == "hib")
    assert hib == [(s, (("beta", b),)) for s in (0, 1) for b in (0.1, 1.0)]
    assert all(c.options == () for c in cells if c.method == "stl")  # no beta there: runs once per seed
    with pytest.raises(ValueError, match="vmtl on digits-mixed"):
        bench.plan(["vmtl"], ["digits-mixed"], seeds=1)
    with pytest.raises(ValueError, match="unknown method"):
        bench.plan(["nope"], ["digits-mixed"], seeds=1)
    with pytest.raises(ValueError, match="seeds"):
        bench.plan(["bmtl"], ["digits-domains"], seeds=0)


def test_grid_values_are_parsed_as_config_values():
    assert bench.parse_grid(["beta=0.01,0.1", "gates=joint,bilevel"]) == {
        "beta": [0.01, 0.1],
        "gates": ["joint", "bilevel"],
    }
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        bench.parse_grid(["beta"])


def test_a_bad_option_fails_before_any_cell_trains(tmp_path):
    with pytest.raises(ValueError, match="unknown config key"):
        bench.bench(["bmtl"], ["digits-domains"], seeds=1, out=tmp_path, options={"nope": 1}, quiet=True)
    assert not any(tmp_path.iterdir())


def test_interval_is_the_student_t_interval():
    values = [0.5, 0.7, 0.65]
    mean, half = bench.interval(values)
    low, high = stats.t.interval(0.95, 2, loc=statistics.fmean(values), scale=stats.sem(values))
    assert mean == pytest.approx((low + high) / 2) and half == pytest.approx((high - low) / 2)
    assert bench.interval([0.3]) == (0.3, 0.0)


@pytest.mark.slow
def test_bench_trains_each_cell_once_as_fit_would_and_ranks_against_stl(tmp_path):
    out = tmp_path / "bench"
    first = bench.bench(["bmtl"], ["digits-domains"], seeds=2, out=out, jobs=2, options=TINY, quiet=True)
    assert len(first.cells) == 4 and len(first.trained) == 4  # bmtl and stl, seeds 0 and 1
    # the same command again: every cell is already done, nothing trains (the CLI's path)
    assert (
        main(
            [
                "bench",
                "--methods",
                "bmtl",
                "--data",
                "digits-domains",
                "--seeds",
                "2",
                "--out",
                str(out),
                "--quiet",
                *[a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")],
            ]
        )
        == 0
    )
    again = bench.bench(["bmtl"], ["digits-domains"], seeds=2, out=out, options=TINY, quiet=True)
    assert again.trained == []
    # a cell is the run `pyromtl fit` makes with the same method, data, seed and options
    cell = json.loads((out / "digits-domains" / "bmtl-s1" / "metrics.json").read_text())
    fit = pyromtl.fit("bmtl", "digits-domains", seed=1, quiet=True, **TINY)
    for task, scores in fit.metrics()["tasks"].items():
        assert cell["tasks"][task] == pytest.approx(scores, rel=1e-6), task
    # the leaderboard's numbers, recomputed from the cells' metrics.json
    docs = {
        (m, s): json.loads((out / "digits-domains" / f"{m}-s{s}" / "metrics.json").read_text())
        for m in ("bmtl", "stl")
        for s in (0, 1)
    }
    rows = {r["method"]: r for r in bench.tables(out)["digits-domains"]}
    task = next(iter(docs["bmtl", 0]["tasks"]))
    assert rows["bmtl"][f"{task}:accuracy"] == pytest.approx(
        bench.interval([docs["bmtl", s]["tasks"][task]["accuracy"] for s in (0, 1)])
    )
    want = [metrics.delta_m(docs["bmtl", s]["tasks"], docs["stl", s]["tasks"]) for s in (0, 1)]
    assert rows["bmtl"]["Δm%"] == pytest.approx(bench.interval(want))
    assert rows["stl"]["η̂"] == (100.0, 0.0) and rows["stl"]["Δm%"] == (0.0, 0.0)
    assert rows["bmtl"]["parameters"] == sum(p.numel() for p in fit.objective.trainable_parameters()) > 0
    with (out / "leaderboard.csv").open() as f:
        written = {(r["method"], r["column"]): float(r["mean"]) for r in csv.DictReader(f)}
    assert written["bmtl", "Δm%"] == pytest.approx(statistics.fmean(want))
    assert "| bmtl |" in (out / "leaderboard.md").read_text()
    assert "<table>" in (out / "leaderboard.html").read_text()
