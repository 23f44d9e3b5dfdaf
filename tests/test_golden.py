"""Behaviour kept across refactors: seeded 20-step runs of every registered method.

``tests/data/steps20.json`` holds the test metrics, kept step and final loss of one seeded
20-step run per case of :data:`CASES`: every registered method at its defaults (on
``digits-domains``, or ``digits-mixed`` for methods that need SIMO data), and the variants
whose code paths the defaults do not reach in 20 steps (BayesAgg's aggregation after its
pretraining, on mixed and on all-regression tasks; SMTL's bi-level gates; the baselines'
shared SIMO representation). The same runs must give the same numbers. The metrics are the
test split's at ``eval_samples`` model passes, as they were recorded (a fit's own evaluation
takes more passes where those give fewer than ``pyromtl.fit.MIN_DRAWS`` draws).

The first six cases were measured before methods became plug-ins; the variational methods'
numbers were re-recorded when their defaults changed on purpose. Re-record a case only when its
maths changes on purpose: ``python tests/test_golden.py CASE...``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import pyromtl
from pyromtl import methods

PATH = Path(__file__).parent / "data" / "steps20.json"
GOLDEN: dict[str, dict[str, Any]] = json.loads(PATH.read_text())


def _default_case(name: str) -> dict[str, Any]:
    data = "digits-domains" if "mimo" in methods.get(name).settings else "digits-mixed"
    return {"method": name, "data": data, "options": {}}


#: Case name -> the run: method, dataset and options beyond ``steps = 20, eval_every = 10``.
CASES: dict[str, dict[str, Any]] = {
    **{name: _default_case(name) for name in methods.available()},
    "bayesagg-aggregate": {"method": "bayesagg", "data": "digits-mixed", "options": {"pretrain_steps": 5}},
    "bayesagg-regression": {"method": "bayesagg", "data": "digits-regression", "options": {"pretrain_steps": 5}},
    "lsmtl-bilevel": {"method": "lsmtl", "data": "digits-mixed", "options": {"gates": "bilevel"}},
    "vbmtl-simo": {"method": "vbmtl", "data": "digits-mixed", "options": {}},
}


def run_case(case: dict[str, Any]):
    torch.set_num_threads(1)
    return pyromtl.fit(
        case["method"], case["data"], seed=0, device="cpu", steps=20, eval_every=10, quiet=True, **case["options"]
    )


def test_every_registered_method_has_a_recorded_case() -> None:
    assert set(methods.available()) <= set(GOLDEN)
    assert set(CASES) == set(GOLDEN)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_seeded_short_run_matches_the_recorded_metrics(name: str) -> None:
    fit = run_case(CASES[name])
    want = GOLDEN[name]
    assert fit.train_info["best_step"] == want["best_step"]
    assert fit.train_info["final_loss"] == pytest.approx(want["final_loss"], rel=1e-5)
    got = fit.evaluate(num_samples=fit.config["eval_samples"])["tasks"]
    assert got.keys() == want["tasks"].keys()
    for task, values in want["tasks"].items():
        assert got[task] == pytest.approx(values, rel=1e-5, abs=1e-6), task


def record(names: list[str]) -> None:
    """Run the named cases and write their results into the golden file (the rest stay as they are)."""
    golden = dict(GOLDEN)
    for name in names:
        fit = run_case(CASES[name])
        golden[name] = {
            "best_step": fit.train_info["best_step"],
            "final_loss": fit.train_info["final_loss"],
            "tasks": fit.evaluate(num_samples=fit.config["eval_samples"])["tasks"],
        }
        print(f"recorded {name}")
    PATH.write_text(json.dumps(dict(sorted(golden.items())), indent=1) + "\n")


if __name__ == "__main__":
    record(sys.argv[1:])
