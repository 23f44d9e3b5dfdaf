"""``pyromtl compare --metrics``: Δ_I and η̂ with several metrics per task (Safe MTL §4).

``Δ_{t,j} = (−1)^{p_{t,j}} (M_{t,j} − STL_{t,j})``, ``Δ_I = (1/m) Σ_t (1/m_t) Σ_j Δ_{t,j}/STL_{t,j}``
and ``η̂ = (1/m) Σ_t (1/m_t) Σ_j 1[Δ_{t,j} ≥ 0] × 100``: checked against a hand computation
from two small metric tables, with the default (one primary metric per task) unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyromtl import metrics as M
from pyromtl.cli import main

#: Two small metric tables: a 10-class, a binary and a regression task.
STL = {
    "digit": {"accuracy": 0.80, "nll": 0.50},
    "even": {"accuracy": 0.90, "nll": 0.30},
    "angle": {"nmse": 0.40, "mse": 2.0},
}
MTL = {
    "digit": {"accuracy": 0.84, "nll": 0.60},  # accuracy +5%, nll 20% worse
    "even": {"accuracy": 0.90, "nll": 0.24},  # accuracy tied (safe), nll 20% better
    "angle": {"nmse": 0.50, "mse": 1.0},  # nmse 25% worse; mse is not asked for
}


def _run(path: Path, tasks: dict[str, dict[str, float]]) -> Path:
    path.mkdir()
    doc = {"method": path.name, "dataset": "digits-mixed", "fraction": 1.0, "seed": 0, "tasks": tasks}
    (path / "metrics.json").write_text(json.dumps(doc))
    return path


def _compare(
    tmp_path: Path, capsys: pytest.CaptureFixture, *extra: str
) -> tuple[int, dict[tuple[str, str], list[str]], str]:
    """Exit code, the table's rows keyed by (first cell, second cell), and stderr."""
    stl, mtl = _run(tmp_path / "stl", STL), _run(tmp_path / "mtl", MTL)
    code = main(["compare", str(mtl), str(stl), "--baseline", str(stl), *extra])
    out, err = capsys.readouterr()
    rows = {}
    for line in out.splitlines():
        if line.startswith("|") and not line.startswith("|-"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[(cells[0], cells[1])] = cells[2:]
    return code, rows, err


def test_several_metrics_per_task_match_a_hand_computation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, rows, err = _compare(tmp_path, capsys, "--metrics", "accuracy,nll,nmse")
    assert code == 0 and not err
    # per task, (−1)^p (M − STL) / STL for each metric that applies to it
    digit = [(0.84 - 0.80) / 0.80, -(0.60 - 0.50) / 0.50]  # +0.05, −0.20 (nll: lower is better)
    even = [(0.90 - 0.90) / 0.90, -(0.24 - 0.30) / 0.30]  # 0, +0.20
    angle = [-(0.50 - 0.40) / 0.40]  # −0.25; m_t = 1
    per_task = [digit, even, angle]
    delta_i = 100 * sum(sum(d) / len(d) for d in per_task) / 3
    eta = 100 * sum(sum(x >= 0 for x in d) / len(d) for d in per_task) / 3
    delta_m = -100 * sum(x for d in per_task for x in d) / 5
    assert (round(delta_i, 6), round(eta, 6), round(delta_m, 6)) == (-7.5, 50.0, 4.0)
    assert rows[("Δ_I% ↑", "vs stl")] == ["-7.50", "—"]
    assert rows[("η̂ ↑", "vs stl")] == ["50.0", "—"]  # digit half safe, even safe, angle unsafe
    assert rows[("Δm% ↓", "vs stl")] == ["+4.00", "—"]
    # one row per task and metric that applies to it; mse is not listed, so not shown
    assert rows[("digit", "nll ↓")] == ["0.6000", "0.5000"]
    assert rows[("angle", "nmse ↓")] == ["0.5000", "0.4000"]
    assert ("angle", "mse ↓") not in rows and ("angle", "accuracy ↑") not in rows
    assert rows[("average", "nll ↓")] == ["0.4200", "0.4000"]


def test_the_default_scores_each_tasks_primary_metric_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, rows, _ = _compare(tmp_path, capsys)
    assert code == 0
    assert rows[("Δ_I% ↑", "vs stl")] == [f"{100 * (0.05 + 0.0 - 0.25) / 3:+.2f}", "—"] == ["-6.67", "—"]
    assert rows[("η̂ ↑", "vs stl")] == ["66.7", "—"]
    assert [k for k in rows if k[0] == "digit"] == [("digit", "accuracy ↑")]


def test_one_listed_metric_per_task_is_the_default(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, default, _ = _compare(tmp_path / "a", capsys)
    _, listed, _ = _compare(tmp_path / "b", capsys, "--metrics", "accuracy,nmse")
    assert listed == default


@pytest.mark.parametrize(
    "listed, fragments",
    [
        ("accuracy,f1", ["unknown metric", "'f1'"]),
        ("accuracy,nll", ["task 'angle': none of the metrics accuracy, nll applies", "nmse"]),
        ("accuracy,nmse,miou", ["'miou' apply to no task"]),
        ("accuracy,accuracy,nmse", ["'accuracy' listed more than once"]),
        ("accuracy,,nmse", ["expected metric names separated by commas"]),
        ("accuracy,nmse,mae", ["task 'angle' has no 'mae' metric", "nmse, mse"]),
    ],
)
def test_bad_metric_lists_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, listed: str, fragments: list[str]
) -> None:
    code, rows, err = _compare(tmp_path, capsys, "--metrics", listed)
    assert code == 2 and not rows  # nothing printed before the error
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyromtl: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_a_metric_missing_from_a_compared_run_names_the_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    stl = _run(tmp_path / "stl", STL)
    lacking = _run(tmp_path / "lacking", {**MTL, "even": {"accuracy": 0.9}})
    code = main(["compare", str(lacking), "--baseline", str(stl), "--metrics", "accuracy,nll,nmse"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1
    assert "run 'lacking'" in err[0] and "task 'even': method has no 'nll' metric" in err[0]


# ----------------------------------------------------------------------------- the library
def test_metrics_per_task_picks_each_tasks_kind() -> None:
    assert M.metrics_per_task(STL, ["nll", "accuracy", "nmse"]) == {
        "digit": ["nll", "accuracy"],
        "even": ["nll", "accuracy"],
        "angle": ["nmse"],
    }
    dense = {"seg": {"miou": 0.5, "pixel_acc": 0.9}, "depth": {"abs_err": 0.5, "rel_err": 0.2}}
    assert M.metrics_per_task(dense, ["miou", "pixel_acc", "abs_err"]) == {
        "seg": ["miou", "pixel_acc"],
        "depth": ["abs_err"],
    }


def test_compare_table_with_metrics_gives_n_a_to_runs_with_other_tasks() -> None:
    table = M.compare_table(
        {"stl": STL, "mtl": MTL, "two": {"digit": MTL["digit"]}}, "stl", ["accuracy", "nll", "nmse"]
    )
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in table.splitlines()}
    assert [c.strip() for c in rows[("Δ_I% ↑", "vs stl")].strip("|").split("|")[2:]] == ["—", "-7.50", "n/a"]


def test_delta_i_and_eta_hat_average_within_a_task_first() -> None:
    """The library functions the table calls, on the tables cut to the listed metrics."""
    cut = {t: {k: v for k, v in m.items() if k != "mse"} for t, m in STL.items()}
    mtl = {t: {k: v for k, v in m.items() if k != "mse"} for t, m in MTL.items()}
    listed = ["accuracy", "nll", "nmse"]
    assert M.delta_i(mtl, cut, listed) == pytest.approx(-7.5)
    assert M.eta_hat(mtl, cut, listed) == pytest.approx(50.0)
    assert M.delta_m(mtl, cut, listed) == pytest.approx(4.0)
