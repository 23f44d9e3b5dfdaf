"""Every numeric option of every registered method, fuzzed: a value is either accepted or refused
with a ``ValueError`` naming its key, and an accepted edge value (0 or 1) either trains a step
or stops with one line, never a traceback from deep inside a model."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyromtl import config, methods
from pyromtl.data.core import MultiTaskData
from pyromtl.options import ScheduleValue, TrainOptions
from pyromtl.train import TrainingError
from tests.conftest import TINY, blobs_mimo, mixed_simo

NUMERIC = (int, float, ScheduleValue)


def numeric_keys(name: str) -> list[str]:
    """The method's options (the trainer's included) whose type is a number or a schedule."""
    hints = {**TrainOptions.hints(), **methods.get(name).options.hints()}
    return sorted(k for k, hint in hints.items() if hint in NUMERIC)


PAIRS = [(name, key) for name in sorted(methods.available()) for key in numeric_keys(name)]

NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.5, 1e-12, 1e12, 2**63, 10**11]),
    st.booleans(),
    st.dictionaries(st.sampled_from(["start", "end", "fraction"]), st.floats(-2, 2), max_size=3),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PAIRS), NUMBERS)
def test_every_numeric_option_is_accepted_or_refused_by_name(pair: tuple[str, str], value) -> None:
    name, key = pair
    try:
        cfg = config.resolve(methods.get(name), {key: value})
    except ValueError as err:
        assert f"'{key}'" in str(err) or key in ("steps", "epochs"), str(err)
        return
    assert cfg[key] == value or isinstance(value, float | int)


def _data_for(name: str) -> MultiTaskData:
    return mixed_simo() if "simo" in methods.get(name).settings else blobs_mimo()


def _own_edges() -> list[tuple[str, str, float]]:
    """One (method, key, edge value) per options class and key it declares, the trainer's keys once."""
    seen: set[tuple[type, str]] = set()
    cases = []
    for name in sorted(methods.available()):
        options = methods.get(name).options
        for key in numeric_keys(name):
            owner = TrainOptions if key in TrainOptions.hints() else options
            if (owner, key) in seen or key in ("steps", "epochs", "seed", "root"):
                continue
            seen.add((owner, key))
            cases += [(name, key, 0), (name, key, 1)]
    return cases


@pytest.mark.parametrize("name, key, value", _own_edges())
def test_an_accepted_edge_value_trains_or_stops_in_one_line(name: str, key: str, value: float) -> None:
    method = methods.get(name)
    options = {**TINY, "steps": 2, "eval_every": 2, "eval_samples": 2, "device": "cpu"}
    if name == "bayesagg":
        options["pretrain_steps"] = 1  # so the aggregation itself runs
    options[key] = value
    data = _data_for(name)
    try:
        cfg = config.resolve(method, options, data=data)
    except ValueError as err:
        assert f"'{key}'" in str(err), str(err)
        return
    from pyromtl.fit import fit_resolved

    try:
        fit = fit_resolved(method, cfg, data)
    except (ValueError, TrainingError) as err:  # one line that names the key (not, say, a NaN blamed on lr)
        text = str(err)
        assert "\n" not in text.strip() and len(text) < 600 and f"'{key}'" in text, text
        return
    assert math.isfinite(fit.train_info["final_loss"]) or fit.train_info["final_loss"] != fit.train_info["final_loss"]
