"""Guides of VMTL and VMTL-AC (Shen et al., NeurIPS 2021).

VMTL's guide is the baseline guide: ``q_phi(z | x)`` amortised (eq. 3) and ``q_theta(w_t)`` a
diagonal Gaussian per class and task (eq. 8), under VMTL's Monte-Carlo plates
(:class:`MonteCarloDraws`). VMTL-AC swaps ``q_theta(w_t)`` for :class:`AmortizedClassifier`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pyromtl.base import Plates
from pyromtl.data.core import Batch, MultiTaskData
from pyromtl.latent import LatentMTLGuide
from pyromtl.nn import MLP, GaussianEncoder
from pyromtl.schedules import TrainState


class MonteCarloDraws:
    """VMTL's plates: L draws of each ``z`` and M of each ``w`` (eq. 11), for model and guide alike.

    The likelihood averages all L x M pairs; each draw of a latent carries weight ``1/L`` or
    ``1/M`` (see :class:`~pyromtl.base.Plates`). Mixed into a model or guide that sets
    ``mc_z`` and ``mc_w``.
    """

    mc_z: int
    mc_w: int

    def plates(self, batch: Batch) -> Plates:
        return Plates(batch, self.mc_z, self.mc_w)


class VMTLGuide(MonteCarloDraws, LatentMTLGuide):
    """The baseline guide under VMTL's Monte-Carlo plates."""

    def __init__(
        self,
        data: MultiTaskData,
        cfg: Mapping[str, Any],
        state: TrainState,
        encoder: GaussianEncoder,
        w_post: nn.Module,
        device: torch.device,
    ):
        super().__init__(data, cfg, state, encoder, w_post, device)
        self.mc_z, self.mc_w = cfg["mc_z"], cfg["mc_w"]


class AmortizedClassifier(nn.Module):
    """VMTL-AC's ``q(w_{t,c}) = N(mu_{t,c}, diag sigma^2_{t,c})`` from one shared network.

    The network maps the mean representation ``mu_phi(x)`` of class c's training samples in
    task t to ``(mu_{t,c}, sigma_{t,c})`` (§3.1, amortised classifier). Classes are read from the
    whole training split, so predictions on any batch use the same classifier. Regression
    tasks have one "class" holding every sample.

    The mean is the class prototype plus the network's correction, and the scales start at
    ``min_scale + init_scale``. The floor ``min_scale`` matters: the mixture prior's components
    are the other tasks' posteriors, so nothing anchors the scales, and one shared network can
    shrink them all at once; the KL ``Δμ²/σ²`` then explodes and training stalls at chance
    (measured on ``digits-domains``: chance without a floor, 0.59 test accuracy with 0.2).
    """

    def __init__(
        self,
        data: MultiTaskData,
        encoder: GaussianEncoder,
        hidden: Sequence[int],
        act: str,
        device: torch.device,
        init_scale: float = 0.1,
        min_scale: float = 0.2,
    ):
        super().__init__()
        info = data.info
        pad = data.padded("train", device)
        labels = torch.where(
            info.type_code.to(device)[:, None] == 0, pad.y.long(), torch.zeros_like(pad.y, dtype=torch.long)
        )
        valid = (torch.arange(pad.y.shape[1], device=device) < pad.n[:, None]).float()
        onehot = F.one_hot(labels, info.out_dim).float() * valid[..., None]  # [T, N, K]
        self.register_buffer("weights", onehot / onehot.sum(1, keepdim=True).clamp(min=1.0))
        self.register_buffer("x", pad.x)
        self.encoder = encoder
        d = encoder.latent_dim
        self.net = MLP(d, list(hidden), 2 * d, act)
        self.raw_scale_offset = math.log(math.expm1(init_scale))
        self.min_scale = min_scale

    def forward(self, batch=None) -> tuple[torch.Tensor, torch.Tensor]:
        feats, _ = self.encoder(self.x, False)  # [T, N, d]
        means = torch.einsum("tnk,tnd->tkd", self.weights, feats)
        shift, raw = self.net(means).chunk(2, dim=-1)
        loc = means + shift
        return loc.unsqueeze(1), F.softplus(raw + self.raw_scale_offset).unsqueeze(1) + self.min_scale
