"""Networks shared by the methods: MLP and small-CNN encoders, task-vectorised layers and Gaussian encoders.

``TaskLinear``/``TaskMLP`` hold one set of weights per task (``[T, in, out]``) and apply all
of them in one batched matmul, so per-task networks (STL) need no Python loop over tasks.
``TaskCNN`` does the same for convolutions: task t's filters are group t of grouped convolutions.

A *backbone* is what an encoder puts in front of its output: ``"mlp"`` (flattened inputs) or
``"cnn"`` (image inputs ``[C, H, W]``: :class:`CNN`, :class:`TaskCNN`); methods choose it with
the ``backbone`` and ``conv_channels`` options (:func:`check_backbone`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "gelu": nn.GELU}
#: Values of the ``backbone`` option.
BACKBONES = ("mlp", "cnn")
#: Default ``conv_channels``: the output channels of the CNN backbone's three blocks.
DEFAULT_CONV_CHANNELS = (32, 64, 64)


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class TaskLinear(nn.Module):
    """``T`` independent linear maps applied at once: ``[..., T, B, in] -> [..., T, B, out]``.

    An input without the task dimension (``[B, in]``, SIMO) is shared by every task.
    """

    def __init__(self, num_tasks: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(num_tasks, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_tasks, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


def _mlp_layers(dims: Sequence[int], act: str, make) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(make(a, b))
        if i < len(dims) - 2:
            layers.append(activation(act))
    return nn.Sequential(*layers)


class MLP(nn.Sequential):
    """A plain MLP shared by all tasks; the last layer has no activation."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, act: str = "elu"):
        super().__init__(*_mlp_layers([in_dim, *hidden, out_dim], act, nn.Linear))


class TaskMLP(nn.Sequential):
    """One MLP per task, evaluated together through :class:`TaskLinear` layers."""

    def __init__(self, num_tasks: int, in_dim: int, hidden: Sequence[int], out_dim: int, act: str = "elu"):
        super().__init__(*_mlp_layers([in_dim, *hidden, out_dim], act, lambda a, b: TaskLinear(num_tasks, a, b)))


# ---------------------------------------------------------------------------- CNN backbone
def check_backbone(backbone: str, conv_channels: Sequence[int]) -> None:
    """Refuse a ``backbone``/``conv_channels`` pair of options that names no network (no data needed)."""
    if backbone not in BACKBONES:
        raise ValueError(f"config key 'backbone' must be one of {list(BACKBONES)}, got {backbone!r}")
    if backbone == "cnn" and not conv_channels:
        raise ValueError(
            "config key 'conv_channels' must list at least one block's channels when backbone = 'cnn', got []"
        )


def image_shape(input_shape: Sequence[int], num_blocks: int) -> tuple[int, int, int]:
    """``(C, H, W)`` of image inputs that ``num_blocks`` conv + 2×2 max-pool blocks can take, else ``ValueError``."""
    shape = tuple(int(n) for n in input_shape)
    if len(shape) != 3:
        raise ValueError(
            f"backbone = 'cnn' needs image inputs shaped [C, H, W]; this data's input shape is {shape} "
            f"({len(shape)}-D); use backbone = 'mlp'"
        )
    channels, height, width = shape
    if min(height, width) < 2**num_blocks:
        raise ValueError(
            f"backbone = 'cnn' halves the image once per block ({num_blocks} blocks, one per entry of "
            f"conv_channels), so H and W must be at least {2**num_blocks}; the input shape is {shape}; "
            "give conv_channels fewer entries"
        )
    return channels, height, width


def _conv_blocks(in_channels: int, channels: Sequence[int], act: str, groups: int = 1) -> nn.Sequential:
    """3×3 conv (same padding) + activation + 2×2 max-pool per entry of ``channels``.

    With ``groups = T`` every width is multiplied by T and group t holds task t's filters, so
    the blocks are T independent trunks evaluated by one convolution each.
    """
    layers: list[nn.Module] = []
    for a, b in zip([in_channels, *channels[:-1]], channels):
        layers += [nn.Conv2d(groups * a, groups * b, 3, padding=1, groups=groups), activation(act), nn.MaxPool2d(2)]
    return nn.Sequential(*layers)


def _flat_size(shape: tuple[int, int, int], channels: Sequence[int]) -> int:
    """Features after the conv blocks: each max-pool floors H and W to half."""
    _, height, width = shape
    n = len(channels)
    return channels[-1] * (height >> n) * (width >> n)


class CNN(nn.Module):
    """A small CNN shared by all tasks: conv blocks (:func:`_conv_blocks`), flatten, then an :class:`MLP` head.

    ``[..., C, H, W] -> [..., out_dim]``; any leading dims (SIMO ``[B]``, MIMO ``[T, B]``).
    """

    def __init__(
        self, input_shape: Sequence[int], channels: Sequence[int], hidden: Sequence[int], out_dim: int, act: str = "elu"
    ):
        super().__init__()
        shape = image_shape(input_shape, len(channels))
        self.trunk = _conv_blocks(shape[0], channels, act)
        self.head = MLP(_flat_size(shape, channels), hidden, out_dim, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-3]
        h = self.trunk(x.reshape(-1, *x.shape[-3:]))  # Conv2d takes one batch dim
        return self.head(h.reshape(*lead, math.prod(h.shape[1:])))  # sizes, not -1: an empty batch has no -1


