import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyromtl.schedules import Schedule, as_schedule


def test_constant():
    s = as_schedule(2)
    assert s.kind == "constant"
    assert s(0) == 2.0 and s(10**6) == 2.0
    assert isinstance(s(3), float)


def test_exponential_decay_to_floor():
    s = as_schedule({"start": 5.0, "end": 0.5, "rate": 1e-3})
    assert s(0) == 5.0
    assert s(1000) == pytest.approx(5.0 * math.exp(-1.0))
    # 5 * exp(-rate * step) = 0.5 at step = ln(10) / 1e-3 ≈ 2303: floored from there on.
    assert s(2302) > 0.5
    assert s(2400) == 0.5 and s(10**7) == 0.5


def test_linear_warmup_then_constant():
    s = as_schedule({"start": 0.0, "end": 1.0, "steps": 100})
    assert s(0) == 0.0
    assert s(25) == pytest.approx(0.25)
    assert s(100) == 1.0 and s(5000) == 1.0
    down = as_schedule({"start": 2.0, "end": 1.0, "steps": 4})
    assert down(2) == pytest.approx(1.5)


def test_schedule_passes_through_and_round_trips():
    s = Schedule.linear(0.0, 1.0, 10)
    assert as_schedule(s) is s
    for value in (
        0.3,
        {"start": 5.0, "end": 0.5, "rate": 1e-3},
        {"start": 0.0, "end": 1.0, "steps": 10},
        {"start": 0.0, "end": 1.0, "fraction": 0.2},
        {"start": 5.0, "end": 0.5, "decay_fraction": 0.3},
    ):
        assert as_schedule(as_schedule(value).to_config()) == as_schedule(value)


@pytest.mark.parametrize(
    "value, fragment",
    [
        ({"start": 1.0, "end": 0.1, "rate": 0.1, "decay": 2}, "'decay'"),
        ({"start": 1.0, "end": 0.1}, "missing"),
        ({"start": 1.0, "rate": 0.1}, "'end'"),
        ({"start": 1.0, "end": 0.1, "rate": 0.1, "steps": 3}, "exclude each other"),
        ({"start": 0.0, "end": 1.0, "fraction": 0.5, "steps": 3}, "exclude each other"),
        ({"start": 0.0, "end": 1.0, "fraction": 0.0}, "'fraction'"),
        ({"start": 0.0, "end": 1.0, "fraction": 1.5}, "'fraction'"),
        ({"start": 5.0, "end": 0.0, "decay_fraction": 0.5}, "0 < end <= start"),
        ({"start": "hot", "end": 0.1, "rate": 0.1}, "'start'"),
        ({"start": 1.0, "end": 0.1, "rate": -1.0}, "'rate'"),
        ({"start": 1.0, "end": 2.0, "rate": 0.1}, "'end'"),
        ({"start": 0.0, "end": 1.0, "steps": 0}, "'steps'"),
        ({"start": 0.0, "end": 1.0, "steps": 2.5}, "'steps'"),
        ({"start": 0.0, "end": float("nan"), "steps": 2}, "'end'"),
        (True, "finite number"),
        ("1.0", "finite number"),
        (float("inf"), "finite number"),
    ],
)
def test_bad_schedules_name_the_problem(value, fragment):
    with pytest.raises(ValueError, match=fragment):
        as_schedule(value)


def test_negative_step_is_rejected():
    with pytest.raises(ValueError, match="step"):
        as_schedule(1.0)(-1)


@given(
    start=st.floats(0.01, 100.0),
    frac=st.floats(0.0, 1.0),
    rate=st.floats(0.0, 1.0),
    steps=st.lists(st.integers(0, 10**6), min_size=2, max_size=2),
)
def test_exponential_is_monotone_and_bounded(start, frac, rate, steps):
    s = as_schedule({"start": start, "end": start * frac, "rate": rate})
    a, b = sorted(steps)
    assert start * frac <= s(b) <= s(a) <= start


@given(start=st.floats(-10, 10), end=st.floats(-10, 10), n=st.integers(1, 1000), step=st.integers(0, 5000))
def test_linear_stays_between_its_ends(start, end, n, step):
    s = as_schedule({"start": start, "end": end, "steps": n})
    lo, hi = min(start, end), max(start, end)
    assert lo - 1e-9 <= s(step) <= hi + 1e-9


@pytest.mark.parametrize("total", [100, 1000, 37])
def test_relative_schedules_end_at_the_same_point_of_any_run(total):
    warm = as_schedule({"start": 0.0, "end": 1.0, "fraction": 0.25})
    decay = as_schedule({"start": 5.0, "end": 0.5, "decay_fraction": 0.25})
    quarter = round(0.25 * total)
    assert warm(0, total) == 0.0 and warm(quarter, total) == 1.0 and warm(total, total) == 1.0
    assert warm(quarter // 2, total) == pytest.approx((quarter // 2) / quarter)
    assert decay(0, total) == 5.0 and decay(quarter, total) == pytest.approx(0.5) and decay(total, total) == 0.5
    assert decay(quarter - 1, total) > 0.5 + 1e-9  # exponential all the way to the floor, not clipped early
    assert warm.settled(total) == quarter and decay.settled(total) in (quarter, quarter + 1)
    assert decay.settled(total) <= quarter + 1 and decay(decay.settled(total), total) == 0.5


def test_relative_schedule_needs_the_run_length():
    with pytest.raises(ValueError, match="relative to the run's length"):
        as_schedule({"start": 0.0, "end": 1.0, "fraction": 0.5})(3)


def test_settled_step_of_absolute_schedules():
    assert as_schedule(0.3).settled() == 0
    assert as_schedule({"start": 0.0, "end": 1.0, "steps": 200}).settled() == 200
    s = as_schedule({"start": 5.0, "end": 0.5, "rate": 5e-3})
    k = s.settled()
    assert s(k) == 0.5 and s(k - 1) > 0.5
    assert as_schedule({"start": 5.0, "end": 0.0, "rate": 5e-3}).settled() == math.inf
