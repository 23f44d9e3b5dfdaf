"""``pyromtl show METHOD``: a method's full defaults, as ``config.resolve(method)`` gives them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pyromtl import cli, config, methods
from pyromtl.options import TrainOptions


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, list[str]]:
    """``main(argv)``'s exit code, stdout and stderr lines."""
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.splitlines()


def section(out: str, title: str) -> list[str]:
    """The indented lines under the block whose header starts with ``title``."""
    for block in out.split("\n\n"):
        head, *lines = block.splitlines()
        if head.startswith(title):
            return lines
    raise AssertionError(f"no section {title!r} in:\n{out}")


def option_values(out: str) -> dict[str, str]:
    """``{key: printed value}`` of the two option sections (annotations in parentheses dropped)."""
    values = {}
    for title in ("training options", "method options"):
        for line in section(out, title):
            key, text = line.split(maxsplit=1)
            values[key] = text.split("  (")[0]
    return values


def test_show_hib_prints_every_resolved_key_and_its_default(capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_main(["show", "hib"], capsys)
    assert code == 0 and not err
    hib = methods.get("hib")
    cfg = config.resolve(hib)
    values = option_values(out)
    assert set(values) == set(cfg) - {"method", "priors"}
    for key, text in values.items():
        # every printed value is TOML (what --set takes) and reads back as the resolved default
        assert config.parse_value(text) == cfg[key], key
    assert [line.split()[0] for line in section(out, "training options")] == list(TrainOptions.defaults())
    assert values["beta"] == "0.1" and values["predict_w"] == '"sample"' and values["eval_samples"] == "20"
    assert out.startswith(f"hib: {hib.summary}\npaper: {hib.paper}\n")


def test_show_hib_priors_optimiser_length_and_kl_schedule(capsys: pytest.CaptureFixture) -> None:
    _, out, _ = run_main(["show", "hib"], capsys)
    assert section(out, "priors") == ["  w  learned_normal: loc=0.0, scale=1.0, learn_loc=false, per_task=true"]
    assert section(out, "optimiser") == [
        "  ClippedAdam: lr = 0.003, clip_norm = 10.0, lr_decay = 1.0, weight_decay = 0.0"
    ]
    assert section(out, "length")[0].startswith("  100 epochs (steps = 0")
    assert section(out, "schedules") == ["  kl_weight  1, constant"]


def test_show_marks_the_methods_overrides_and_describes_annealing(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_main(["show", "vmtl"], capsys)
    assert code == 0
    lines = {line.split()[0]: line for line in section(out, "training options") + section(out, "method options")}
    assert lines["eval_samples"].split()[1:] == ["2", "(vmtl's", "value;", "TrainOptions", "has", "20)"]
    assert "(vmtl's value; VMTLOptions has {z = 1.0, w = 1.0})" in lines["kl_weights"]
    assert "vmtl's value" not in lines["amortized_classifier"]  # overridden with the class's own default
    assert "resolved to the default fraction of digits-domains" in lines["fraction"]
    schedules = dict(line.split(maxsplit=1) for line in section(out, "schedules"))
    assert schedules["kl_weight"] == "linear from 0 to 1 over the first 25% of the steps"
    assert schedules["priors.w.temperature"] == "exponential from 5 to 0.5 over the first 25% of the steps"
    assert schedules["kl_weights"].startswith("z = 0.01, w = 0.01")


@pytest.mark.parametrize("name", methods.available())
def test_show_every_registered_method(name: str, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_main(["show", name], capsys)
    assert code == 0 and not err
    cfg = config.resolve(methods.get(name))
    assert set(option_values(out)) == set(cfg) - {"method", "priors"}
    sites = [line.split()[0] for line in section(out, "priors")]
    assert sites == (list(cfg["priors"]) or ["(none:"])


def test_show_unknown_method_is_one_line_naming_the_known_ones(capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_main(["show", "nope"], capsys)
    assert code == 2 and not out
    assert len(err) == 1 and err[0].startswith("pyromtl: error: unknown method 'nope'")
    assert all(name in err[0] for name in methods.available())


def test_show_without_a_method_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_main(["show"], capsys)
    assert code == 2 and "usage: pyromtl show" in err[0]


PLUGIN = """
from dataclasses import dataclass

from pyromtl import methods
from pyromtl.method import Method
from pyromtl.options import Options


@dataclass
class ToyOptions(Options):
    width: int = 3


def build(ctx):
    raise NotImplementedError


methods.register(
    Method(name="toy-show", summary="a toy", paper="none", build=build, options=ToyOptions,
           overrides={"lr": 0.5, "width": 7})
)
"""


def test_show_a_method_registered_by_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(methods, "_USER", dict(methods._USER))  # the registration ends with the test
    plugin = tmp_path / "toy_show.py"
    plugin.write_text(PLUGIN)
    try:
        code, out, err = run_main(["show", "toy-show", "--import", str(plugin)], capsys)
    finally:
        sys.modules.pop("pyromtl_plugin_toy_show", None)
    assert code == 0 and not err
    lines = {line.split()[0]: line for line in section(out, "training options") + section(out, "method options")}
    assert "0.5  (toy-show's value; TrainOptions has 0.003)" in lines["lr"]
    assert "7  (toy-show's value; ToyOptions has 3)" in lines["width"]
    assert section(out, "priors") == ["  (none: the method has no latent sites)"]
    assert "ClippedAdam: lr = 0.5," in out
