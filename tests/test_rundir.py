"""Run directories: one run each, resumable, never running code from their files, one-line errors."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyromtl
from pyromtl import cli, config
from pyromtl.data import MultiTaskData
from pyromtl.rundir import RunDir
from pyromtl.runspec import RunSpec
from pyromtl.train import TrainingInterrupted, train
from tests.conftest import TINY, blobs_mimo, scaled

ROOT = Path(__file__).resolve().parents[1]
#: A quick CLI fit on a generated dataset.
QUICK = [
    "--data",
    "synthetic-clusters",
    "--device",
    "cpu",
    "--quiet",
    "--set",
    "latent_dim=8",
    "--set",
    "hidden=[16]",
    "--set",
    "eval_every=10",
    "--set",
    "eval_samples=2",
]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyromtl: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "stl"
    assert cli.main(["fit", "stl", *QUICK, "--steps", "20", "--out", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------- untrusted files
class _Payload:
    """Unpickling this would create a marker file: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(finished: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.toml", "metrics.json"):
        (run / name).write_bytes((finished / name).read_bytes())
    saved = torch.load(finished / "checkpoint.pt", weights_only=True)
    marker = tmp_path / "pwned"
    saved["history"].append(_Payload(marker))
    torch.save(saved, run / "checkpoint.pt")
    cfg = RunDir(run).read_config()
    for args in (
        ["evaluate", str(run)],
        ["report", str(run)],
        ["fit", "stl", *QUICK, "--steps", "20", "--out", str(run)],
    ):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "refusing to load it" in one_line(err), args
    with pytest.raises(ValueError, match="refusing to load it"):
        pyromtl.load(run)
    with pytest.raises(ValueError, match="refusing to load it"):
        pyromtl.fit(
            "stl",
            cfg["data"],
            out=run,
            **{k: cfg[k] for k in ("steps", "latent_dim", "hidden", "eval_every", "eval_samples", "quiet")},
        )
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"garbage", None])
def test_unreadable_checkpoints_are_one_line_errors(finished: Path, tmp_path: Path, capsys, content) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.toml", "metrics.json"):
        (run / name).write_bytes((finished / name).read_bytes())
    full = (finished / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(full[: len(full) // 2] if content is None else content)
    for args in (["evaluate", str(run)], ["fit", "stl", *QUICK, "--steps", "20", "--out", str(run)]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "checkpoint.pt cannot be read" in one_line(err)
    with pytest.raises(ValueError, match=r"checkpoint.pt cannot be read"):
        pyromtl.load(run)


# ----------------------------------------------------------------------------- one run per directory
def test_a_finished_run_rerun_changes_nothing(finished: Path, capsys) -> None:
    before = {p.name: p.read_bytes() for p in finished.iterdir() if p.is_file()}
    code, out, _ = run_cli(["fit", "stl", *QUICK, "--steps", "20", "--out", str(finished)], capsys)
    assert code == 0 and "already holds this run, complete at 20 steps; nothing was trained or written" in out
    assert {p.name: p.read_bytes() for p in finished.iterdir() if p.is_file()} == before
    # fraction 0 means the dataset's default: the same run as the resolved value
    code, out, _ = run_cli(["fit", "stl", *QUICK, "--steps", "20", "--fraction", "1", "--out", str(finished)], capsys)
    assert code == 0 and "nothing was trained" in out


def test_a_run_directory_holds_one_run(finished: Path, capsys) -> None:
    code, _, err = run_cli(["fit", "stl", *QUICK, "--steps", "10", "--out", str(finished)], capsys)
    assert code == 2 and "holds 20 steps, more than the 10 asked" in one_line(err)
    code, _, err = run_cli(["fit", "stl", *QUICK, "--steps", "20", "--seed", "3", "--out", str(finished)], capsys)
    assert code == 2 and "different config (seed: 0 -> 3)" in one_line(err)
    cfg = RunDir(finished).read_config()
    with pytest.raises(ValueError, match=r"different config \(lr: 0.003 -> 0.05, seed: 0 -> 3\)"):
        pyromtl.fit(
            "stl",
            cfg["data"],
            out=finished,
            seed=3,
            lr=0.05,
            steps=20,
            latent_dim=8,
            hidden=[16],
            eval_every=10,
            eval_samples=2,
            quiet=True,
        )


def test_save_never_keeps_a_foreign_checkpoint(finished: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for p in finished.iterdir():
        if p.is_file():
            (run / p.name).write_bytes(p.read_bytes())
    other = pyromtl.fit("bmtl", "synthetic-clusters", steps=10, device="cpu", **{**TINY, "eval_samples": 2})
    other.save(run)
    doc = RunDir(run).read_metrics()
    assert doc["method"] == "bmtl"
    reopened = pyromtl.load(run)
    assert reopened.method.name == "bmtl"
    assert reopened.evaluate()["average"] == pytest.approx(doc["average"])


def test_metrics_json_is_strict_json(tmp_path: Path) -> None:
    def no_constants(name: str):
        raise AssertionError(f"{name} is not JSON")

    RunDir(tmp_path).write_metrics(
        {"dataset": "d", "tasks": {}, "train": {"final_loss": float("nan"), "x": [float("inf")]}}
    )
    doc = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=no_constants)
    assert doc["train"] == {"final_loss": None, "x": [None]}


def test_run_files_are_readable_by_others(finished: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    for p in [*finished.iterdir(), *(finished / "plots").iterdir()]:
        if p.is_file():
            assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p


# ----------------------------------------------------------------------------- interrupted runs
def test_ctrl_c_saves_the_step_it_interrupts_and_resume_is_exact(tmp_path: Path, monkeypatch) -> None:
    from pyromtl import methods

    data = blobs_mimo()
    m = methods.get("vbmtl")
    cfg = config.resolve(m, {**TINY, "steps": 30, "checkpoint_every": 100, "device": "cpu"}, data=data)
    full = train(RunSpec.build(m, cfg, data))
    calls = []
    original = type(data).train_batch

    def interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 18:  # Ctrl-C while a step draws its batch, mid-run
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(data), "train_batch", interrupt)
    with pytest.raises(TrainingInterrupted, match=r"interrupted at step \d+; saved a checkpoint there") as info:
        train(RunSpec.build(m, cfg, data, tmp_path))
    monkeypatch.undo()
    step = int(str(info.value).split()[3].rstrip(";"))
    assert 10 < step < 30 and RunDir(tmp_path).read_checkpoint()["step"] == step
    resumed = train(RunSpec.build(m, cfg, data, tmp_path))
    for k, v in full.objective.state_dict().items():
        torch.testing.assert_close(resumed.objective.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_ctrl_c_during_an_update_says_where_a_rerun_resumes(tmp_path: Path) -> None:
    from pyromtl import methods

    m = methods.get("bmtl")
    cfg = config.resolve(m, {**TINY, "steps": 30, "checkpoint_every": 10, "device": "cpu"}, data="blobs")

    def stop(step: int, loss: float) -> None:
        if step == 15:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="the same command resumes from the checkpoint of step 10"):
        train(RunSpec.build(m, cfg, blobs_mimo(), tmp_path), callback=stop)


@pytest.mark.slow
def test_kill_9_then_the_same_command_ends_like_an_uninterrupted_run(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "pyromtl.cli",
        "fit",
        "vbmtl",
        *QUICK,
        "--steps",
        "400",
        "--set",
        "checkpoint_every=20",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the uninterrupted run `a` trains side by side with `b` (killed, then resumed): one core each
    straight = subprocess.Popen(
        [*command, "--out", str(tmp_path / "a")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        proc = subprocess.Popen(
            [*command, "--out", str(tmp_path / "b")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        ckpt = tmp_path / "b" / "checkpoint.pt"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists() and RunDir(tmp_path / "b").read_checkpoint()["step"] >= 100:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "b" / "metrics.json").exists()
        resumed = subprocess.run(
            [*command, "--out", str(tmp_path / "b")], env=env, capture_output=True, text=True, timeout=scaled(600)
        )
        assert resumed.returncode == 0, resumed.stderr
        _, err = straight.communicate(timeout=scaled(600))
        assert straight.returncode == 0, err
    finally:
        if straight.returncode is None:
            straight.kill()
            straight.communicate()
    a, b = (RunDir(tmp_path / d).read_metrics() for d in ("a", "b"))
    for doc in (a, b):
        doc["train"].pop("seconds")
    assert a == b


# ----------------------------------------------------------------------------- bad input, one line each
def test_bad_runs_fail_before_training_in_one_line(tmp_path: Path, capsys) -> None:
    tiny = MultiTaskData.from_arrays(
        [np.random.default_rng(0).normal(size=(n, 3)) for n in (40, 3)],
        [np.arange(40) % 2, np.arange(3) % 2],
        "classification",
        name="tiny",
    )
    with pytest.raises(ValueError, match=r"task\(s\) 'task1' of 'tiny' have no test rows"):
        pyromtl.fit("stl", tiny, steps=2, **TINY)
    single = MultiTaskData.from_arrays(
        [np.random.default_rng(0).normal(size=(40, 3))], [np.arange(40) % 2], "classification", name="one"
    )
    with pytest.raises(ValueError, match="method 'vmtl' needs at least 2 tasks; 'one' has 1"):
        pyromtl.fit("vmtl", single, steps=2, **TINY)
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(["fit", "stl", *QUICK, "--steps", "2", "--out", str(tmp_path / "file")], capsys)
    assert code == 2 and "exists and is not a folder" in one_line(err)
    code, _, err = run_cli(["fit", "stl", *QUICK, "--set", "lr=0", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "'lr' must be > 0" in one_line(err)
    code, _, err = run_cli(["fit", "stl", *QUICK, "--root", str(tmp_path), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "is built in and reads no files" in one_line(err)
    assert not (tmp_path / "r").exists()


def test_huge_inputs_stop_as_a_non_finite_loss(capsys, tmp_path: Path) -> None:
    data = blobs_mimo()
    with pytest.warns(UserWarning, match="inputs reach .*e\\+30"):
        huge = MultiTaskData.from_arrays(
            [x.numpy() * 1e30 for x in data.x], [y.numpy() for y in data.y], "classification", name="huge"
        )
    from pyromtl.train import TrainingError

    with pytest.raises(TrainingError, match=r"loss (is|became) (nan|inf|-inf) (before the first step|at step \d+)"):
        pyromtl.fit("vmtl", huge, steps=2, **TINY, mc_z=1, mc_w=1)


def test_load_with_data_of_another_shape_is_one_line(finished: Path) -> None:
    with pytest.raises(
        ValueError, match="holds a run with a different config \\(data: 'synthetic-clusters' -> 'blobs'\\)"
    ):
        pyromtl.load(finished, data=blobs_mimo())


def test_custom_data_runs_say_how_to_reopen_them(tmp_path: Path, capsys) -> None:
    pyromtl.fit("stl", blobs_mimo(), steps=2, out=tmp_path / "run", **TINY)
    code, _, err = run_cli(["evaluate", str(tmp_path / "run")], capsys)
    assert code == 2 and "pyromtl.load(RUN, data=...)" in one_line(err) and "--import MODULE" in err
    assert pyromtl.load(tmp_path / "run", data=blobs_mimo()).evaluate()["average"]


def test_cuda_without_a_gpu_leaves_no_run_directory(tmp_path: Path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = run_cli(["fit", "stl", *QUICK, "--device", "cuda", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "torch sees no CUDA device" in one_line(err)
    assert not (tmp_path / "r").exists()


def test_compare_explains_its_rows_and_warns_on_unlike_runs(finished: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "bmtl"
    assert cli.main(["fit", "bmtl", *QUICK, "--steps", "10", "--seed", "1", "--out", str(other)]) == 0
    capsys.readouterr()
    code, out, err = run_cli(["compare", str(other), str(finished), "--baseline", str(finished)], capsys)
    assert code == 0
    assert "η̂    percentage of tasks on which the run is no worse" in out and "Δm%  mean relative change" in out
    assert "warning: the runs differ in seed" in err


def test_version_and_plain_dataset_list(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.strip() == f"pyromtl {pyromtl.__version__}"
    assert cli.main(["list", "datasets"]) == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out


# ----------------------------------------------------------------------------- fuzzing
_values = st.one_of(
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.lists(st.integers(-3, 300), max_size=3),
)
_keys = st.sampled_from(
    sorted(
        {
            *config.TRAIN_DEFAULTS,
            "latent_dim",
            "hidden",
            "kl_weights.z",
            "kl_weights.q",
            "priors.w.scale",
            "priors.w.kind",
            "priors.q.kind",
            "nope",
        }
    )
)


def _toml(value) -> str:
    return config.to_toml({"v": value}).split(" = ", 1)[1].strip()


def _no_training(*args, **kwargs):
    raise SystemExit(0)  # the config resolved and training would start now


def runs_or_fails_in_one_line(args: list[str], capsys, monkeypatch) -> None:
    """``pyromtl fit ARGS`` either gets to training (stopped there) or exits 2 with one line."""
    monkeypatch.setattr(importlib.import_module("pyromtl.fit"), "fit_resolved", _no_training)
    try:
        code = cli.main(["fit", "vbmtl", "--quiet", *args])
    except SystemExit:
        return
    assert code == 2
    one_line(capsys.readouterr().err)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=_keys, value=_values)
def test_fuzzed_set_values_run_or_fail_in_one_line(key, value, capsys, monkeypatch) -> None:
    runs_or_fails_in_one_line(["--set", f"{key}={_toml(value)}"], capsys, monkeypatch)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(_keys.filter(lambda k: "." not in k), _values, max_size=4))
def test_fuzzed_toml_configs_run_or_fail_in_one_line(doc, tmp_path_factory, capsys, monkeypatch) -> None:
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_text(config.to_toml(doc))
    runs_or_fails_in_one_line(["--config", str(path)], capsys, monkeypatch)


def test_a_relative_root_is_stored_absolute_and_the_kept_step_is_shown(tmp_path: Path, capsys, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    for domain in ("a", "b"):
        np.savez(tmp_path / "data" / f"{domain}.npz", features=rng.normal(size=(60, 4)), labels=np.arange(60) % 3)
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(
        [
            "fit",
            "stl",
            "--data",
            "npz",
            "--root",
            "data",
            "--device",
            "cpu",
            "--quiet",
            "--steps",
            "20",
            "--set",
            "eval_every=10",
            "--set",
            "latent_dim=4",
            "--set",
            "hidden=[8]",
            "--out",
            "run",
        ],
        capsys,
    )
    assert code == 0
    doc = RunDir(tmp_path / "run").read_metrics()
    assert f"kept step {doc['train']['best_step']} (best validation score" in out
    assert doc["train"]["selected"]["step"] == doc["train"]["best_step"]
    assert f"at kl_weight {doc['train']['selected']['kl_weight']:.3g}" in out
    root = RunDir(tmp_path / "run").read_config()["root"]
    assert Path(root).is_absolute() and Path(root) == (tmp_path / "data").resolve()
    monkeypatch.chdir(ROOT)  # reopening from elsewhere finds the data
    code, out, _ = run_cli(["evaluate", str(tmp_path / "run")], capsys)
    assert code == 0 and "stl on npz" in out
    history = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["history"]
    assert [h["step"] for h in history] == list(range(1, 21))  # the loss is logged between validations too
