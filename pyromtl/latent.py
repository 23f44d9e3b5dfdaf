"""The latent multi-task model that the VMTL family and its baselines share (VMTL paper, §3, §4).

``p(y, z, w | x) = p(w) p(z | x) p(y | z, w)`` with a prior from the registry
(:mod:`pyromtl.priors`) for each latent:

* ``z``: per-sample representation, ``[T, B, d]`` (or ``[1, B, d]`` when SIMO tasks share it);
* ``w``: per-task classifier, ``[T, 1, K, d]`` (one weight vector per class, eq. 8).

Its guide is mean-field: ``q(z | x)`` the amortised diagonal Gaussian of the shared (or
per-task) encoder (eq. 3) and ``q(w_t)`` a diagonal Gaussian per class and task (eq. 8,
:class:`ClassifierPosterior`). A site whose prior is ``deterministic`` gets a point mass at the
mean instead, so the ELBO reduces to the log-likelihood at that point. The encoder and the
posterior of ``w`` are shared by model and guide, because mixture priors (VMTL) are built from
them.

The baselines ``stl``, ``bmtl``, ``vstl`` and ``vbmtl`` (``models/baselines.py``) are this model
under four configurations, the weighting baselines (``models/weighting.py``) train ``bmtl``'s,
and VMTL (``models/vmtl.py``) extends it with mixture priors and Monte-Carlo plates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroParam

from pyromtl.base import MultiTaskModel, MultiTaskModule, Plates, is_point
from pyromtl.data.core import Batch, MultiTaskData
from pyromtl.method import ExportSite, MethodContext
from pyromtl.nn import GaussianEncoder
from pyromtl.options import NetworkOptions
from pyromtl.priors import PriorSite
from pyromtl.schedules import TrainState

VMTL_PAPER = "Shen et al., Variational Multi-Task Learning with Gumbel-Softmax Priors, NeurIPS 2021"

#: The KL warm-up of every variational method (vstl, vbmtl, vmtl, vmtl-ac): Bowman et al.'s
#: linear warm-up over the first quarter of the run; model selection starts after it.
KL_WARMUP: dict[str, Any] = {"start": 0.0, "end": 1.0, "fraction": 0.25}


def tempered(weight: float) -> dict[str, Any]:
    """KL settings of a variational method whose posterior is tempered by ``weight``.

    Every site's KL is scaled by ``weight`` (``kl_weights``), the likelihood is not: the
    posterior of a likelihood raised to the power ``1 / weight``. Each method's weight was
    picked on validation accuracy from {1e-7, 1e-4, 1e-2, 0.1, 1} (docs/methods/vmtl.md, "KL weight sweep").
    """
    return {"kl_weight": dict(KL_WARMUP), "kl_weights": {"z": weight, "w": weight}}


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


def gaussian_or_point(loc: torch.Tensor, scale: torch.Tensor, event_dim: int, point: bool) -> dist.TorchDistribution:
    if point:
        return dist.Delta(loc, event_dim=event_dim)
    return dist.Normal(loc, scale).to_event(event_dim)


class LatentMTLGuide(MultiTaskModule):
    """Mean-field guide ``q(w) q(z | x)`` matching :class:`LatentMTLModel`."""

    def __init__(
        self,
        data: MultiTaskData,
        cfg: Mapping[str, Any],
        state: TrainState,
        encoder: GaussianEncoder,
        w_post: torch.nn.Module,
        device: torch.device,
    ):
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


class LatentMTLModel(MultiTaskModel):
    """``p(y, z, w | x) = p(w) p(z | x) p(y | z, w)`` with priors from the registry."""

    def __init__(
        self,
        data: MultiTaskData,
        cfg: Mapping[str, Any],
        state: TrainState,
        encoder: GaussianEncoder,
        w_post: torch.nn.Module,
        device: torch.device,
    ):
        info = data.info.to(device)
        super().__init__(info, state, cfg["kl_weight"], cfg["kl_weights"])
        self.encoder = encoder
        self.w_post = w_post
        self.latent_dim = cfg["latent_dim"]
        self.shared_z = info.simo and not cfg["per_task_encoder"]
        self.z_prior = PriorSite("z", cfg["priors"]["z"], device=device)
        self.w_prior = PriorSite("w", cfg["priors"]["w"], device=device)
        # PyroModule stores a PyroParam as a parameter: reading it gives the tensor
        self.bias: torch.Tensor = PyroParam(torch.zeros(info.num_tasks, 1, info.out_dim, device=device))  # type: ignore[assignment]

    def plates(self, batch: Batch) -> Plates:
        return Plates(batch)

    def z_components(self, batch: Batch):
        """Mixture components for the prior of ``z``; the baselines' priors need none."""
        return None

    def z_prior_inputs(self, batch: Batch) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, dict[str, Any]]:
        """``(components, extras)`` for the build of z's prior: :meth:`z_components` and no extras."""
        return self.z_components(batch), {}

    def w_components(self):
        return None

    def sample_w(self, plates: Plates) -> torch.Tensor:
        """``w [..., T, 1, K, d]``, one per task."""
        T, K, d = self.info.num_tasks, self.info.out_dim, self.latent_dim
        # components first: parameter reads inside scale handlers each cost a device op
        components = self.w_components()
        with plates.globals(), self.kl_scope("w"):
            prior = self.w_prior.build(
                batch_shape=(T, 1),
                event_shape=(K, d),
                num_tasks=T,
                state=self.state,
                components=components,
                task_axis=-2,
            )
            return pyro.sample("w", prior)

    def sample_z(self, batch: Batch, plates: Plates) -> torch.Tensor:
        """``z [..., T|1, B, d]``, one per sample."""
        rows = 1 if self.shared_z else batch.num_tasks
        components, extras = self.z_prior_inputs(batch)
        with plates.locals(shared=self.shared_z), self.kl_scope("z"):
            prior = self.z_prior.build(
                batch_shape=(rows, batch.size),
                event_shape=(self.latent_dim,),
                num_tasks=batch.num_tasks,
                state=self.state,
                components=components,
                task_axis=-2,
                extras=extras,
            )
            return pyro.sample("z", prior)

    def head(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Head outputs ``[..., T, B, K]`` of ``z [..., T|1, B, d]`` and ``w [..., T, 1, K, d]``."""
        return torch.matmul(z, w.squeeze(-3).transpose(-1, -2)) + self.bias

    def forward(self, batch: Batch) -> None:
        plates = self.plates(batch)
        w = self.sample_w(plates)
        z = self.sample_z(batch, plates)
        outputs = self.head(z, w)
        with plates.observations():
            self.observe(outputs, batch)


@dataclass
class LatentOptions(NetworkOptions):
    """Options of the baseline family (and VMTL's, which extends them)."""

    per_task_encoder: bool = False
    #: Per-site KL multipliers (a tempered posterior: the likelihood keeps weight 1).
    kl_weights: dict[str, float] = field(default_factory=lambda: {"z": 1.0, "w": 1.0})


def build_latent(ctx: MethodContext) -> tuple[LatentMTLModel, LatentMTLGuide]:
    """Model and guide of the baseline family; they share the encoder and ``q(w)``."""
    data, cfg, state, device = ctx.data, ctx.config, ctx.state, ctx.device
    info = data.info
    # the input shape, not its size: the cnn and the user's backbones take [C, H, W]
    encoder = GaussianEncoder(
        info.num_tasks,
        info.input_shape,
        cfg["hidden"],
        cfg["latent_dim"],
        cfg["activation"],
        per_task=cfg["per_task_encoder"],
        backbone=ctx.backbone,
    ).to(device)
    w_post = ClassifierPosterior(info.num_tasks, info.out_dim, cfg["latent_dim"]).to(device)
    model = LatentMTLModel(data, cfg, state, encoder, w_post, device)
    guide = LatentMTLGuide(data, cfg, state, encoder, w_post, device)
    return model, guide


def _classifier_draws(ctx: MethodContext, n: int) -> torch.Tensor:
    """``n`` draws of ``q(w)``, ``[n, T, K, d]``; NaN where a task lacks the class (heads are padded)."""
    model, guide = ctx.model, ctx.guide
    loc, scale = guide.w_post()
    loc, scale = loc.squeeze(1), scale.squeeze(1)
    w = loc.expand(n, *loc.shape) if guide.point_w else loc + scale * torch.randn(n, *loc.shape, device=loc.device)
    return w.masked_fill(~model.info.class_mask[None, :, :, None], float("nan"))


def _classifier_coords(data: MultiTaskData, shape: tuple[int, ...]) -> dict[str, Any]:
    """Class names where the dataset has one per head output, else ``0..K-1``; latent dims by index."""
    K, d = shape[-2:]
    names = data.class_names
    return {
        "class": list(names) if names is not None and len(names) == K else list(range(K)),
        "latent_dim": np.arange(d),
    }


#: The classifier ``w``, exported by every method of this family and by VMTL.
CLASSIFIER_EXPORT = ExportSite("w", ("task", "class", "latent_dim"), _classifier_draws, _classifier_coords)
