"""The ``pyromtl`` command: listing, option precedence, one-line errors, and one end-to-end run."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyromtl import cli, config, datasets, methods, priors
from pyromtl.train import TrainingError
from tests.conftest import scaled, side_by_side


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, list[str]]:
    """``main(argv)``'s exit code, stdout and stderr lines."""
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.splitlines()


def assert_one_line_error(code: int, err: list[str], *fragments: str, expected_code: int = 2) -> None:
    assert code == expected_code
    assert len(err) == 1, err
    assert err[0].startswith("pyromtl: error: ")
    for fragment in fragments:
        assert fragment in err[0]


def fake_run(run_dir: Path, method: str, tasks: dict[str, float], dataset: str = "digits-domains") -> Path:
    """A run directory with only a ``metrics.json`` (all that ``compare`` reads)."""
    run_dir.mkdir(parents=True)
    doc = {
        "method": method,
        "dataset": dataset,
        "fraction": None,
        "seed": 0,
        "device": "cpu",
        "split": "test",
        "tasks": {t: {"accuracy": a, "auc": 0.9} for t, a in tasks.items()},
        "average": {"accuracy": sum(tasks.values()) / len(tasks)},
        "train": {"steps": 1, "seconds": 0.1, "final_loss": 1.0},
        "relatedness": {},
    }
    (run_dir / "metrics.json").write_text(json.dumps(doc))
    return run_dir


