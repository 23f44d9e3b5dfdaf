"""Shared fixtures: small, fast multi-task datasets built in memory."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch

from pyromtl.data import MultiTaskData

pyro.enable_validation(True)
# The test networks are tiny: intra-op threads add only overhead, and on a busy machine their
# spinning made tests several times slower.
torch.set_num_threads(1)


def scaled(seconds: float) -> float:
    """A subprocess time limit for this machine: ``seconds`` on an idle one, stretched by the load
    per core (a busy CI machine runs the same test several times slower) and by the environment
    variable ``PYROMTL_TEST_TIMEOUT_SCALE``."""
    import os

    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    return seconds * max(1.0, load) * float(os.environ.get("PYROMTL_TEST_TIMEOUT_SCALE", "1"))


#: Small networks and short runs: the unit tests check behaviour, not accuracy.
TINY = {"latent_dim": 8, "hidden": [16], "eval_every": 10, "eval_samples": 4, "quiet": True}


def side_by_side(argvs, timeout: float, **popen) -> list:
    """Run every command of ``argvs`` at once and wait for all (killed on a timeout or error)."""
    import subprocess

    procs = [
        subprocess.Popen(argv, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen) for argv in argvs
    ]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                proc.communicate()
    return done


def blobs_mimo(num_tasks: int = 3, n: int = 60, dim: int = 6, classes: int = 3, seed: int = 0) -> MultiTaskData:
    """MIMO classification: class means shared by every task, per-task shift of the inputs."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)) * 2.5
    xs, ys = [], []
    for t in range(num_tasks):
        y = np.arange(n) % classes
        xs.append(means[y] + rng.normal(size=(n, dim)) + 0.3 * t)
        ys.append(y)
    return MultiTaskData.from_arrays(xs, ys, "classification", name="blobs")


def mixed_simo(n: int = 90, dim: int = 5, seed: int = 0) -> MultiTaskData:
    """SIMO with one task of each type."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    y = {
        "cls": (x[:, 0] > 0).astype(int) + (x[:, 1] > 0).astype(int),
        "bin": (x[:, 2] > 0).astype(int),
        "reg": 3.0 * x[:, 3] + 10.0 + 0.1 * rng.normal(size=n),
    }
    return MultiTaskData.from_arrays(x, y, ["classification", "binary", "regression"], name="mixed")


class Interrupt(Exception):
    """Raised by a training callback to stop a run part-way, as a crash would."""


def interrupted_then_resumed(method, data: MultiTaskData, cfg: dict, directory, at: int):
    """Train ``method`` in ``directory`` until step ``at``, interrupt it, resume it; the resumed result."""
    from pyromtl.runspec import RunSpec
    from pyromtl.train import train

    def stop(step: int, loss: float) -> None:
        if step == at:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(RunSpec.build(method, cfg, data, directory), callback=stop)
    return train(RunSpec.build(method, cfg, data, directory))


def built(method, cfg: dict, data: MultiTaskData, state=None):
    """``(model, guide)`` as the method builds them for ``data`` under the resolved ``cfg``."""
    from pyromtl.runspec import RunSpec

    return method.build(RunSpec.build(method, cfg, data).context(state))


def regression_mimo(num_tasks: int = 2, n: int = 50, dim: int = 4, seed: int = 0) -> MultiTaskData:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=dim)
    xs = [rng.normal(size=(n, dim)) for _ in range(num_tasks)]
    ys = [x @ w + 0.1 * rng.normal(size=n) for x in xs]
    return MultiTaskData.from_arrays(xs, ys, "regression", name="reg")


@pytest.fixture
def blobs() -> MultiTaskData:
    return blobs_mimo()


@pytest.fixture
def mixed() -> MultiTaskData:
    return mixed_simo()
