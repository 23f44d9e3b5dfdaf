"""Guide of the baseline family (STL / BMTL / VSTL / VBMTL), see ``models/baselines.py``.

``q(z | x)`` is the amortised diagonal Gaussian of the shared (or per-task) encoder (VMTL
eq. 3) and ``q(w_t)`` a diagonal Gaussian per class and task (eq. 8,
:class:`ClassifierPosterior`). A site whose prior is ``deterministic`` gets a point mass at the
mean instead.
"""

from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import torch

from pyromtl.base import MultiTaskModule, Plates, TrainState, is_point
from pyromtl.data.core import Batch, MultiTaskData
from pyromtl.nn import GaussianEncoder


class ClassifierPosterior(torch.nn.Module):
    """``q(w_t) = prod_c N(mu_{t,c}, diag sigma^2_{t,c})`` (VMTL eq. 8), one row per task.

    Shared by the guide (which samples from it) and by mixture priors (which use the other
    tasks' rows as components).
    """

    def __init__(self, num_tasks: int, out_dim: int, latent_dim: int, init_scale: float = 0.1):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.randn(num_tasks, 1, out_dim, latent_dim) / latent_dim**0.5)
        self.raw_scale = torch.nn.Parameter(torch.full((num_tasks, 1, out_dim, latent_dim), init_scale).expm1().log())

    def forward(self, batch: Batch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc, torch.nn.functional.softplus(self.raw_scale) + 1e-5


def gaussian_or_point(loc: torch.Tensor, scale: torch.Tensor, event_dim: int, point: bool) -> dist.Distribution:
    if point:
        return dist.Delta(loc, event_dim=event_dim)
    return dist.Normal(loc, scale).to_event(event_dim)


class LatentMTLGuide(MultiTaskModule):
    """Mean-field guide ``q(w) q(z | x)`` matching :class:`~pyromtl.models.baselines.LatentMTLModel`."""

    def __init__(self, data: MultiTaskData, cfg: dict[str, Any], state: TrainState, encoder: GaussianEncoder,
                 w_post: torch.nn.Module, device: torch.device):
        super().__init__(data.info.to(device), state, cfg["kl_weight"], cfg["kl_weights"])
        self.encoder = encoder
        self.w_post = w_post
        self.shared_z = data.simo and not cfg["per_task_encoder"]
        self.point_z = is_point(cfg["priors"]["z"])
        self.point_w = is_point(cfg["priors"]["w"])

    def plates(self, batch: Batch) -> Plates:
        return Plates(batch)

    def forward(self, batch: Batch) -> None:
        plates = self.plates(batch)
        loc, scale = self.w_post(batch)
        with plates.globals(), self.kl_scope("w"):
            pyro.sample("w", gaussian_or_point(loc, scale, 2, self.point_w))
        loc, scale = self.encoder(batch.x, batch.simo)
        with plates.locals(shared=self.shared_z), self.kl_scope("z"):
            pyro.sample("z", gaussian_or_point(loc, scale, 1, self.point_z))
