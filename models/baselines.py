"""The baseline family STL / BMTL / VSTL / VBMTL as one Pyro model (VMTL paper, §4 baselines).

Latents, each with a prior from the registry (``pyromtl.priors``):

* ``z`` — per-sample representation, ``[T, B, d]`` (or ``[1, B, d]`` when SIMO tasks share it);
* ``w`` — per-task classifier, ``[T, 1, K, d]`` (one weight vector per class, eq. 8).

``mc_z = L`` and ``mc_w = M`` Monte-Carlo draws of each are taken under plates of their own
(dims -4 and -3), and the likelihood is averaged over all L x M pairs (VMTL eq. 11).

The four baselines differ only in configuration:

========  ==========================  ==========================
method    encoder                     priors of z and w
========  ==========================  ==========================
``stl``   one per task                ``deterministic`` (ML point)
``bmtl``  shared                      ``deterministic``
``vstl``  one per task                ``normal`` N(0, I)
``vbmtl`` shared                      ``normal`` N(0, I)
========  ==========================  ==========================

A ``deterministic`` prior is flat, and the guide then uses a point mass (``Delta``), so the
ELBO reduces to the log-likelihood at that point; any other prior gets a diagonal Gaussian
posterior. The encoder and the posterior of ``w`` are shared with the guide, because
mixture priors (VMTL) are built from them.
"""

from __future__ import annotations

from typing import Any

import pyro
import torch
from pyro.nn import PyroParam

from pyromtl.base import MultiTaskModel, Plates, TrainState, site_kl_weights
from pyromtl.data.core import Batch, MultiTaskData
from pyromtl.nn import GaussianEncoder
from pyromtl.priors import PriorSite


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


class LatentMTLModel(MultiTaskModel):
    """``p(y, z, w | x) = p(w) p(z | x) p(y | z, w)`` with priors from the registry."""

    def __init__(self, data: MultiTaskData, cfg: dict[str, Any], state: TrainState, encoder: GaussianEncoder,
                 w_post: torch.nn.Module, device: torch.device):
        info = data.info.to(device)
        super().__init__(info, state, cfg["kl_weight"], site_kl_weights(cfg))
        self.encoder = encoder
        self.w_post = w_post
        self.latent_dim = cfg["latent_dim"]
        self.mc_z, self.mc_w = cfg["mc_z"], cfg["mc_w"]
        self.shared_z = info.simo and not cfg["per_task_encoder"]
        self.z_prior = PriorSite("z", cfg["priors"]["z"], device=device)
        self.w_prior = PriorSite("w", cfg["priors"]["w"], device=device)
        self.bias = PyroParam(torch.zeros(info.num_tasks, 1, info.out_dim, device=device))

    def z_components(self, batch: Batch):
        """Mixture components for the prior of ``z``; the baselines' priors need none."""
        return None

    def w_components(self):
        return None

    def sample_w(self, plates: Plates) -> torch.Tensor:
        """``w [..., M, T, 1, K, d]``: M Monte-Carlo draws per task (eq. 11)."""
        T, K, d = self.info.num_tasks, self.info.out_dim, self.latent_dim
        # components first: parameter reads inside scale handlers each cost a device op
        components = self.w_components()
        with plates.globals(), self.kl_scope("w"):
            prior = self.w_prior.build(batch_shape=(T, 1), event_shape=(K, d), num_tasks=T, step=self.state.step,
                                       components=components, task_axis=-2)
            return pyro.sample("w", prior)

    def sample_z(self, batch: Batch, plates: Plates) -> torch.Tensor:
        """``z [..., L, 1, T|1, B, d]``: L Monte-Carlo draws per sample (eq. 11)."""
        rows = 1 if self.shared_z else batch.num_tasks
        components = self.z_components(batch)
        with plates.locals(shared=self.shared_z), self.kl_scope("z"):
            prior = self.z_prior.build(batch_shape=(rows, batch.size), event_shape=(self.latent_dim,),
                                       num_tasks=batch.num_tasks, step=self.state.step,
                                       components=components, task_axis=-2)
            return pyro.sample("z", prior)

    def forward(self, batch: Batch) -> None:
        plates = Plates(batch, self.mc_z, self.mc_w)
        w = self.sample_w(plates)
        z = self.sample_z(batch, plates)
        # z [..., L, 1, T|1, B, d] x w [..., M, T, K, d] -> [..., L, M, T, B, K]: all L x M pairs.
        # One batched product per task over (L B) x (M K); a broadcast matmul would first copy z M times.
        w = w.squeeze(-3)
        w = w.reshape((1,) * (z.dim() - w.dim()) + w.shape)  # w's batch dims lack mc_z without outer plates
        outputs = torch.einsum("...lotbd,...lmtkd->...lmtbk", z, w) + self.bias
        with plates.observations():
            self.observe(outputs, batch)
