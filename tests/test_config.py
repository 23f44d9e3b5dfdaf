"""Configuration: defaults, validation, TOML round trips, ``--set`` parsing, and fuzzing.

The fuzz tests push random TOML text and random ``KEY=VALUE`` strings through the same path the
CLI takes (``load_toml`` / ``apply_set`` / ``parse_value``, then ``resolve``) and require that
every failure is a ``ValueError``: anything else would reach a user as a traceback.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyromtl import methods
from pyromtl.config import TRAIN_DEFAULTS, apply_set, load_toml, parse_value, resolve, to_toml

VBMTL = methods.get("vbmtl")


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- resolve
def test_resolve_fills_defaults() -> None:
    cfg = resolve(VBMTL)
    assert cfg["method"] == "vbmtl"
    assert cfg["fraction"] == 0.05  # fraction = 0 is the dataset's default fraction, resolved here
    for key, value in TRAIN_DEFAULTS.items():
        if key != "fraction":
            assert cfg[key] == VBMTL.defaults.get(key, value)  # method defaults override the trainer's
    for key, value in VBMTL.defaults.items():
        assert cfg[key] == value
    assert resolve(VBMTL, {"data": "digits-mixed"})["fraction"] == 1.0  # no default fraction: everything
    assert set(cfg["priors"]) == set(VBMTL.priors)
    assert cfg["priors"]["w"] == {"kind": "normal", "loc": 0.0, "scale": 1.0}


def test_resolve_does_not_share_mutable_defaults() -> None:
    cfg = resolve(VBMTL)
    cfg["hidden"].append(7)
    assert resolve(VBMTL)["hidden"] == VBMTL.defaults["hidden"]


def test_resolve_keeps_valid_options_and_coerces_integral_floats() -> None:
    cfg = resolve(VBMTL, {"lr": 1, "steps": 1e3, "hidden": [32, 16], "quiet": True, "device": "cuda:1"})
    assert cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)
    assert cfg["steps"] == 1000 and isinstance(cfg["steps"], int)
    assert cfg["hidden"] == [32, 16] and cfg["quiet"] is True and cfg["device"] == "cuda:1"


def test_unknown_key_is_named() -> None:
    with pytest.raises(ValueError, match="'lerning_rate'") as info:
        resolve(VBMTL, {"lerning_rate": 0.1})
    assert "known keys" in str(info.value) and "lr" in str(info.value)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"steps": "10"}, "'steps' must be an integer"),
        ({"steps": True}, "'steps' must be an integer"),
        ({"steps": 2.5}, "'steps' must be an integer"),
        ({"seed": -1}, "'seed' must be in"),
        ({"seed": 2**64}, "'seed' must be in"),
        ({"lr": -0.1}, "'lr' must be >= 0"),
        ({"lr": "fast"}, "'lr' must be a finite number"),
        ({"lr": True}, "'lr' must be a finite number"),
        ({"lr": math.nan}, "'lr' must be a finite number"),
        ({"lr": 10**400}, "'lr' must be a finite number"),
        ({"quiet": 1}, "'quiet' must be true or false"),
        ({"hidden": [0]}, "'hidden' must be a list of positive integers"),
        ({"hidden": 64}, "'hidden' must be a list of positive integers"),
        ({"activation": 3}, "'activation' must be a string"),
        ({"device": "gpu"}, "'device' must be auto, cpu, cuda"),
        ({"device": "cuda:x"}, "'device' must be auto, cpu, cuda"),
        ({"fraction": 1.5}, "'fraction' must be in"),
        ({"batch_size": 0}, "'batch_size' must be at least 1"),
        ({"steps": 0, "epochs": 0}, "'steps' or 'epochs'"),
        ({"kl_weight": -1.0}, "'kl_weight' must stay >= 0"),
        ({"kl_weight": {"start": 1.0}}, "'kl_weight'.*missing"),
        ({"priors": 5}, "'priors' must be a table"),
        ({"priors": {"v": "normal"}}, "unknown prior site"),
        ({"priors": {"w": "cauchy"}}, "site 'w'.*unknown prior kind 'cauchy'"),
        ({"priors": {"w": {"kind": "normal", "scale": -1.0}}}, "site 'w'.*'scale'"),
        ({"priors": {"w": {"kind": "normal", "loc": 10**400}}}, "site 'w'"),
    ],
)
def test_bad_values_raise_value_error(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve(VBMTL, options)


def test_kl_weight_schedule_table_is_kept() -> None:
    schedule = {"start": 0.0, "end": 1.0, "steps": 100}
    assert resolve(VBMTL, {"kl_weight": schedule})["kl_weight"] == schedule


def test_kindless_prior_table_tunes_the_default_prior() -> None:
    cfg = resolve(VBMTL, {"priors": {"w": {"scale": 2.0}}})
    assert cfg["priors"]["w"] == {"kind": "normal", "loc": 0.0, "scale": 2.0}
    assert cfg["priors"]["z"] == {"kind": "normal", "loc": 0.0, "scale": 1.0}


# ---------------------------------------------------------------------------- TOML
def test_toml_round_trip(tmp_path: Path) -> None:
    cfg = resolve(
        VBMTL,
        {
            "lr": 1e-3,
            "hidden": [16, 8],
            "steps": 40,
            "root": 'C:\\data\\"x"\n\t\x7fé',  # backslashes, quotes and control characters must be escaped
            "kl_weight": {"start": 0.0, "end": 1.0, "steps": 200},
            "priors": {"w": {"kind": "learned_normal", "learn_loc": False}},
        },
    )
    loaded = load_toml(write(tmp_path, to_toml(cfg)))
    assert loaded == cfg
    assert resolve(VBMTL, loaded) == cfg


def test_priors_table_from_toml(tmp_path: Path) -> None:
    text = """
