"""``pyromtl bench``: the grid, resumable cells on each executor, and the leaderboard's numbers,
relatedness recovery and rank summary."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from scipy import stats

import pyromtl
from pyromtl import bench, leaderboard, metrics
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


def test_a_dotted_grid_key_reaches_into_a_table_of_the_methods_that_have_it():
    """``--set-grid priors.w.kind=...`` (HIB's no-noise row): parsed as one value per entry, given
    to the methods with a ``w`` site only, and merged into the cell's options without changing the
    options every cell shares."""
    grid = bench.parse_grid(["priors.w.kind=deterministic,learned_normal"])
    assert grid == {"priors.w.kind": ["deterministic", "learned_normal"]}
    cells = bench.plan(["hib", "mtvib"], ["digits-grouped"], seeds=1, grid=grid)
    assert sorted(c.options for c in cells if c.method == "hib") == [
        (("priors.w.kind", "deterministic"),),
        (("priors.w.kind", "learned_normal"),),
    ]
    assert [c.options for c in cells if c.method == "mtvib"] == [()]  # its sites are z only
    shared = {"steps": 5, "priors": {"w": {"scale": 2.0}}}
    cell = next(c for c in cells if c.method == "hib")
    assert cell.config(shared) == {"steps": 5, "priors": {"w": {"scale": 2.0, "kind": "deterministic"}}}
    assert shared == {"steps": 5, "priors": {"w": {"scale": 2.0}}}
    assert cell.directory(Path("B")).name == "hib-priors.w.kind=deterministic-s0"
    with pytest.raises(ValueError, match="not a table"):
        cell.config({"priors": {"w": "normal"}})


def test_a_bad_option_fails_before_any_cell_trains(tmp_path):
    with pytest.raises(ValueError, match="unknown config key"):
        bench.bench(["bmtl"], ["digits-domains"], seeds=1, out=tmp_path, options={"nope": 1}, quiet=True)
    assert not any(tmp_path.iterdir())


def test_the_default_grid_caps_the_long_datasets_only():
    """The default grid trains each dataset's default length up to ``DEFAULT_GRID_STEPS``; a grid
    that names methods or datasets, or sets a length, is left as it is."""
    lengths = bench.default_grid_lengths(None, None, {})
    assert lengths["digits-mixed"] == {"steps": bench.DEFAULT_GRID_STEPS}  # 1,700 steps at its defaults
    assert "digits-domains" not in lengths  # 100 steps at its default fraction
    assert bench.default_grid_lengths(["ls"], None, {}) == {}
    assert bench.default_grid_lengths(None, ["digits-mixed"], {}) == {}
    assert bench.default_grid_lengths(None, None, {"epochs": 5}) == {}
    assert bench.default_grid_lengths(None, None, {}, {"steps": [10, 20]}) == {}


def test_the_default_grid_trains_capped_cells(tmp_path, monkeypatch, capsys):
    """Run as the default grid (no methods, no datasets), a capped dataset's cells train the cap,
    and the command says so."""
    monkeypatch.setattr(bench, "DEFAULT_GRID_STEPS", 3)
    monkeypatch.setattr(bench, "plan", lambda *args: [bench.Cell("ls", "digits-mixed", 0, ())])
    sets = [a for k, v in TINY.items() if k != "steps" for a in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["bench", "--seeds", "1", "--out", str(tmp_path), "--quiet", *sets]) == 0
    assert "capped at 3 steps" in capsys.readouterr().out
    doc = json.loads((tmp_path / "digits-mixed" / "ls-s0" / "metrics.json").read_text())
    assert doc["train"]["steps"] == 3


def test_interval_is_the_student_t_interval():
    values = [0.5, 0.7, 0.65]
    mean, half = leaderboard.interval(values)
    low, high = stats.t.interval(0.95, 2, loc=statistics.fmean(values), scale=stats.sem(values))
    assert mean == pytest.approx((low + high) / 2) and half == pytest.approx((high - low) / 2)
    assert leaderboard.interval([0.3]) == (0.3, 0.0)


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
                "--datasets",
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
    rows = {r["method"]: r for r in leaderboard.tables(out)["digits-domains"]}
    task = next(iter(docs["bmtl", 0]["tasks"]))
    assert rows["bmtl"][f"{task}:accuracy"] == pytest.approx(
        leaderboard.interval([docs["bmtl", s]["tasks"][task]["accuracy"] for s in (0, 1)])
    )
    task_mean = [statistics.fmean(t["accuracy"] for t in docs["bmtl", s]["tasks"].values()) for s in (0, 1)]
    assert rows["bmtl"]["mean accuracy"] == pytest.approx(leaderboard.interval(task_mean))
    want = [metrics.delta_m(docs["bmtl", s]["tasks"], docs["stl", s]["tasks"]) for s in (0, 1)]
    assert rows["bmtl"]["Δm%"] == pytest.approx(leaderboard.interval(want))
    assert rows["stl"]["η̂"] == (100.0, 0.0) and rows["stl"]["Δm%"] == (0.0, 0.0)
    assert rows["bmtl"]["parameters"] == sum(p.numel() for p in fit.objective.trainable_parameters()) > 0
    with (out / "leaderboard.csv").open() as f:
        written = {(r["method"], r["column"]): float(r["mean"]) for r in csv.DictReader(f)}
    assert written["bmtl", "Δm%"] == pytest.approx(statistics.fmean(want))
    assert "| bmtl |" in (out / "leaderboard.md").read_text()
    assert "<table>" in (out / "leaderboard.html").read_text()
    assert (out / "leaderboard_digits-domains.png").read_bytes()[:4] == b"\x89PNG"


def test_recovery_is_the_rank_correlation_with_the_truth():
    truth = [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    related = [[0, 0.6, 0.2, 0.2], [0.6, 0, 0.2, 0.2], [0.2, 0.2, 0, 0.6], [0.2, 0.2, 0.6, 0]]
    assert leaderboard.recovery("alpha", related, truth) == pytest.approx(1.0)
    # a distance reads the other way round; the same matrix as a distance is perfectly wrong
    assert leaderboard.recovery("distance", related, truth) == pytest.approx(-1.0)
    # off-diagonal pairs only: the diagonal is neither a pair nor evidence
    off = [(t, s) for t in range(4) for s in range(4) if t != s]
    noisy = [[0.0, 0.5, 0.3, 0.1], [0.4, 0.0, 0.2, 0.3], [0.1, 0.3, 0.0, 0.6], [0.2, 0.1, 0.5, 0.0]]
    want = stats.spearmanr([noisy[t][s] for t, s in off], [truth[t][s] for t, s in off]).statistic
    assert leaderboard.recovery("alpha", noisy, truth) == pytest.approx(want)
    # a gate per task (diag) against each task's mean true relatedness to the others
    lonely = [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1]]
    gates = [[0.9, 0, 0, 0], [0, 0.8, 0, 0], [0, 0, 0.7, 0], [0, 0, 0, 0.1]]
    assert leaderboard.recovery("gates", gates, lonely) == pytest.approx(
        stats.spearmanr([0.9, 0.8, 0.7, 0.1], [2 / 3, 2 / 3, 2 / 3, 0]).statistic
    )
    assert leaderboard.recovery("gates", gates, truth) is None  # equal clusters: no task shares more
    with pytest.raises(ValueError, match="shape"):
        leaderboard.recovery("alpha", [[0, 1], [1, 0]], truth)


def test_rank_summary_ranks_by_delta_m_with_friedman_and_nemenyi():
    def row(name, dm):
        return {"method": name, "Δm%": (dm, 0.0)}

    boards = {
        "a": [row("stl", 0.0), row("x", -5.0), row("y", 3.0), row("z", -1.0)],
        "b": [row("stl", 0.0), row("x", -2.0), row("y", 1.0), row("z", 2.0), row("only-b", -9.0)],
        "c": [row("stl", 0.0), row("x", -1.0), row("y", 4.0), row("z", -3.0)],
    }
    summary = leaderboard.rank_summary(boards)
    assert summary is not None and summary.datasets == ["a", "b", "c"]
    assert "only-b" not in summary.ranks  # ranked only where every dataset has it
    assert summary.ranks == pytest.approx({"x": 4 / 3, "z": 7 / 3, "stl": 8 / 3, "y": 11 / 3})
    assert list(summary.ranks) == ["x", "z", "stl", "y"]  # best first
    table = [[0.0, -5.0, 3.0, -1.0], [0.0, -2.0, 1.0, 2.0], [0.0, -1.0, 4.0, -3.0]]
    assert summary.friedman_p == pytest.approx(stats.friedmanchisquare(*zip(*table)).pvalue)
    # Demšar (2006), Table 5(a): q_0.05 = 2.569 for k = 4
    assert summary.critical_difference == pytest.approx(2.569 * (4 * 5 / (6 * 3)) ** 0.5, rel=1e-3)
    two = leaderboard.rank_summary({k: v[:2] for k, v in boards.items()})
    assert two is not None and two.friedman_p is None  # fewer than 3 methods: no test
    assert leaderboard.rank_summary({"a": [{"method": "x", "Δm%": None}]}) is None


def test_bad_executor_and_jobs_fail_before_any_cell_trains(tmp_path):
    with pytest.raises(ValueError, match="executor"):
        bench.bench(["bmtl"], ["digits-domains"], seeds=1, out=tmp_path, executor="slurm", quiet=True)
    with pytest.raises(ValueError, match="jobs sets the local"):
        bench.bench(["bmtl"], ["digits-domains"], seeds=1, out=tmp_path, executor="ray", jobs=2, quiet=True)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_ray_cells_are_fit_runs_and_the_leaderboard_scores_relatedness(tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = bench.bench(
            ["vmtl"], ["synthetic-clusters"], seeds=1, out=tmp_path, executor="ray", options=TINY, quiet=True
        )
    finally:
        ray.shutdown()
    assert sorted(c.method for c in result.trained) == ["stl", "vmtl"]
    doc = json.loads((tmp_path / "synthetic-clusters" / "vmtl-s0" / "metrics.json").read_text())
    fit = pyromtl.fit("vmtl", "synthetic-clusters", seed=0, quiet=True, **TINY)
    for task, scores in fit.metrics()["tasks"].items():
        assert doc["tasks"][task] == pytest.approx(scores, rel=1e-6), task
    rows = {r["method"]: r for r in leaderboard.tables(tmp_path)["synthetic-clusters"]}
    want = leaderboard.recovery("alpha", doc["relatedness"]["alpha"], doc["true_relatedness"])
    assert rows["vmtl"]["relatedness ρ"] == pytest.approx((want, 0.0))
    assert rows["stl"]["relatedness ρ"] is None  # stl reads no relatedness


def _cell(out, name, method, seed, accuracy, relatedness=None, extra=None):
    """A finished cell as the leaderboard reads it: ``metrics.json`` and ``complete.json``."""
    path = out / "toy" / name
    path.mkdir(parents=True)
    doc = {
        "method": method,
        "dataset": "toy",
        "seed": seed,
        "tasks": {t: {"accuracy": accuracy} for t in "abc"},
        "train": {"steps": 10, "seconds": 1.0, "parameters": 7},
        "relatedness": relatedness or {},
        "true_relatedness": [[1, 1, 0], [1, 1, 0], [0, 0, 1]],
        **({"extra": extra} if extra else {}),
    }
    (path / "metrics.json").write_text(json.dumps(doc))
    (path / "complete.json").write_text(json.dumps({"step": 10}))


def test_a_grid_variant_is_compared_with_stl_run_on_the_same_grid_options(tmp_path):
    alpha = [[0, 0.8, 0.2], [0.7, 0, 0.3], [0.4, 0.6, 0]]
    for seed in (0, 1):
        _cell(tmp_path, f"stl-s{seed}", "stl", seed, 0.5)
        _cell(tmp_path, f"stl-lr=0.1-s{seed}", "stl", seed, 0.8)
        _cell(tmp_path, f"vmtl-lr=0.1-s{seed}", "vmtl", seed, 0.8, {"alpha": alpha})
    rows = {r["method"]: r for r in leaderboard.tables(tmp_path)["toy"]}
    assert rows["vmtl-lr=0.1"]["Δm%"] == (0.0, 0.0)  # against stl-lr=0.1 (0.8), not stl (0.5)
    assert rows["stl-lr=0.1"]["Δm%"] == (0.0, 0.0)
    rho = leaderboard.recovery("alpha", alpha, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    assert rows["vmtl-lr=0.1"]["relatedness ρ"] == pytest.approx((rho, 0.0)) and rho > 0.5
    assert rows["stl"]["relatedness ρ"] is None and rows["stl"]["parameters"] == 7


def test_a_clustering_method_gets_its_success_rate_and_margin(tmp_path):
    """HIB's ``extra.clustering`` (§V-B): the share of seeds whose clustering recovers the groups,
    and the mean margin, each with its interval; a method without it gets neither column."""
    margins = [2.0, -1.0, 4.0]
    for seed, margin in enumerate(margins):
        _cell(tmp_path, f"stl-s{seed}", "stl", seed, 0.5)
        _cell(
            tmp_path, f"hib-s{seed}", "hib", seed, 0.6, extra={"clustering": {"success": margin > 0, "margin": margin}}
        )
    rows = {r["method"]: r for r in leaderboard.tables(tmp_path)["toy"]}
    assert rows["hib"]["clustering success"] == pytest.approx(leaderboard.interval([1.0, 0.0, 1.0]))
    assert rows["hib"]["clustering margin"] == pytest.approx(leaderboard.interval(margins))
    assert "clustering success" not in rows["stl"]


def test_a_variant_with_options_stl_lacks_is_compared_with_stl_on_the_options_it_has(tmp_path):
    """A row whose grid gave it an option ``stl`` does not have (``gate_lr``) is compared with the
    ``stl`` row on the options they share (``latent_dim=4``), not the plain one."""
    for seed in (0, 1):
        _cell(tmp_path, f"stl-latent_dim=64-s{seed}", "stl", seed, 0.5)
        _cell(tmp_path, f"stl-latent_dim=4-s{seed}", "stl", seed, 0.8)
        _cell(tmp_path, f"smtl-c-gate_lr=0.003-latent_dim=4-s{seed}", "smtl-c", seed, 0.8)
        _cell(tmp_path, f"smtl-c-gate_lr=0.003-latent_dim=64-s{seed}", "smtl-c", seed, 0.8)
    rows = {r["method"]: r for r in leaderboard.tables(tmp_path)["toy"]}
    assert rows["smtl-c-gate_lr=0.003-latent_dim=4"]["Δm%"] == (0.0, 0.0)  # against stl-latent_dim=4 (0.8)
    assert rows["smtl-c-gate_lr=0.003-latent_dim=64"]["Δm%"][0] < 0  # against stl-latent_dim=64 (0.5)
