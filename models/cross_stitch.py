"""Cross-stitch networks (Misra, Shrivastava, Gupta, Hebert, CVPR 2016): the SMTL paper's
soft-sharing baseline.

Every task has its own network; after each of its layers a cross-stitch unit, a learned
``T × T`` matrix ``A``, replaces task t's activations by ``Σ_s A_ts h_s``. ``A = I`` gives
``stl``; a rank-one ``A = 1 aᵀ`` gives every task the same representation, close to ``bmtl``.
The units start at ``A_tt = 0.9`` and ``A_ts = 0.1 / (T − 1)`` (the paper's α_S = 0.9, α_D = 0.1
for two tasks), and the networks at independent random weights.

The task networks are the layers of a :class:`~pyromtl.nn.TaskMLP` (``hidden`` then
``latent_dim``) with a unit after each, then a linear head per task; with a backbone other than
the MLP (``"cnn"`` or the user's), every task has its own copy of it and one more unit mixes
their features before the first layer (a user's network is a black box: no unit goes inside it): the shape of ``smtl``'s
encoder and decoder, so the SMTL table compares like with like. Everything is a point
estimate: the guide is empty and the ELBO is the log-likelihood. No loop over tasks: each layer
is one batched matmul and each unit one ``einsum``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pyromtl.base import MultiTaskModel, Plates
from pyromtl.data.core import Batch, MultiTaskData
from pyromtl.guides.cross_stitch import EmptyGuide
from pyromtl.method import Method, MethodContext
from pyromtl.nn import Backbone, TaskLinear, activation
from pyromtl.options import NetworkOptions
from pyromtl.schedules import TrainState

#: The diagonal of a cross-stitch unit at the start (the paper's α_S); the rest of each row shares 1 − this.
SELF_WEIGHT = 0.9


def stitch_init(num_tasks: int, self_weight: float = SELF_WEIGHT) -> torch.Tensor:
    """``[T, T]``: ``self_weight`` on the diagonal, ``(1 − self_weight) / (T − 1)`` elsewhere (rows sum to 1)."""
    if num_tasks == 1:
        return torch.ones(1, 1)
    off = (1.0 - self_weight) / (num_tasks - 1)
    return torch.full((num_tasks, num_tasks), off) + (self_weight - off) * torch.eye(num_tasks)


class CrossStitchModel(MultiTaskModel):
    """``p(y | x) = prod_t p(y_t | c_t(h_t(x)))`` where the task networks ``h`` exchange activations
    through cross-stitch units after every layer."""

    def __init__(
        self, data: MultiTaskData, cfg: Mapping[str, Any], state: TrainState, device: torch.device, backbone: Backbone
    ):
        info = data.info.to(device)
        super().__init__(info, state)
        T = info.num_tasks
        # a backbone other than the MLP: one copy per task, and a unit on their features
        trunk, features = backbone.trunks(T, info.input_shape, cfg["activation"])
        self.trunk = trunk.to(device) if trunk is not None else None
        self.trunk_stitch = nn.Parameter(stitch_init(T).to(device)) if trunk is not None else None
        dims = [features, *cfg["hidden"], cfg["latent_dim"]]
        self.layers = nn.ModuleList([TaskLinear(T, a, b) for a, b in zip(dims[:-1], dims[1:])]).to(device)
        self.act = activation(cfg["activation"])
        self.stitches = nn.ParameterList([nn.Parameter(stitch_init(T).to(device)) for _ in self.layers])
        self.head = TaskLinear(T, cfg["latent_dim"], info.out_dim).to(device)

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Head outputs ``[T, B, K]`` of SIMO inputs ``x [B, ...]``."""
        if self.trunk is None or self.trunk_stitch is None:
            h = x.flatten(x.dim() - len(self.info.input_shape))  # [B, D]: the first layer broadcasts it to every task
        else:
            h = torch.einsum("ts,sbd->tbd", self.trunk_stitch, self.trunk(x))  # [T, B, F]
        last = len(self.layers) - 1
        for i, (layer, stitch) in enumerate(zip(self.layers, self.stitches)):
            h = layer(h)
            # the latent layer stays linear, as stl's and smtl's encoders do, so only the units differ
            h = torch.einsum("ts,sbd->tbd", stitch, h if i == last else self.act(h))
        return self.head(h)

    def forward(self, batch: Batch) -> None:
        out = self.outputs(batch.x)
        with Plates(batch).observations():
            self.observe(out, batch)


@dataclass
class CrossStitchOptions(NetworkOptions):
    """Options of ``cross-stitch``: the network of ``stl``/``bmtl``, whose defaults ``smtl`` shares."""


def build_cross_stitch(ctx: MethodContext) -> tuple[CrossStitchModel, EmptyGuide]:
    model = CrossStitchModel(ctx.data, ctx.config, ctx.state, ctx.device, ctx.backbone)
    return model, EmptyGuide(ctx.data, ctx.state, ctx.device)


def stitch_relatedness(ctx: MethodContext) -> dict[str, np.ndarray]:
    """``{"stitch": A}`` of the last unit: how much of task s's representation task t reads."""
    return {"stitch": ctx.model.stitches[-1].detach().cpu().numpy()}


METHODS: tuple[Method, ...] = (
    Method(
        name="cross-stitch",
        summary="cross-stitch networks: one network per task, learned T x T units mix their activations "
        "after every layer",
        paper="Misra et al., Cross-stitch Networks for Multi-task Learning, CVPR 2016 (SMTL's baseline)",
        build=build_cross_stitch,
        options=CrossStitchOptions,
        settings=("simo",),
        min_tasks=2,
        relatedness=stitch_relatedness,
        relatedness_titles={"stitch": "cross-stitch unit of the last layer: row t reads task s with weight A_ts"},
    ),
)
