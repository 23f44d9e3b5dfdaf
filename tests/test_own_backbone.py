"""The user's own network as every method's backbone (``pyromtl.backbones``): from Python as a module
or a factory, by a registered name from the CLI; frozen parameters, BatchNorm buffers (per-task
copies included), the dry run that finds F, checkpoints, ``pyromtl.load`` and the ArviZ export."""

from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pyromtl
from pyromtl import backbones, cli, methods, networks
from pyromtl.data.core import MultiTaskData
from pyromtl.nn import TaskStack
from pyromtl.params import local_params
from pyromtl.train import build_training
from tests.conftest import interrupted_then_resumed, scaled, side_by_side

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 6, 6)
QUICK = dict(steps=3, eval_every=3, eval_samples=2, latent_dim=8, hidden=[8], batch_size=16, device="cpu", quiet=True)


def images(mimo: bool, num_tasks: int = 3, n: int = 48, seed: int = 0) -> MultiTaskData:
    """Noise images with a bright pixel on the diagonal at the label's row (3 classes)."""
    rng = np.random.default_rng(seed)

    def one() -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        x = rng.normal(size=(n, *SHAPE)).astype(np.float32)
        x[np.arange(n), 0, y, y] += 3.0
        return x, y

    if mimo:
        xs, ys = zip(*(one() for _ in range(num_tasks)))
        return MultiTaskData.from_arrays(list(xs), list(ys), "classification", name="images")
    x, y = one()
    labels = {f"t{t}": (y + t) % 3 for t in range(num_tasks)}
    return MultiTaskData.from_arrays(x, labels, "classification", name="images")


class Features(nn.Module):
    """A conv layer (frozen with ``freeze``), BatchNorm, pooling: ``[B, 1, 6, 6] -> [B, 8]``."""

    def __init__(self, freeze: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.norm = nn.BatchNorm2d(2)
        self.pool = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.conv.requires_grad_(not freeze)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.norm(self.conv(x)))


def _data_for(method: str) -> MultiTaskData:
    return images(mimo="simo" not in methods.get(method).settings)


def _stacks(fit) -> list[TaskStack]:
    return [m for m in fit.objective.modules() if isinstance(m, TaskStack)]


def _convs(fit) -> list[torch.Tensor]:
    """Every copy of the backbone's conv weight in the fitted model, ``[*, 2, 1, 3, 3]``."""
    shared = [m.conv.weight[None] for m in fit.objective.modules() if isinstance(m, Features)]
    stacked = [dict(zip(s.names, s.stacked))["conv.weight"] for s in _stacks(fit)]
    return shared + stacked


def _running_means(fit) -> list[torch.Tensor]:
    shared = [m.norm.running_mean for m in fit.objective.modules() if isinstance(m, Features)]
    stacked = [getattr(s, f"buffer_{s.buffer_names.index('norm.running_mean')}") for s in _stacks(fit)]
    return shared + stacked


def test_every_method_is_covered() -> None:
    assert set(EVERY) == set(methods.available())


EVERY = sorted(methods.available())


@pytest.mark.parametrize("method", EVERY)
def test_every_method_fits_a_frozen_user_backbone_with_batchnorm(method: str) -> None:
    """The frozen conv is bitwise what was passed, in every copy; BatchNorm's statistics moved;
    the module passed is untouched (a template); predictions are finite."""
    template = Features(freeze=True)
    before = copy.deepcopy(template.state_dict())
    fit = pyromtl.fit(method, _data_for(method), backbone=template, **QUICK)
    assert fit.config["backbone"] == "python:Features"
    convs = _convs(fit)
    assert convs, "the backbone is not in the model"
    for weights in convs:
        for w in weights:
            assert torch.equal(w, template.conv.weight)
    assert all(bool((m != 0).any()) for m in _running_means(fit)), "BatchNorm statistics never moved"
    assert all(torch.equal(v, before[k]) for k, v in template.state_dict().items()), "the template was trained"
    assert np.isfinite(fit.predict("test").loglik).all()


@pytest.mark.parametrize("method", ["stl", "smtl", "cross-stitch"])
def test_per_task_copies_of_a_module_start_equal_and_of_a_factory_independent(method: str) -> None:
    data = _data_for(method)
    fit = pyromtl.fit(method, data, backbone=Features(), **{**QUICK, "steps": 1})
    (stack,) = _stacks(fit)
    (w,) = [p for k, p in zip(stack.names, stack.stacked) if k == "conv.weight"]
    assert w.shape[0] == data.num_tasks
    fit = pyromtl.fit(method, data, backbone=lambda shape: Features(), **{**QUICK, "steps": 0, "epochs": 1})
    (stack,) = _stacks(fit)
    (w,) = [p for k, p in zip(stack.names, stack.stacked) if k == "conv.weight"]
    assert fit.config["backbone"].startswith("python:") and not torch.equal(w[0], w[1])


