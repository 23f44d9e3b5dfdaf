"""The last bad inputs that gave tracebacks or misleading errors: each is now one line naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pyromtl
from pyromtl import cli
from pyromtl.data.core import MultiTaskData
from pyromtl.rundir import RunDir
from tests.conftest import TINY


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("vmtl", {"mc_z": 0}, "config key 'mc_z' must be >= 1, got 0"),
        ("stl", {"latent_dim": 0}, "config key 'latent_dim' must be >= 1, got 0"),
        ("bayesagg", {"nodes": 0}, "config key 'nodes' must be >= 1, got 0"),
        ("lsmtl", {"temperature": 0}, "config key 'temperature' must be > 0, got 0"),
        ("lsmtl", {"temperature": {"start": 1.0, "end": 0.0, "fraction": 0.5}}, "'temperature' must stay > 0"),
        ("smtl", {"gate_init": 1.0}, "config key 'gate_init' must be in (0, 1)"),
    ],
)
def test_options_name_themselves(method: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        pyromtl.config.resolve(pyromtl.methods.get(method), options)
    assert message in str(caught.value)


def test_nash_mtl_needs_two_tasks() -> None:
    x = np.random.default_rng(0).normal(size=(40, 3))
    data = MultiTaskData.from_arrays(x, {"a": (x[:, 0] > 0).astype(int)}, "binary")
    with pytest.raises(ValueError, match="method 'nash-mtl' needs at least 2 tasks; 'custom' has 1"):
        pyromtl.fit("nash-mtl", data, steps=1, device="cpu", **TINY)


def test_class_names_and_class_counts_are_checked() -> None:
    x = np.zeros((30, 2))
    y = np.arange(30) % 3
    with pytest.raises(ValueError, match=r"class_names: expected one name per class of the widest .* \(3\), got 2"):
        MultiTaskData.from_arrays([x, x], [y, y], "classification", class_names=["a", "b"])
    with pytest.raises(ValueError, match="1000000 classes is more than 100000"):
        MultiTaskData.from_arrays([x, x], [y, y], "classification", num_classes=10**6)
    data = MultiTaskData.from_arrays([x, x], [y, y], "classification", class_names=["a", "b", "c"])
    assert data.class_names == ["a", "b", "c"]


def test_an_import_that_raises_is_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('no GPU here')\n")
    assert cli.main(["list", "--import", str(bad)]) == 2
    assert f"--import {bad}: running it raised RuntimeError: no GPU here" in _one_line(capsys)


def test_an_empty_out_is_refused(capsys) -> None:
    assert cli.main(["fit", "stl", "--data", "digits-mixed", "--out", ""]) == 2
    assert "--out must name a run directory, got an empty string" in _one_line(capsys)


def test_an_empty_checkpoint_gives_its_reason(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoint\.pt cannot be read: the file is empty"):
        RunDir(tmp_path).read_checkpoint()


def test_a_network_that_cannot_be_allocated_is_one_line() -> None:
    """Two layers of 2**20 (the widest a config may ask for) need 4 TiB: refused before training."""
    with pytest.raises(ValueError, match=r"the networks of bmtl do not fit in memory .*; ask for smaller sizes"):
        pyromtl.fit("bmtl", "digits-mixed", steps=1, device="cpu", quiet=True, hidden=[2**20, 2**20])


def test_a_task_without_rows_in_a_split_gets_scale_zero_not_nan() -> None:
    """A split where one task has no rows (a small task's ``val``, say): that task's batch row is
    masked with scale 0 (Pyro scales before it masks, so 0/0 would make the loss NaN); the other
    tasks keep ``N_t / B_t``."""
    data = MultiTaskData.from_arrays(
        [np.random.default_rng(0).normal(size=(7, 3)) for _ in range(2)],
        [np.arange(7) % 2, np.arange(7) % 2],
        "binary",
        splits={"train": [[0, 1, 2, 3], [0, 1, 2, 3]], "val": [[4, 5], []], "test": [[6], [4, 5, 6]]},
    )
    batch = data.train_batch(4, None, "cpu", split="val")
    assert batch.scale[:, 0].tolist() == [1.0, 0.0]
    assert batch.mask[1].sum() == 0 and batch.mask[0].sum() == 2


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_a_batch_size_below_one_or_not_an_integer_is_refused(bad) -> None:
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        MultiTaskData.from_arrays([np.zeros((4, 2))] * 2, [np.arange(4) % 2] * 2, "binary").train_batch(
            bad, None, "cpu"
        )


def test_a_task_index_is_not_a_bool() -> None:
    data = MultiTaskData.from_arrays([np.zeros((4, 2))] * 2, [np.arange(4) % 2] * 2, "binary")
    assert data.task_index(1) == 1
    with pytest.raises(ValueError, match="unknown task True"):
        data.task_index(True)
