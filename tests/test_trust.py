"""Nothing named in a run directory runs as code, and nothing is compiled or loaded from a cache.

Run directories are what people send each other. A network option names a network that the
user's own code registered (``pyromtl.networks.register``, through ``--import``); a string in
``config.toml`` is never imported. Every step runs on torch ops: no C compiler is looked for.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import pyromtl
from pyromtl import cli, networks
from tests.conftest import TINY, mixed_simo, scaled

PLANTED = """
from pathlib import Path
Path({marker!r}).write_text("imported")

def make(input_shape):
    import torch
    return torch.nn.Linear(input_shape[0], 4)
"""


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An importable module that writes a marker when imported, and its name."""
    name = f"planted_{uuid.uuid4().hex[:12]}"
    marker = tmp_path / "marker"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / f"{name}.py").write_text(PLANTED.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    yield name, marker
    sys.modules.pop(name, None)


@pytest.fixture
def smtl_run(tmp_path: Path, planted) -> Path:
    """A finished SMTL run whose config names the planted module as its backbone."""
    name, _ = planted
    out = tmp_path / "run"
    pyromtl.fit("smtl", "digits-mixed", steps=2, device="cpu", out=out, **TINY)
    config = out / "config.toml"
    text = config.read_text()
    assert 'backbone = "mlp"' in text
    config.write_text(text.replace('backbone = "mlp"', f'backbone = "{name}:make"'))
    return out


def _refused(err: str, name: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"config key 'backbone' names network '{name}:make', which is not registered" in lines[0]


def test_a_run_directory_never_imports_what_its_config_names(smtl_run: Path, planted, capsys) -> None:
    name, marker = planted
    for command in (
        ["evaluate", str(smtl_run)],
        ["report", str(smtl_run)],
        ["fit", "smtl", "--config", str(smtl_run / "config.toml"), "--out", str(smtl_run)],
    ):
        assert cli.main(command) == 2, command
        _refused(capsys.readouterr().err, name)
    with pytest.raises(ValueError) as caught:
        pyromtl.load(smtl_run)
    _refused(str(caught.value), name)
    assert not marker.exists() and name not in sys.modules


def test_a_registered_network_is_used_by_name(planted, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The same factory, registered by the user's own code, is what the name refers to."""
    import importlib

    name, marker = planted
    monkeypatch.setattr(networks, "_REGISTRY", {})
    networks.register("linear-encoder", importlib.import_module(name).make)  # the user's own import
    out = tmp_path / "r"
    fit = pyromtl.fit("smtl", mixed_simo(), steps=2, device="cpu", backbone="linear-encoder", out=out, **TINY)
    assert marker.exists()  # imported by the user, above
    assert 'backbone = "linear-encoder"' in (tmp_path / "r" / "config.toml").read_text()  # a name, never code
    assert isinstance(fit.model.public.backbone, __import__("torch").nn.Linear)
    with pytest.raises(ValueError, match="already registered"):
        networks.register("linear-encoder", fit.model.public.__class__)
    with pytest.raises(ValueError, match="non-empty string"):
        networks.register("", fit.model.public.__class__)


def test_no_compiler_is_looked_for(tmp_path: Path) -> None:
    """BayesAgg's all-regression CPU step (where a compiled kernel once ran) trains with no C compiler
    on PATH and prints no warning; no shared library appears in the cache."""
    env = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent),
        "PYROMTL_CACHE": str(tmp_path / "cache"),
        "CC": "/nonexistent/cc",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-m",
            "pyromtl.cli",
            "fit",
            "bayesagg",
            "--data",
            "digits-regression",
            "--steps",
            "4",
            "--set",
            "pretrain_steps=1",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=scaled(300),
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "compiler" not in done.stderr.lower() and "kernel" not in done.stderr.lower(), done.stderr
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.suffix in (".so", ".c", ".dll", ".dylib")]