# ---------------------------------------------------------------------------- list
def test_list_shows_every_method_dataset_and_prior(capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_main(["list"], capsys)
    assert code == 0 and not err
    names = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert set(methods.available()) <= names
    assert set(datasets.available()) <= names
    assert set(priors.available()) <= names
    assert methods.get("vbmtl").summary in out


def test_list_one_section(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_main(["list", "datasets"], capsys)
    assert code == 0
    assert out.startswith("datasets:") and "methods:" not in out
    assert all(name in out for name in datasets.available())


# ---------------------------------------------------------------------------- fit options
def test_fit_option_precedence(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'method = "vbmtl"\nlr = 0.1\nsteps = 5\nseed = 3\ndata = "digits-binary"\n'
        '[priors.w]\nkind = "normal"\nscale = 2.0\n'
    )
    args = cli.build_parser().parse_args(
        [
            "fit",
            "vbmtl",
            "--config",
            str(path),
            "--set",
            "lr=0.2",
            "--set",
            "steps=7",
            "--set",
            "priors.w.scale=3.0",
            "--steps",
            "9",
            "--data",
            "digits-domains",
        ]
    )
    opts = cli.fit_options(args)
    assert opts["lr"] == 0.2  # --set beats the file
    assert opts["steps"] == 9 and opts["data"] == "digits-domains"  # flags beat --set and the file
    assert opts["seed"] == 3  # the file beats the default
    assert config.resolve(methods.get("vbmtl"), opts)["priors"]["w"]["scale"] == 3.0


def test_saved_config_reproduces_the_options(tmp_path: Path) -> None:
    vbmtl = methods.get("vbmtl")
    saved = config.resolve(vbmtl, {"steps": 40, "hidden": [16], "priors": {"w": {"kind": "learned_normal"}}})
    path = tmp_path / "config.toml"
    path.write_text(config.to_toml(saved))
    args = cli.build_parser().parse_args(["fit", "vbmtl", "--config", str(path)])
    assert config.resolve(vbmtl, cli.fit_options(args)) == saved


def test_fit_epochs_flag_overrides_configured_steps() -> None:
    args = cli.build_parser().parse_args(["fit", "vbmtl", "--set", "steps=7", "--epochs", "3"])
    opts = cli.fit_options(args)
    assert opts["steps"] == 0 and opts["epochs"] == 3


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["fit", "nosuch"], ["unknown method 'nosuch'"]),
        (["fit", "vbmtl", "--set", "lr"], ["--set expects KEY=VALUE"]),
        (["fit", "vbmtl", "--set", "lr=[1"], ["cannot read value"]),
        (["fit", "vbmtl", "--set", "lerning_rate=0.1"], ["unknown config key 'lerning_rate'"]),
        (["fit", "vbmtl", "--set", "steps=many"], ["'steps' must be an integer"]),
        (["fit", "vbmtl", "--set", "priors.w.kind=cauchy"], ["unknown prior kind 'cauchy'"]),
        (["fit", "vbmtl", "--fraction", "2"], ["'fraction'"]),
        (["fit", "vbmtl", "--device", "tpu"], ["'device'"]),
        (["fit", "vbmtl", "--config", "missing.toml"], ["config file not found", "missing.toml"]),
    ],
)
def test_user_mistakes_exit_2_with_one_line(
    argv: list[str],
    fragments: list[str],
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(argv, capsys)
    assert_one_line_error(code, err, *fragments)
    assert not out and not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_bad_config_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 3\n[priors\n")  # the TOML error message would span lines
    code, _, err = run_main(["fit", "vbmtl", "--config", str(bad)], capsys)
    assert_one_line_error(code, err, "bad.toml", "invalid TOML")
    other = tmp_path / "other.toml"
    other.write_text('method = "stl"\n')
    code, _, err = run_main(["fit", "vbmtl", "--config", str(other)], capsys)
    assert_one_line_error(code, err, "'stl'", "'vbmtl'")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[priors.v]\nkind = "normal"\n')
    code, _, err = run_main(["fit", "vbmtl", "--config", str(unknown)], capsys)
    assert_one_line_error(code, err, "unknown prior site")


def test_unknown_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_main(["fit", "vbmtl", "--data", "nosuch", "--out", str(tmp_path / "run")], capsys)
    assert_one_line_error(code, err, "nosuch")


def test_not_a_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for command in ("evaluate", "compare", "report"):
        code, _, err = run_main([command, str(tmp_path)], capsys)
        assert_one_line_error(code, err, str(tmp_path))


def test_refuses_to_resume_a_different_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    saved = config.resolve(methods.get("vbmtl"), {"lr": 0.5})
    torch.save({"step": 3, "config": saved}, tmp_path / "checkpoint.pt")
    code, _, err = run_main(["fit", "vbmtl", "--out", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "different config", "lr: 0.5 -> 0.003")


def test_training_error_exits_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def diverge(*args, **kwargs):
        raise TrainingError("loss became nan at step 3;\ntraining stopped")

    monkeypatch.setattr(importlib.import_module("pyromtl.fit"), "fit_resolved", diverge)
    code, _, err = run_main(["fit", "vbmtl", "--out", str(tmp_path / "run")], capsys)
    assert_one_line_error(code, err, "loss became nan at step 3; training stopped", expected_code=1)


def test_unexpected_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(importlib.import_module("pyromtl.fit"), "fit_resolved", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["fit", "vbmtl", "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("argv", [[], ["bogus"], ["fit"], ["fit", "vbmtl", "--seed", "x"], ["list", "models"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_main(argv, capsys)
    assert code == 2 and err and "usage: pyromtl" in err[0]


# ---------------------------------------------------------------------------- compare
def test_compare_table_and_baseline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = fake_run(tmp_path / "vmtl-run", "vmtl", {"t0": 0.8, "t1": 0.6})
    b = fake_run(tmp_path / "stl-run", "stl", {"t0": 0.7, "t1": 0.7})
    code, out, err = run_main(["compare", str(a), str(b), "--baseline", str(b)], capsys)
    assert code == 0 and not err
    assert "vmtl-run" in out and "stl-run" in out and "t0" in out and "average" in out
    for row in ("Δm%", "Δ_I%", "η̂"):
        assert row in out
    eta_row = next(line for line in out.splitlines() if "η̂" in line)
    assert "50.0" in eta_row  # better on t0, worse on t1


def test_compare_baseline_outside_the_list_and_clashing_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = fake_run(tmp_path / "x" / "run", "vmtl", {"t0": 0.8})
    b = fake_run(tmp_path / "y" / "run", "bmtl", {"t0": 0.75})
    base = fake_run(tmp_path / "stl", "stl", {"t0": 0.7})
    code, out, _ = run_main(["compare", str(a), str(b), "--baseline", str(base)], capsys)
    assert code == 0
    header = out.splitlines()[1]
    assert str(a) in header and str(b) in header and "stl" in header
    assert "Δm%" in out


def test_compare_rejects_different_datasets(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = fake_run(tmp_path / "a", "vmtl", {"t0": 0.8})
    b = fake_run(tmp_path / "b", "stl", {"t0": 0.7}, dataset="digits-binary")
    code, _, err = run_main(["compare", str(a), str(b)], capsys)
    assert_one_line_error(code, err, "different datasets", "digits-binary")


def test_compare_rejects_broken_metrics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "metrics.json").write_text("{not json")
    code, _, err = run_main(["compare", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "invalid JSON")


# ---------------------------------------------------------------------------- end to end
SCRIPT = Path(sys.executable).parent / "pyromtl"  # the console script installed with this interpreter
#: Two commands run side by side (the two fits; evaluate and compare): one intra-op thread each.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def pyromtl_cmd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the installed console script and wait for it."""
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=scaled(300), env=ENV)


def pyromtl_side_by_side(*commands: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run the installed console script once per argument list, all at once, and wait for them."""
    return side_by_side([[str(SCRIPT), *args] for args in commands], scaled(300), cwd=cwd, env=ENV)


@pytest.mark.slow
def test_end_to_end(tmp_path: Path) -> None:
    assert SCRIPT.exists(), "the pyromtl console script is not installed (pip install -e .)"
    common = [
        "--data",
        "digits-domains",
        "--steps",
        "40",
        "--set",
        "latent_dim=8",
        "--set",
        "hidden=[16]",
        "--set",
        "eval_every=20",
        "--device",
        "cpu",
        "--quiet",
    ]
    run, base = tmp_path / "vbmtl-run", tmp_path / "stl-run"
    fits = [["fit", m, *common, "--out", str(d)] for m, d in (("vbmtl", run), ("stl", base))]
    for res in pyromtl_side_by_side(*fits, cwd=tmp_path):
        assert res.returncode == 0, res.stderr
        assert "average" in res.stdout and "run dir:" in res.stdout and "wall time" in res.stdout

    # The run directory contract.
    raw = config.load_toml(run / "config.toml")
    assert config.resolve(methods.get("vbmtl"), raw) == raw
    assert raw["method"] == "vbmtl" and raw["steps"] == 40 and raw["latent_dim"] == 8 and raw["hidden"] == [16]
    doc = json.loads((run / "metrics.json").read_text())
    assert {"method", "dataset", "fraction", "seed", "device", "tasks", "average", "train", "relatedness"} <= set(doc)
    assert doc["method"] == "vbmtl" and doc["dataset"] == "digits-domains" and doc["seed"] == 0
    assert len(doc["tasks"]) == 4 and 0.0 <= doc["average"]["accuracy"] <= 1.0
    assert doc["train"]["steps"] == 40
    for name in ("posterior.nc", "checkpoint.pt"):
        assert (run / name).stat().st_size > 0
    assert list((run / "plots").glob("*.png"))

    # evaluate prints a table and writes nothing; compare, another reader, runs beside it (and
    # writes nothing either, or the check fails)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    res, compared = pyromtl_side_by_side(
        ["evaluate", str(run)], ["compare", str(run), str(base), "--baseline", str(base)], cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert all(task in res.stdout for task in doc["tasks"]) and "average" in res.stdout
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before

    res = compared
    assert res.returncode == 0, res.stderr
    for row in ("Δm%", "Δ_I%", "η̂"):
        assert row in res.stdout

    res = pyromtl_cmd("report", str(run), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = Path(res.stdout.strip().splitlines()[-1])
    assert report.name == "report.md" and report.stat().st_size > 0
