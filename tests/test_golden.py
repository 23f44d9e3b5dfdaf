"""Behaviour kept across refactors: seeded 20-step runs of every built-in method.

``tests/data/steps20.json`` holds the test metrics, kept step and final loss of
``pyromtl.fit(method, "digits-domains", seed=0, steps=20, eval_every=10)`` for every method. They
were first measured before methods became plug-ins, and the variational methods' numbers were
re-recorded when their defaults changed on purpose (KL tempering, schedules relative to the run,
VMTL's detached z prior); stl and bmtl kept theirs. The same runs must give the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pyromtl

GOLDEN = json.loads((Path(__file__).parent / "data" / "steps20.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(GOLDEN))
def test_seeded_short_run_matches_the_recorded_metrics(method: str) -> None:
    torch.set_num_threads(1)
    fit = pyromtl.fit(method, "digits-domains", seed=0, device="cpu", steps=20, eval_every=10, quiet=True)
    want = GOLDEN[method]
    assert fit.train_info["best_step"] == want["best_step"]
    assert fit.train_info["final_loss"] == pytest.approx(want["final_loss"], rel=1e-5)
    got = fit.evaluate()["tasks"]
    assert got.keys() == want["tasks"].keys()
    for task, values in want["tasks"].items():
        assert got[task] == pytest.approx(values, rel=1e-5, abs=1e-6), task