method = "vbmtl"
data = "digits-domains"
fraction = 0.05
[priors.w]
kind = "learned_normal"
scale = 0.5
[priors.z]
kind = "normal"
"""
    cfg = resolve(VBMTL, load_toml(write(tmp_path, text)))
    assert cfg["fraction"] == 0.05
    assert cfg["priors"]["w"] == {
        "kind": "learned_normal",
        "loc": 0.0,
        "scale": 0.5,
        "learn_loc": True,
        "per_task": False,
    }
    assert cfg["priors"]["z"]["kind"] == "normal"


def test_load_toml_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config file not found"):
        load_toml(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_toml(write(tmp_path, "lr = = 3"))
    with pytest.raises(ValueError, match="nested too deeply"):
        load_toml(write(tmp_path, "v = " + "[" * 2000 + "]" * 2000))
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'data = "\xff"')
    with pytest.raises(ValueError, match=r"latin1.toml"):
        load_toml(bad)


# ---------------------------------------------------------------------------- --set
@pytest.mark.parametrize(
    "text, value",
    [
        ("3", 3),
        ("1e-3", 1e-3),
        ("true", True),
        ("[64, 32]", [64, 32]),
        ("{start = 5.0, end = 0.5, rate = 1e-3}", {"start": 5.0, "end": 0.5, "rate": 1e-3}),
        ('"quoted"', "quoted"),
        ("uniform", "uniform"),  # a bare word is a string
        ("digits-domains", "digits-domains"),
        ("cuda:0", "cuda:0"),
        ("inf", math.inf),
    ],
)
def test_parse_value(text: str, value: object) -> None:
    assert parse_value(text) == value


@pytest.mark.parametrize("text", ["", "[1, 2", "{a = }", "'open", "a=b", "1\nlr = 2", "x # y", "bad\x00"])
def test_parse_value_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="cannot read value"):
        parse_value(text)


def test_apply_set_dotted_keys_and_types() -> None:
    cfg: dict = {"priors": {"w": {"kind": "normal"}}}
    for assignment in (
        "lr=0.01",
        "steps = 40",
        "hidden=[16]",
        "quiet=true",
        "data=digits-binary",
        "priors.w.scale=2",
        "priors.z.kind=learned_normal",
        "kl_weight.start=0.5",
    ):
        apply_set(cfg, assignment)
    assert cfg == {
        "priors": {"w": {"kind": "normal", "scale": 2}, "z": {"kind": "learned_normal"}},
        "lr": 0.01,
        "steps": 40,
        "hidden": [16],
        "quiet": True,
        "data": "digits-binary",
        "kl_weight": {"start": 0.5},
    }


def test_apply_set_through_resolve_reaches_the_default_prior() -> None:
    cfg: dict = {}
    apply_set(cfg, "priors.w.scale=0.1")
    assert resolve(VBMTL, cfg)["priors"]["w"] == {"kind": "normal", "loc": 0.0, "scale": 0.1}


@pytest.mark.parametrize(
    "assignment, match",
    [
        ("lr", "expects KEY=VALUE"),
        ("=3", "invalid key"),
        ("a..b=1", "invalid key"),
        ("a b=1", "invalid key"),
        ("lr.x=1", "'lr' is not a table"),
        ("lr=[", "cannot read value"),
    ],
)
def test_apply_set_rejects(assignment: str, match: str) -> None:
    cfg = {"lr": 0.1}
    with pytest.raises(ValueError, match=match):
        apply_set(cfg, assignment)


# ---------------------------------------------------------------------------- fuzzing
KEYS = sorted({*TRAIN_DEFAULTS, *VBMTL.defaults, "priors", "method"})
SCALARS = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(["nan", "inf", "-inf", "+nan", "1e400", "-0.0", "0x1F", "1_000", "1" * 5000, "9" * 30]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.booleans().map(lambda b: "true" if b else "false"),
    st.text(max_size=12).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.sampled_from(["1979-05-27", "07:32:00", "1979-05-27T07:32:00Z", "'lit'", '"""multi"""', "normal", "uniform"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.dictionaries(
            st.sampled_from(["kind", "start", "end", "rate", "steps", "loc", "scale", "weights", "x"]),
            inner,
            max_size=4,
        ).map(lambda d: "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}"),
    ),
    max_leaves=8,
)
PRIOR_TABLES = st.builds(
    lambda site, body: f"[priors.{site}]\n" + "\n".join(f"{k} = {v}" for k, v in body.items()),
    st.sampled_from(["w", "z", "v", "w.x"]),
    st.dictionaries(
        st.sampled_from(["kind", "loc", "scale", "learn_loc", "per_task", "weights", "temperature"]),
        st.one_of(VALUES, st.sampled_from(['"normal"', '"learned_normal"', '"task_mixture"', '"deterministic"'])),
        max_size=4,
    ),
)
TOML_DOCS = st.one_of(
    st.text(max_size=60),  # mostly not TOML at all
    st.builds(
        lambda lines, tables: "\n".join(lines + tables),
        st.lists(st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(KEYS + ["x", "lr.x"]), VALUES), max_size=5),
        st.lists(PRIOR_TABLES, max_size=2),
    ),
)
ASSIGNMENTS = st.one_of(
    st.text(max_size=30),
    st.builds(
        lambda k, v: f"{k}={v}",
        st.one_of(
            st.sampled_from(
                KEYS
                + [
                    "priors.w.scale",
                    "priors.w.kind",
                    "priors.z",
                    "kl_weight.start",
                    "priors.w.temperature.start",
                    "",
                    ".",
                    "a..b",
                    " lr ",
                ]
            ),
            st.text(max_size=10),
        ),
        st.one_of(VALUES, st.text(max_size=15)),
    ),
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def resolve_or_value_error(cfg: dict) -> None:
    """``resolve`` succeeds, writing a config that reads back the same, or raises ``ValueError``."""
    try:
        resolved = resolve(VBMTL, cfg)
    except ValueError:
        return
    with tempfile.TemporaryDirectory() as tmp:
        assert resolve(VBMTL, load_toml(write(Path(tmp), to_toml(resolved)))) == resolved


@FUZZ
@given(TOML_DOCS)
def test_fuzz_toml_files(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg = load_toml(write(Path(tmp), text))
        except ValueError:
            return
    resolve_or_value_error(cfg)


@FUZZ
@given(st.lists(ASSIGNMENTS, max_size=4))
def test_fuzz_set_assignments(assignments: list[str]) -> None:
    cfg: dict = {}
    for assignment in assignments:
        try:
            apply_set(cfg, assignment)
        except ValueError:
            return
    resolve_or_value_error(cfg)


@FUZZ
@given(st.one_of(VALUES, st.text(max_size=20)), st.sampled_from(KEYS))
def test_fuzz_parse_value(text: str, key: str) -> None:
    try:
        value = parse_value(text)
    except ValueError:
        return
    resolve_or_value_error({key: value})
