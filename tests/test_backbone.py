"""The CNN backbone (``backbone = "cnn"``): shapes, the per-task CNN against separate CNNs,
config errors, and short learning checks on tiny synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pyromtl
from pyromtl import methods
from pyromtl.config import resolve
from pyromtl.data.core import MultiTaskData
from pyromtl.nn import CNN, GaussianEncoder, TaskCNN, TaskLinear, TaskStack

SHAPE = (2, 8, 8)
CHANNELS = [4, 6]


def _sliced(net: TaskCNN, t: int, hidden: list[int], out_dim: int, act: str) -> CNN:
    """Task ``t``'s network of ``net`` as a plain :class:`CNN` with the same (sliced) weights."""
    single = CNN(SHAPE, CHANNELS, hidden, out_dim, act)
    grouped = [m for m in net.trunk if isinstance(m, nn.Conv2d)]
    plain = [m for m in single.trunk if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv, one in zip(grouped, plain, strict=True):
            c = one.out_channels
            one.weight.copy_(conv.weight[t * c : (t + 1) * c])
            one.bias.copy_(conv.bias[t * c : (t + 1) * c])
        task_linears = [m for m in net.head if isinstance(m, TaskLinear)]
        linears = [m for m in single.head if isinstance(m, nn.Linear)]
        for lin, one in zip(task_linears, linears, strict=True):
            one.weight.copy_(lin.weight[t].T)
            one.bias.copy_(lin.bias[t, 0])
    return single


@pytest.mark.parametrize("act", ["elu", "relu"])
def test_per_task_cnn_equals_separate_cnns(act: str) -> None:
    torch.manual_seed(0)
    T, B, hidden, out = 3, 5, [7], 4
    net = TaskCNN(T, SHAPE, CHANNELS, hidden, out, act)
    singles = [_sliced(net, t, hidden, out, act) for t in range(T)]
    x = torch.randn(B, *SHAPE)  # SIMO: every task sees the same images
    got = net(x, simo=True)
    assert got.shape == (T, B, out)
    for t, single in enumerate(singles):
        torch.testing.assert_close(got[t], single(x), rtol=1e-5, atol=1e-6)
    xm = torch.randn(T, B, *SHAPE)  # MIMO: task t's own images
    got = net(xm, simo=False)
    assert got.shape == (T, B, out)
    for t, single in enumerate(singles):
        torch.testing.assert_close(got[t], single(xm[t]), rtol=1e-5, atol=1e-6)


def test_cnn_shapes_with_leading_dims() -> None:
    torch.manual_seed(0)
    T, B = 3, 4
    shared = CNN(SHAPE, CHANNELS, [], 5)
    per_task = TaskCNN(T, SHAPE, CHANNELS, [], 5)
    assert shared(torch.randn(B, *SHAPE)).shape == (B, 5)
    assert shared(torch.randn(2, T, B, *SHAPE)).shape == (2, T, B, 5)
    assert per_task(torch.randn(2, B, *SHAPE), simo=True).shape == (2, T, B, 5)
    assert per_task(torch.randn(2, T, B, *SHAPE), simo=False).shape == (2, T, B, 5)
    assert shared(torch.randn(0, *SHAPE)).shape == (0, 5)  # an empty batch keeps its shape
    assert per_task(torch.randn(T, 0, *SHAPE), simo=False).shape == (T, 0, 5)
    with pytest.raises(ValueError, match=r"expects MIMO inputs \[\.\.\., 3, B, C, H, W\]"):
        per_task(torch.randn(2, B, *SHAPE), simo=False)


@pytest.mark.parametrize("per_task", [False, True])
def test_gaussian_encoder_shapes(per_task: bool) -> None:
    torch.manual_seed(0)
    T, B, d = 3, 4, 2
    enc = GaussianEncoder(T, SHAPE, [8], d, per_task=per_task, backbone="cnn", conv_channels=CHANNELS)
    loc, scale = enc(torch.randn(B, *SHAPE), simo=True)
    assert loc.shape == scale.shape == (T if per_task else 1, B, d)
    loc, scale = enc(torch.randn(T, B, *SHAPE), simo=False)
    assert loc.shape == scale.shape == (T, B, d)
    assert (scale > 0).all()


def test_image_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"needs image inputs shaped \[C, H, W\]; this data's input shape is \(64,\)"):
        CNN((64,), CHANNELS, [], 3)
    with pytest.raises(ValueError, match=r"H and W must be at least 8; the input shape is \(1, 4, 4\)"):
        TaskCNN(2, (1, 4, 4), [4, 4, 4], [], 3)


# ---------------------------------------------------------------------------- options
def _flat_data() -> MultiTaskData:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 64)).astype(np.float32)
    return MultiTaskData.from_arrays(x, {"a": rng.integers(0, 2, 40)}, "binary")


