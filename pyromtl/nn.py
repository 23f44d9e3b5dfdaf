"""Networks shared by the methods: MLP encoders, task-vectorised layers and Gaussian encoders.

``TaskLinear``/``TaskMLP`` hold one set of weights per task (``[T, in, out]``) and apply all
of them in one batched matmul, so per-task networks (STL) need no Python loop over tasks.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "gelu": nn.GELU}


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


class GaussianEncoder(PyroModule):
    """Amortised diagonal Gaussian ``q(z|x) = N(mu(x), diag sigma^2(x))`` (VMTL eq. 3).

    ``per_task=True`` gives every task its own network (STL-style); otherwise one network
    serves all tasks. Inputs are flattened; outputs are ``loc, scale`` shaped ``[..., T|1, B, d]``.
    """

    def __init__(
        self,
        num_tasks: int,
        in_dim: int,
        hidden: Sequence[int],
        latent_dim: int,
        act: str = "elu",
        per_task: bool = False,
        min_scale: float = 1e-3,
    ):
        super().__init__()
        self.per_task = per_task
        self.latent_dim = latent_dim
        self.min_scale = min_scale
        net = TaskMLP if per_task else MLP
        args = (num_tasks,) if per_task else ()
        self.net = net(*args, in_dim, list(hidden), 2 * latent_dim, act)

    def forward(self, x: torch.Tensor, simo: bool) -> tuple[torch.Tensor, torch.Tensor]:
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
