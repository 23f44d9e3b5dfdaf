"""Run directories, round 2: complete only once every file is written, one writer at a time, and
reports that stay inside their run whatever its files say."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pyromtl
from pyromtl import cli, config, methods
from pyromtl.fit import fit_resolved
from pyromtl.report import report
from pyromtl.rundir import RunDir, plain_name
from tests.conftest import TINY, mixed_simo

QUICK = {**TINY, "steps": 4, "eval_every": 2, "device": "cpu"}


def _resolved(method: str = "bmtl", **options):
    m = methods.get(method)
    data = mixed_simo()
    return m, config.resolve(m, {**QUICK, **options}, data=data), data


class Boom(Exception):
    """Stands for a crash in the middle of a save."""


@pytest.mark.parametrize("failure", [KeyboardInterrupt, Boom])
def test_a_save_cut_short_is_finished_by_the_same_call(tmp_path: Path, monkeypatch, failure) -> None:
    """Ctrl-C (or an error) while the posterior is written leaves an incomplete run; the rerun
    writes every file without training, and its results are those of an uninterrupted run."""
    m, cfg, data = _resolved()
    whole = fit_resolved(m, cfg, data, tmp_path / "whole")
    out = tmp_path / "cut"
    write_posterior = RunDir.write_posterior

    def cut(self, tree):
        raise failure

    monkeypatch.setattr(RunDir, "write_posterior", cut)
    with pytest.raises(failure):
        fit_resolved(m, cfg, data, out)
    run = RunDir(out)
    assert run.metrics_path.is_file() and not run.posterior_path.exists() and not run.is_complete()
    monkeypatch.setattr(RunDir, "write_posterior", write_posterior)
    trained = []
    monkeypatch.setattr("pyromtl.objective.Objective.backward", lambda self, batch: trained.append(1))
    again = fit_resolved(m, cfg, data, out)
    assert not trained, "the rerun trained"
    assert again.train_info.get("finished_save") and not again.train_info.get("complete")
    assert run.posterior_path.is_file() and run.is_complete() and (run.plots_dir / "training.png").is_file()
    assert again.metrics()["tasks"] == whole.metrics()["tasks"]
    assert json.loads(run.metrics_path.read_text())["train"]["steps"] == cfg["steps"]
    third = fit_resolved(m, cfg, data, out)
    assert third.train_info["complete"]


def test_the_marker_comes_last_and_the_lock_goes(tmp_path: Path, monkeypatch) -> None:
    m, cfg, data = _resolved()
    order = []
    for name in ("write_metrics", "write_posterior", "mark_complete"):
        original = getattr(RunDir, name)

        def record(self, *args, _name=name, _original=original):
            order.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(RunDir, name, record)
    fit_resolved(m, cfg, data, tmp_path / "run")
    assert order[-1] == "mark_complete" and order.index("write_posterior") < order.index("mark_complete")
    assert not (tmp_path / "run" / ".lock").exists()
    assert json.loads((tmp_path / "run" / "complete.json").read_text()) == {"step": cfg["steps"]}


HOLD = """
import sys, time
from pyromtl.rundir import RunDir
with RunDir(sys.argv[1]).writing():
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def held(tmp_path: Path):
    """Another process holding the lock of ``tmp_path / "run"``; yields (path, process)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield out, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_writer_is_refused_in_one_line(held, capsys) -> None:
    out, proc = held
    m, cfg, data = _resolved()
    with pytest.raises(ValueError, match=rf"{out} is in use by process {proc.pid}; wait for it"):
        fit_resolved(m, cfg, data, out)
    assert not any(p.name != ".lock" for p in out.iterdir()), "the refused writer wrote something"
    args = ["fit", "bmtl", "--data", "digits-mixed", "--set", "steps=1", "--set", "fraction=0.02", "--out", str(out)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"in use by process {proc.pid}" in err[0]


def test_readers_wait_for_the_writer(held, tmp_path: Path, capsys) -> None:
    out, proc = held
    (out / "metrics.json").write_text(json.dumps({"dataset": "d", "tasks": {"a": {"accuracy": 0.5}}}))
    (out / "config.toml").write_text('method = "bmtl"\n')
    (out / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{out} is being written by process {proc.pid}"):
        pyromtl.load(out)
    for command in (["compare", str(out)], ["report", str(out)], ["evaluate", str(out)]):
        assert cli.main(command) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"process {proc.pid}" in err[0], (command, err)


def test_a_killed_writer_leaves_no_lock_behind(held) -> None:
    """kill -9 releases the lock (the OS closes the file); the stale ``.lock`` does not block."""
    out, proc = held
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / ".lock").exists()
    m, cfg, data = _resolved()
    assert fit_resolved(m, cfg, data, out).train_info["steps"] == cfg["steps"]
    assert not (out / ".lock").exists()


def test_a_refused_run_leaves_no_folder(tmp_path: Path) -> None:
    m, cfg, _ = _resolved()
    with pytest.raises(ValueError):
        fit_resolved(m, cfg, None, tmp_path / "nothing")  # the config names data 'mixed', not a dataset
    assert not (tmp_path / "nothing").exists()


# ---------------------------------------------------------------------------- reports
def _planted_run(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    pyromtl.fit("bmtl", mixed_simo(), out=out, **QUICK)
    return out


def test_plain_names() -> None:
    assert plain_name("../../../../../ESCAPED") == "_.._.._.._.._ESCAPED"
    assert plain_name("relatedness_alpha.png") == "relatedness_alpha.png"
    assert plain_name("/etc/passwd") == "_etc_passwd"
    assert plain_name("..") == "_" and plain_name("") == "_"


def test_a_planted_relatedness_key_writes_nothing_outside_the_run(tmp_path: Path) -> None:
    out = _planted_run(tmp_path)
    doc = json.loads((out / "metrics.json").read_text())
    doc["relatedness"] = {"../../../../../ESCAPED": [[0.0] * 3] * 3}
    doc["tasks"] = {"a|b<script>`x`": doc["tasks"].pop("cls"), **doc["tasks"]}
    (out / "metrics.json").write_text(json.dumps(doc))
    before = {p for p in tmp_path.rglob("*")}
    text = report(out)
    new = {p for p in tmp_path.rglob("*")} - before
    assert all(out in p.parents for p in new), [str(p) for p in new]
    assert not list(tmp_path.rglob("ESCAPED*"))
    assert (out / "plots" / plain_name("relatedness_../../../../../ESCAPED.png")).is_file()
    assert "a\\|b\\<script\\>\\`x\\`" in text and "<script>" not in text


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"tasks": {"cls": [0.5]}}, "task 'cls' must map metric names to numbers"),
        ({"train": "fast"}, "'train' must be a table"),
        ({"relatedness": {"r": [[1.0, 2.0], [3.0]]}}, "relatedness 'r' must be a 3 x 3 matrix"),
        ({"average": {"accuracy": "high"}}, "'average' must map metric names to numbers"),
        ({"method": ["bmtl"]}, "'method' must be a string"),
    ],
)
def test_a_malformed_metrics_json_is_one_line(tmp_path: Path, capsys, change, problem) -> None:
    out = _planted_run(tmp_path)
    doc = {**json.loads((out / "metrics.json").read_text()), **change}
    (out / "metrics.json").write_text(json.dumps(doc))
    capsys.readouterr()
    for command in (["compare", str(out)], ["report", str(out)]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "metrics.json is malformed: " + problem in err[0], err


@pytest.mark.parametrize(
    "line, problem",
    [
        ("hidden = [1e8, 1e8]", "config key 'hidden': each size must be at most 1048576"),
        ("eval_samples = 1e11", "config key 'eval_samples' must be at most 100000"),
    ],
)
def test_a_planted_config_is_refused_before_allocating(tmp_path: Path, capsys, line, problem) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'data = "digits-mixed"\n{line}\n')
    start = time.perf_counter()
    assert cli.main(["fit", "bmtl", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0]
    assert time.perf_counter() - start < 30 and not (tmp_path / "run").exists()


def test_hib_on_one_task_is_refused_before_training(tmp_path: Path) -> None:
    """It used to train, then fail in the save (eq. 11's distance needs two tasks), and read as complete."""
    import numpy as np

    x = np.random.default_rng(0).normal(size=(40, 3))
    data = pyromtl.MultiTaskData.from_arrays(x, {"a": (x[:, 0] > 0).astype(int)}, "binary")
    with pytest.raises(ValueError, match="method 'hib' needs at least 2 tasks; 'custom' has 1"):
        pyromtl.fit("hib", data, out=tmp_path / "run", **QUICK)
    assert not (tmp_path / "run").exists()