class TaskCNN(nn.Module):
    """One :class:`CNN` per task, evaluated together: grouped convolutions, then a :class:`TaskMLP` head.

    Tasks are moved into the channel dim, so each conv is one call for all tasks (no loop over
    tasks): SIMO inputs ``[..., B, C, H, W]`` are repeated T times along the channels (every
    task sees the same image), MIMO inputs ``[..., T, B, C, H, W]`` put task t's images in group
    t. Outputs are ``[..., T, B, out_dim]``. Task t's network is the slice ``[t·c, (t+1)·c)`` of
    every conv's output channels and ``[t]`` of the head's :class:`TaskLinear` weights.
    """

    def __init__(
        self,
        num_tasks: int,
        input_shape: Sequence[int],
        channels: Sequence[int],
        hidden: Sequence[int],
        out_dim: int,
        act: str = "elu",
    ):
        super().__init__()
        shape = image_shape(input_shape, len(channels))
        self.num_tasks = num_tasks
        self.trunk = _conv_blocks(shape[0], channels, act, groups=num_tasks)
        self.head = TaskMLP(num_tasks, _flat_size(shape, channels), hidden, out_dim, act)

    def forward(self, x: torch.Tensor, simo: bool) -> torch.Tensor:
        T = self.num_tasks
        chw = x.shape[-3:]
        if simo:
            lead = x.shape[:-3]  # [..., B]
            x = x.reshape(-1, *chw).repeat(1, T, 1, 1)  # [N, T·C, H, W]
        else:
            if x.dim() < 5 or x.shape[-5] != T:
                raise ValueError(
                    f"per-task CNN of {T} tasks expects MIMO inputs [..., {T}, B, C, H, W], got {tuple(x.shape)}"
                )
            x = x.movedim(-5, -4)  # [..., B, T, C, H, W]
            lead = x.shape[:-4]
            x = x.reshape(-1, T * chw[0], *chw[1:])
        h = self.trunk(x)  # [N, T·c, h, w], task-major channels
        h = h.reshape(*lead, T, math.prod(h.shape[1:]) // T)  # [..., B, T, c·h·w], each task's in CNN order
        return self.head(h.movedim(-2, -3))


# ---------------------------------------------------------------------------- Gaussian encoder
class GaussianEncoder(PyroModule):
    """Amortised diagonal Gaussian ``q(z|x) = N(mu(x), diag sigma^2(x))`` (VMTL eq. 3).

    ``per_task=True`` gives every task its own network (STL-style); otherwise one network
    serves all tasks. ``in_dim`` is the input's size or its shape. The ``"mlp"`` backbone
    flattens inputs; ``"cnn"`` (:class:`CNN`, :class:`TaskCNN`) needs the image shape
    ``(C, H, W)`` as ``in_dim``. Outputs are ``loc, scale`` shaped ``[..., T|1, B, d]``.
    """

    def __init__(
        self,
        num_tasks: int,
        in_dim: int | Sequence[int],
        hidden: Sequence[int],
        latent_dim: int,
        act: str = "elu",
        per_task: bool = False,
        min_scale: float = 1e-3,
        backbone: str = "mlp",
        conv_channels: Sequence[int] = DEFAULT_CONV_CHANNELS,
    ):
        super().__init__()
        check_backbone(backbone, conv_channels)
        self.per_task = per_task
        self.latent_dim = latent_dim
        self.min_scale = min_scale
        self.cnn = backbone == "cnn"
        shape = tuple(in_dim) if isinstance(in_dim, Sequence) else (int(in_dim),)
        self.net: nn.Module
        if self.cnn:
            channels = list(conv_channels)
            self.net = (
                TaskCNN(num_tasks, shape, channels, list(hidden), 2 * latent_dim, act)
                if per_task
                else CNN(shape, channels, list(hidden), 2 * latent_dim, act)
            )
        else:
            size = math.prod(shape)
            self.net = (
                TaskMLP(num_tasks, size, list(hidden), 2 * latent_dim, act)
                if per_task
                else MLP(size, list(hidden), 2 * latent_dim, act)
            )

    def forward(self, x: torch.Tensor, simo: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cnn:
            h = self.net(x, simo) if self.per_task else self.net(x)
        else:
            # SIMO inputs [B, ...] and MIMO inputs [T, B, ...] are flattened to features.
            lead = 1 if simo else 2
            h = self.net(x.reshape(*x.shape[:lead], -1))
        if simo and not self.per_task:
            h = h.unsqueeze(-3)  # one shared representation: [1, B, 2d]
        loc, raw = h.split(self.latent_dim, dim=-1)
        return loc, F.softplus(raw) + self.min_scale


def cross_attention(query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product cross-attention, ``softmax(q K^T / sqrt(d)) K`` (VMTL eq. 10).

    ``query [Q, d]`` attends over each task's key set ``keys [T, n, d]`` (keys are also the
    values); ``key_mask [T, n]`` marks real keys. Returns ``[Q, T, d]``. Every task must have at
    least one real key.
    """
    scores = torch.einsum("qd,tnd->qtn", query, keys) / math.sqrt(query.shape[-1])
    scores = scores.masked_fill(~key_mask, float("-inf"))
    return torch.einsum("qtn,tnd->qtd", torch.softmax(scores, dim=-1), keys)