@pytest.mark.parametrize("method", ["stl", "bmtl", "vbmtl", "pcgrad", "bayesagg"])
def test_a_bad_backbone_is_a_config_error(method: str) -> None:
    m = methods.get(method)
    assert resolve(m)["backbone"] == "mlp" and resolve(m)["conv_channels"] == [32, 64, 64]
    assert resolve(m, {"backbone": "cnn", "conv_channels": [16]})["conv_channels"] == [16]
    with pytest.raises(ValueError, match=r"config key 'backbone' names network 'resnet', which is not registered"):
        resolve(m, {"backbone": "resnet"})
    with pytest.raises(ValueError, match=r"config key 'conv_channels' must list at least one"):
        resolve(m, {"backbone": "cnn", "conv_channels": []})
    with pytest.raises(ValueError, match=r"config key 'conv_channels' must be a list of positive integers"):
        resolve(m, {"conv_channels": [32, 0]})


@pytest.mark.parametrize("method", ["vmtl", "hib", "lsmtl", "cross-stitch"])
def test_every_family_takes_the_cnn(method: str) -> None:
    """VMTL attends over the other tasks' inputs and encodes the attended images with the CNN;
    SMTL's private encoders and cross-stitch's task networks are per-task copies of its trunk."""
    m = methods.get(method)
    fit = pyromtl.fit(method, quadrants("mimo" in m.settings), seed=0, **{**FAST, "steps": 3, "eval_every": 3})
    # a TaskStack's copies live in its stacked weights; its template holds their code
    stacked = [mod.template[0] for mod in fit.objective.modules() if isinstance(mod, TaskStack)]
    convs = [mod for net in (fit.objective, *stacked) for mod in net.modules() if isinstance(mod, nn.Conv2d)]
    assert convs, "no convolution was built"
    assert np.isfinite(fit.train_info["final_loss"])


@pytest.mark.parametrize("method", ["stl", "bmtl", "bayesagg"])
def test_the_cnn_needs_image_inputs(method: str) -> None:
    with pytest.raises(
        ValueError,
        match=r"backbone = 'cnn' needs image inputs shaped \[C, H, W\]; "
        r"this data's input shape is \(64,\)",
    ):
        pyromtl.fit(method, _flat_data(), backbone="cnn", steps=1, device="cpu", quiet=True)


# ---------------------------------------------------------------------------- learning
def quadrants(mimo: bool = False, n: int = 240, seed: int = 0) -> MultiTaskData:
    """8x8 one-channel noise images with one bright quadrant; task ``quadrant`` names it (4
    classes, chance 0.25), the binary task says whether it is in the bottom (SIMO) or right
    (MIMO, each task its own images) half (chance 0.5)."""
    rng = np.random.default_rng(seed)

    def images() -> tuple[np.ndarray, np.ndarray]:
        q = rng.integers(0, 4, n)
        x = rng.normal(0.0, 0.5, (n, 1, 8, 8)).astype(np.float32)
        for i, k in enumerate(q):
            r, c = divmod(int(k), 2)
            x[i, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 1.5
        return x, q

    if mimo:
        (x0, q0), (x1, q1) = images(), images()
        return MultiTaskData.from_arrays(
            [x0, x1], [q0, q1 % 2], ["classification", "binary"], ["quadrant", "right"], seed=seed
        )
    x, q = images()
    return MultiTaskData.from_arrays(x, {"quadrant": q, "bottom": q // 2}, ["classification", "binary"], seed=seed)


#: Small enough for ~0.5 s a run on one busy core; the task needs no more.
FAST = dict(
    backbone="cnn",
    conv_channels=[8, 8],
    hidden=[16],
    latent_dim=8,
    steps=60,
    batch_size=32,
    eval_every=30,
    eval_samples=4,
    lr=1e-2,
    device="cpu",
    quiet=True,
)


def _assert_learned(fit) -> None:
    acc = {task: m["accuracy"] for task, m in fit.evaluate("test")["tasks"].items()}
    assert acc["quadrant"] > 0.8, acc  # chance 0.25
    assert min(acc.values()) > 0.8, acc  # chance 0.5 for the binary task


@pytest.mark.parametrize(
    "method, mimo, net", [("bmtl", False, CNN), ("stl", False, TaskCNN), ("stl", True, TaskCNN), ("pcgrad", False, CNN)]
)  # pcgrad: torchjd's Jacobian over conv weights
def test_the_cnn_backbone_learns(method: str, mimo: bool, net: type) -> None:
    torch.manual_seed(0)
    fit = pyromtl.fit(method, quadrants(mimo), seed=0, **FAST)
    assert isinstance(fit.model.encoder.net, net)
    _assert_learned(fit)


def test_bayesagg_with_the_cnn_learns() -> None:
    torch.manual_seed(0)
    fit = pyromtl.fit("bayesagg", quadrants(), seed=0, pretrain_steps=20, **FAST)
    assert isinstance(fit.model.extractor[0], CNN)
    _assert_learned(fit)


def test_a_cnn_run_reloads(tmp_path) -> None:
    data = quadrants(mimo=True)
    fit = pyromtl.fit("stl", data, seed=0, out=tmp_path / "run", **{**FAST, "steps": 10, "eval_every": 10})
    again = pyromtl.load(tmp_path / "run", data=data)
    assert again.config["backbone"] == "cnn" and again.config["conv_channels"] == [8, 8]
    assert again.evaluate("test") == fit.evaluate("test")
