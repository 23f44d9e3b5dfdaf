"""The CNN backbone (``backbone = "cnn"``): shapes, the per-task CNN against separate CNNs,
config errors, and short learning checks on tiny synthetic images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyromtl.nn import CNN, GaussianEncoder, TaskCNN, TaskLinear

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
            one.weight.copy_(conv.weight[t * c:(t + 1) * c])
            one.bias.copy_(conv.bias[t * c:(t + 1) * c])
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