def test_a_task_stack_equals_its_copies_with_batchnorm_in_both_modes() -> None:
    torch.manual_seed(0)
    copies = [Features() for _ in range(3)]
    stack = TaskStack(copy.deepcopy(copies), sample_dims=3)
    x = torch.randn(3, 5, *SHAPE)
    for mode in (True, False):
        stack.train(mode)
        for c in copies:
            c.train(mode)
        got = stack(x)
        for t, c in enumerate(copies):
            torch.testing.assert_close(got[t], c(x[t]))
    means = getattr(stack, f"buffer_{stack.buffer_names.index('norm.running_mean')}")
    for t, c in enumerate(copies):  # one training pass moved every copy's statistics as its own
        torch.testing.assert_close(means[t], c.norm.running_mean)
    frozen = TaskStack([Features(freeze=True) for _ in range(2)], sample_dims=3)
    grads = {k: p.requires_grad for k, p in zip(frozen.names, frozen.stacked)}
    assert grads == {"conv.weight": False, "conv.bias": False, "norm.weight": True, "norm.bias": True}


def test_the_dry_run_finds_f_and_refuses_other_shapes() -> None:
    assert backbones.feature_size(Features(), SHAPE) == 8
    net = Features().train()
    backbones.feature_size(net, SHAPE)
    assert net.training and bool((net.norm.running_mean == 0).all())  # eval mode: no statistic moved
    data = images(mimo=False)
    with pytest.raises(
        ValueError, match=r"must map inputs \[B, 1, 6, 6\] to features \[B, F\]; on B = 2 it returned \(2, 2, 6, 6\)"
    ):
        pyromtl.fit("bmtl", data, backbone=nn.Conv2d(1, 2, 3, padding=1), **QUICK)
    with pytest.raises(ValueError, match=r"backbone 'python:Linear' failed on inputs shaped \[2, 1, 6, 6\]"):
        pyromtl.fit("bmtl", data, backbone=nn.Linear(5, 3), **QUICK)
    with pytest.raises(ValueError, match=r"the factory must return an nn\.Module, got int"):
        pyromtl.fit("bmtl", data, backbone=lambda shape: 3, **QUICK)
    with pytest.raises(ValueError, match=r"backbone must be an nn\.Module or a callable"):
        pyromtl.fit("bmtl", data, backbone=3, **QUICK)


@local_params
def test_building_leaves_batchnorm_statistics_alone() -> None:
    """The objective's first pass (which makes lazy parameters) puts every buffer back."""
    from pyromtl import config
    from pyromtl.runspec import RunSpec

    m = methods.get("bmtl")
    cfg = config.resolve(m, {**QUICK, "backbone": backbones.label(Features())}, data=images(False))
    objective, _ = build_training(RunSpec.build(m, cfg, images(False), backbone=Features()))
    (norm,) = [mod for mod in objective.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert bool((norm.running_mean == 0).all()) and int(norm.num_batches_tracked) == 0


def test_predictions_are_in_eval_mode() -> None:
    fit = pyromtl.fit("stl", images(False), backbone=Features(), **QUICK)
    assert not fit.objective.training
    before = [m.clone() for m in _running_means(fit)]
    fit.predict("val", num_samples=2)
    fit.to_arviz()
    assert all(torch.equal(a, b) for a, b in zip(before, _running_means(fit)))


def test_a_run_with_a_python_backbone_saves_resumes_and_reloads(tmp_path: Path) -> None:
    from pyromtl import config

    data = images(False)
    fit = pyromtl.fit("stl", data, backbone=Features(), out=tmp_path / "run", **QUICK)
    assert 'backbone = "python:Features"' in (tmp_path / "run" / "config.toml").read_text()  # a label, no code
    assert (tmp_path / "run" / "posterior.nc").is_file()
    with pytest.raises(ValueError, match=r"backbone 'python:Features' was given from Python as an object"):
        pyromtl.load(tmp_path / "run", data=data)
    with pytest.raises(ValueError, match=r"names backbone 'python:Features', but an object labelled 'python:Linear'"):
        pyromtl.load(tmp_path / "run", data=data, backbone=nn.Linear(2, 2))
    again = pyromtl.load(tmp_path / "run", data=data, backbone=Features())
    assert again.evaluate("test") == fit.evaluate("test")
    # an interrupted run resumes to the same state, BatchNorm statistics of the per-task copies included
    m = methods.get("stl")
    cfg = config.resolve(m, {**QUICK, "steps": 6, "backbone": "python:Features"}, data=data)
    from pyromtl.runspec import RunSpec
    from pyromtl.train import train

    template = Features()
    whole = train(RunSpec.build(m, cfg, data, tmp_path / "a", template))
    resumed = _resumed(m, cfg, data, tmp_path / "b", template, at=3)
    for (k, a), b in zip(whole.objective.state_dict().items(), resumed.objective.state_dict().values()):
        assert torch.equal(a, b), k


def _resumed(method, cfg, data, directory, template: nn.Module, at: int):
    """``interrupted_then_resumed`` with the same Python backbone passed to each attempt."""
    from pyromtl.runspec import RunSpec

    build = RunSpec.build
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunSpec, "build", lambda *a, **k: build(*a, **{**k, "backbone": template}))
        return interrupted_then_resumed(method, data, cfg, directory, at)


