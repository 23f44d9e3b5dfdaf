"""Guides of VMTL and VMTL-AC (Shen et al., NeurIPS 2021).

VMTL's guide is the baseline guide: ``q_phi(z | x)`` amortised (eq. 3) and ``q_theta(w_t)`` a
diagonal Gaussian per class and task (eq. 8). VMTL-AC swaps ``q_theta(w_t)`` for
:class:`AmortizedClassifier`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyromtl.data.core import MultiTaskData
from pyromtl.guides.baselines import LatentMTLGuide
from pyromtl.nn import MLP, GaussianEncoder

VMTLGuide = LatentMTLGuide


class AmortizedClassifier(nn.Module):
    """VMTL-AC's ``q(w_{t,c}) = N(mu_{t,c}, diag sigma^2_{t,c})`` from one shared network.

    The network maps the mean representation ``mu_phi(x)`` of class c's training samples in
    task t to ``(mu_{t,c}, sigma_{t,c})`` (§3.1, amortised classifier). Classes are read from the
    whole training split, so predictions on any batch use the same classifier. Regression
    tasks have one "class" holding every sample.
    """

    def __init__(self, data: MultiTaskData, encoder: GaussianEncoder, hidden: Sequence[int], act: str,
                 device: torch.device):
        super().__init__()
        info = data.info
        pad = data._padded("train", device)
        labels = torch.where(info.type_code.to(device)[:, None] == 0, pad.y.long(), torch.zeros_like(pad.y, dtype=torch.long))
        valid = (torch.arange(pad.y.shape[1], device=device) < pad.n[:, None]).float()
        onehot = F.one_hot(labels, info.out_dim).float() * valid[..., None]  # [T, N, K]
        self.register_buffer("weights", onehot / onehot.sum(1, keepdim=True).clamp(min=1.0))
        self.register_buffer("x", pad.x)
        self.encoder = encoder
        d = encoder.latent_dim
        self.net = MLP(d, list(hidden), 2 * d, act)

    def forward(self, batch=None) -> tuple[torch.Tensor, torch.Tensor]:
        feats, _ = self.encoder(self.x, False)  # [T, N, d]
        means = torch.einsum("tnk,tnd->tkd", self.weights, feats)
        loc, raw = self.net(means).chunk(2, dim=-1)
        return loc.unsqueeze(1), F.softplus(raw).unsqueeze(1) + 1e-5
