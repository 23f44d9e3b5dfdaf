"""Networks shared by the methods: MLP and small-CNN encoders, task-vectorised layers and Gaussian encoders.

``TaskLinear``/``TaskMLP`` hold one set of weights per task (``[T, in, out]``) and apply all
of them in one batched matmul, so per-task networks (STL) need no Python loop over tasks.
``TaskCNN`` does the same for convolutions: task t's filters are group t of grouped convolutions.

A *backbone* is what a method's network puts in front of its ``hidden`` layers: ``"mlp"``
(flattened inputs), ``"cnn"`` (image inputs ``[C, H, W]``: :class:`CNN`, :class:`TaskCNN`) or the
user's own ``nn.Module`` (:mod:`pyromtl.backbones`, :class:`BackboneNet`, :class:`TaskBackboneNet`);
methods choose it with the ``backbone`` and ``conv_channels`` options (:func:`check_backbone`).
Per-task copies of a user's network run together through :class:`TaskStack` (``torch.vmap``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

from pyromtl import networks

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "gelu": nn.GELU}
#: The built-in values of the ``backbone`` option; any other names a registered network.
BACKBONES = ("mlp", "cnn")
#: How a config names a backbone that was given from Python as an object (never code: a label).
PYTHON_PREFIX = "python:"
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


class FlatMLP(MLP):
    """An :class:`MLP` on inputs ``[..., *input_shape]``, flattened to ``[..., prod(input_shape)]``."""

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int], out_dim: int, act: str = "elu"):
        super().__init__(math.prod(input_shape), hidden, out_dim, act)
        self.sample_dims = len(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(x.dim() - self.sample_dims))


class FlatTaskMLP(TaskMLP):
    """A :class:`TaskMLP` on inputs ``[B, *input_shape]`` (shared) or ``[T, B, *input_shape]``, flattened."""

    def __init__(self, num_tasks: int, input_shape: Sequence[int], hidden: Sequence[int], out_dim: int, act: str):
        super().__init__(num_tasks, math.prod(input_shape), hidden, out_dim, act)
        self.sample_dims = len(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(x.dim() - self.sample_dims))


class TaskStack(nn.Module):
    """``T`` copies of one network, parameters and buffers stacked ``[T, ...]`` and run with ``torch.vmap``.

    Input ``[B, *sample]`` (shared by every task) or ``[T, B, *sample]``; output ``[T, B, *out]``.
    ``sample_dims`` is the number of dims of one sample: 1 for vectors (the default), 3 for
    images ``[C, H, W]``. A frozen parameter (``requires_grad=False``) stays frozen, and buffers
    (e.g. BatchNorm's running statistics) are updated in place per copy, as in the copies
    themselves; ``train()``/``eval()`` reach the copies.
    """

    def __init__(self, copies: Sequence[nn.Module], sample_dims: int = 1):
        super().__init__()
        self.num_tasks = len(copies)
        params, buffers = torch.func.stack_module_state(copies)
        frozen = {name for name, p in copies[0].named_parameters() if not p.requires_grad}
        self.names = list(params)
        self.stacked = nn.ParameterList(
            [nn.Parameter(params[k].detach(), requires_grad=k not in frozen) for k in self.names]
        )
        self.buffer_names = list(buffers)
        for i, k in enumerate(self.buffer_names):
            self.register_buffer(f"buffer_{i}", buffers[k])
        # the template only lends its code to functional_call: its own weights are never used
        self.template = [copy.deepcopy(copies[0]).to("meta")]
        self.sample_dims = sample_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        template = self.template[0]
        if template.training != self.training:
            template.train(self.training)

        def one(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], inputs: torch.Tensor):
            return torch.func.functional_call(template, (params, buffers), (inputs,))

        params = dict(zip(self.names, self.stacked))
        buffers = {k: getattr(self, f"buffer_{i}") for i, k in enumerate(self.buffer_names)}
        shared = x.dim() == 1 + self.sample_dims  # no task dim: every copy sees the same batch
        return torch.vmap(one, in_dims=(0, 0, None if shared else 0))(params, buffers, x)


class BackboneNet(nn.Module):
    """The user's ``backbone`` (``[B, *input_shape] -> [B, F]``) then an :class:`MLP` ``F -> hidden -> out_dim``.

    Inputs ``[..., *input_shape]`` with any leading dims (SIMO ``[B]``, MIMO ``[T, B]``), which are
    folded into the backbone's one batch dim; outputs ``[..., out_dim]``.
    """

    def __init__(self, backbone: nn.Module, input_shape: Sequence[int], features: int, hidden, out_dim: int, act: str):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.backbone = backbone
        self.head = MLP(features, hidden, out_dim, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[: x.dim() - len(self.input_shape)]
        h = self.backbone(x.reshape(math.prod(lead), *self.input_shape))
        return self.head(h.reshape(*lead, h.shape[-1]))


class TaskBackboneNet(nn.Module):
    """One copy of a backbone per task (a :class:`TaskStack` of ``features`` outputs), then a
    :class:`TaskMLP` per task.

    Inputs ``[B, *input_shape]`` (every task sees them) or ``[T, B, *input_shape]``; outputs ``[T, B, out_dim]``.
    """

    def __init__(self, backbone: TaskStack, features: int, hidden, out_dim: int, act: str):
        super().__init__()
        self.backbone = backbone
        self.head = TaskMLP(backbone.num_tasks, features, hidden, out_dim, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# ---------------------------------------------------------------------------- CNN backbone
def check_backbone(backbone: str, conv_channels: Sequence[int]) -> None:
    """Refuse a ``backbone``/``conv_channels`` pair of options that names no network (no data needed).

    A backbone is ``"mlp"``, ``"cnn"``, a network registered with :func:`pyromtl.networks.register`,
    or ``"python:<label>"``, the label of an ``nn.Module`` given from Python (``pyromtl.fit(...,
    backbone=module)``), which the run must be given again.
    """
    if backbone == "cnn" and not conv_channels:
        raise ValueError(
            "config key 'conv_channels' must list at least one block's channels when backbone = 'cnn', got []"
        )
    if backbone not in BACKBONES and not backbone.startswith(PYTHON_PREFIX):
        if not backbone:
            raise ValueError(f"config key 'backbone' must be one of {list(BACKBONES)} or a registered network, got ''")
        networks.check("backbone", backbone)


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

    def forward(self, x: torch.Tensor, simo: bool | None = None) -> torch.Tensor:
        T = self.num_tasks
        chw = x.shape[-3:]
        if simo is None:  # [B, C, H, W] is shared by every task, [T, B, C, H, W] is per task
            simo = x.dim() == 4
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


# ---------------------------------------------------------------------------- backbones
@dataclass(frozen=True)
class Backbone:
    """The network in front of a method's own parts, resolved for one run (:mod:`pyromtl.backbones`).

    ``name`` is the config's ``backbone``: ``"mlp"``, ``"cnn"`` (with ``conv_channels``), or the
    user's network, of which ``make()`` returns a fresh copy mapping ``[B, *input_shape]`` to
    features ``[B, features]``.
    """

    name: str = "mlp"
    conv_channels: tuple[int, ...] = DEFAULT_CONV_CHANNELS
    make: Callable[[], nn.Module] | None = None
    features: int = 0

    def shared(self, input_shape: Sequence[int], hidden: Sequence[int], out_dim: int, act: str) -> nn.Module:
        """One network for every task, ``[..., *input_shape] -> [..., out_dim]``: the backbone, then ``hidden``."""
        if self.make is not None:
            return BackboneNet(self.make(), input_shape, self.features, hidden, out_dim, act)
        if self.name == "cnn":
            return CNN(input_shape, self.conv_channels, hidden, out_dim, act)
        return FlatMLP(input_shape, hidden, out_dim, act)

    def per_task(
        self,
        num_tasks: int,
        input_shape: Sequence[int],
        hidden: Sequence[int],
        out_dim: int,
        act: str,
        sliceable: bool = False,
    ) -> nn.Module:
        """One network per task, ``[B, *input_shape]`` (shared) or ``[T, B, *input_shape]`` to
        ``[T, B, out_dim]``, evaluated in one batched call. ``sliceable``: every parameter and
        buffer is ``[T, ...]`` (the CNN's copies are then a :class:`TaskStack`, not grouped convolutions)."""
        if self.name == "mlp":
            return FlatTaskMLP(num_tasks, input_shape, hidden, out_dim, act)
        if self.name == "cnn" and not sliceable:
            return TaskCNN(num_tasks, input_shape, self.conv_channels, hidden, out_dim, act)
        trunks, features = self.trunks(num_tasks, input_shape, act)
        if trunks is None:  # the MLP: returned above
            raise RuntimeError("the mlp backbone has no trunk")
        return TaskBackboneNet(trunks, features, hidden, out_dim, act)

    def trunks(self, num_tasks: int, input_shape: Sequence[int], act: str) -> tuple[TaskStack | None, int]:
        """One copy of the backbone alone per task, ``[B | T, B, *input_shape] -> [T, B, F]``, and ``F``;
        ``(None, prod(input_shape))`` for the MLP, whose trunk is the flattened input."""
        if self.make is not None:
            return TaskStack([self.make() for _ in range(num_tasks)], len(input_shape)), self.features
        if self.name == "cnn":
            shape = image_shape(input_shape, len(self.conv_channels))
            channels = self.conv_channels
            copies = [nn.Sequential(_conv_blocks(shape[0], channels, act), nn.Flatten()) for _ in range(num_tasks)]
            return TaskStack(copies, len(shape)), _flat_size(shape, channels)
        return None, math.prod(input_shape)


# ---------------------------------------------------------------------------- Gaussian encoder
class GaussianEncoder(PyroModule):
    """Amortised diagonal Gaussian ``q(z|x) = N(mu(x), diag sigma^2(x))`` (VMTL eq. 3).

    ``per_task=True`` gives every task its own network (STL-style); otherwise one network
    serves all tasks. ``in_dim`` is the input's size or its shape. The network is the
    ``backbone`` (a name, or a resolved :class:`Backbone`) then the ``hidden`` layers: the
    ``"mlp"`` backbone flattens inputs; ``"cnn"`` (:class:`CNN`, :class:`TaskCNN`) needs the image
    shape ``(C, H, W)`` as ``in_dim``. Outputs are ``loc, scale`` shaped ``[..., T|1, B, d]``.
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
        backbone: str | Backbone = "mlp",
        conv_channels: Sequence[int] = DEFAULT_CONV_CHANNELS,
    ):
        super().__init__()
        if isinstance(backbone, str):
            check_backbone(backbone, conv_channels)
            backbone = Backbone(backbone, tuple(conv_channels))
        self.per_task = per_task
        self.latent_dim = latent_dim
        self.min_scale = min_scale
        shape = tuple(in_dim) if isinstance(in_dim, Sequence) else (int(in_dim),)
        self.net: nn.Module = (
            backbone.per_task(num_tasks, shape, list(hidden), 2 * latent_dim, act)
            if per_task
            else backbone.shared(shape, list(hidden), 2 * latent_dim, act)
        )

    def forward(self, x: torch.Tensor, simo: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # SIMO inputs [B, ...] and MIMO inputs [T, B, ...]; a per-task network tells them apart by their dims
        h = self.net(x)
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