def small(input_shape: tuple[int, ...]) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 6), nn.BatchNorm1d(6), nn.ReLU())


def test_a_registered_backbone_from_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    plugin = tmp_path / "mynet.py"
    plugin.write_text(
        "import math\nfrom torch import nn\nimport pyromtl.networks\n\n"
        "def small(shape):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 6), nn.BatchNorm1d(6), nn.ReLU())\n\n"
        "pyromtl.networks.register('small', small, replace=True)\n"
    )
    monkeypatch.setattr(networks, "_REGISTRY", {})
    out = tmp_path / "run"
    args = ["--data", "digits-mixed", "--import", str(plugin), "--set", "backbone=small", "--set", "steps=2"]
    args += ["--set", "fraction=0.02", "--set", "eval_samples=1", "--set", "latent_dim=4", "--set", "hidden=[]"]
    assert cli.main(["fit", "lsmtl", *args, "--device", "cpu", "--out", str(out)]) == 0
    assert 'backbone = "small"' in (out / "config.toml").read_text()
    assert "small" in networks.available()
    monkeypatch.setattr(networks, "_REGISTRY", {})
    capsys.readouterr()
    assert cli.main(["evaluate", str(out)]) == 2  # a name nobody registered: one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config key 'backbone' names network 'small', which is not registered" in err[0]
    assert cli.main(["evaluate", str(out), "--import", str(plugin)]) == 0


def test_the_cli_refuses_a_python_backbone_in_one_line(tmp_path: Path, capsys) -> None:
    options = {**QUICK, "fraction": 0.02, "eval_samples": 1}
    pyromtl.fit("bmtl", "digits-mixed", backbone=small((64,)), out=tmp_path / "run", **options)
    capsys.readouterr()
    config = str(tmp_path / "run" / "config.toml")
    assert cli.main(["fit", "bmtl", "--config", config, "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was given from Python as an object" in err[0]


def test_registered_names_cannot_shadow_the_built_in_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(networks, "_REGISTRY", {})
    for name in ("mlp", "cnn", "python:mine"):
        with pytest.raises(ValueError, match="reserved"):
            networks.register(name, small)


@pytest.mark.slow
def test_the_resnet_example_runs(tmp_path: Path) -> None:
    """``examples/own_backbone.py``: a ResNet-18 under vmtl, bayesagg, hib and lsmtl, then the CLI;
    with saved weights the ResNet is frozen."""
    pytest.importorskip("torchvision")
    weights = tmp_path / "resnet18.pt"
    from torchvision.models import resnet18

    torch.save(resnet18(weights=None).state_dict(), weights)
    example = str(ROOT / "examples" / "own_backbone.py")
    script = [sys.executable, example, "--steps", "2", "--quick", "--weights", str(weights)]
    command = [sys.executable, "-m", "pyromtl.cli", "fit", "vmtl", "--data", "digits-domains", "--import", example]
    command += ["--set", "backbone=resnet18", "--set", "steps=1", "--set", "eval_samples=1", "--set", "quiet=true"]
    command += ["--device", "cpu", "--out", str(tmp_path / "cli")]
    # the two are independent: they run side by side, one intra-op thread each
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = side_by_side([script, command], scaled(600), env=env)
    run, cli_run = runs
    assert run.returncode == 0, run.stderr[-2000:]
    assert [line.split()[0] for line in run.stdout.splitlines()] == ["vmtl", "bayesagg", "hib", "lsmtl"]
    assert cli_run.returncode == 0, cli_run.stderr[-2000:]
    assert 'backbone = "resnet18"' in (tmp_path / "cli" / "config.toml").read_text()
