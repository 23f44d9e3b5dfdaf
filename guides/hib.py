"""Guides of HIB, compressed hierarchical representations (Machado de Freitas et al., IJCNN 2022),
and of its baseline MTVIB (:class:`MTVIBGuide`).

The guide is the noise channel of eq. 1: ``W_j = Z + N_j`` with ``Z = f_θ(X)`` a deterministic
shared encoder and ``N_j ~ N(0, diag σ_j²)``, so ``q(W_j | x) = N(f_θ(x), diag σ_j²)``. The log
variances ``log σ_j²`` (``[T, D]``) are one set per task, shared by every sample. All tasks are
drawn at once: ``W`` is ``[T, B, D]`` under the ``task`` and ``data`` plates.

Variants (options and prior choices, see ``models/hib.py``):

* a ``deterministic`` prior of ``w`` gives ``W_j = Z`` (a point mass: the paper's "no noise" row);
* ``noise = "fixed"`` holds ``σ_j² = fixed_noise_var`` (``e`` by default, Table V); with
  ``release_noise_at = k`` the encoder is frozen from step k on and σ_j is learned from there
  (the second stage of Table V's ablation);
* ``predict_w = "mean"`` predicts from ``W_j = Z`` outside training instead of sampling the channel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.poutine.mask_messenger import MaskMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.scale_messenger import ScaleMessenger
from torch import nn

from pyromtl.base import Handlers, MultiTaskModule, Plates, is_point, kl_weighted
from pyromtl.data.core import Batch, MultiTaskData
from pyromtl.distributions import DiagNormal
from pyromtl.nn import GaussianEncoder
from pyromtl.schedules import TrainState

#: Values of the ``noise`` option: σ_j learned from the start, or held at ``fixed_noise_var``.
NOISE_MODES = ("learned", "fixed")
#: Values of the ``predict_w`` option: sample the channel at test time (§III-D) or use its mean.
PREDICT_MODES = ("sample", "mean")


def task_betas(data: MultiTaskData, beta: float, task_beta: dict[str, float]) -> torch.Tensor:
    """β_j of eq. 2 as a ``[T, 1]`` tensor: ``beta`` for every task, ``task_beta`` overriding by name."""
    if unknown := sorted(set(task_beta) - set(data.task_names)):
        raise ValueError(
            f"config key 'task_beta' names unknown task(s) {unknown}; the tasks of "
            f"{data.name!r} are {list(data.task_names)}"
        )
    return torch.tensor([[task_beta.get(name, beta)] for name in data.task_names], dtype=torch.get_default_dtype())


class ChannelScale(MultiTaskModule):
    """Scales the channel site ``w`` by β_j per task (eq. 2) in both model and guide.

    ``TraceMeanField_ELBO`` reads an analytic KL's scale from the guide site, and the model
    needs the same scale for its Monte-Carlo fallback, so both wrap ``w`` in :meth:`beta_scope`.
    """

    def __init__(self, data: MultiTaskData, cfg: Mapping[str, Any], state: TrainState, device: torch.device):
        super().__init__(data.info.to(device), state, cfg["kl_weight"])
        betas = task_betas(data, cfg["beta"], cfg["task_beta"]).to(device)
        # One β for all tasks scales by a float: a tensor scale costs a device op per site and step.
        self.shared_beta = float(betas[0, 0]) if bool((betas == betas[0, 0]).all()) else None
        self.register_buffer("betas", betas, persistent=False)

    def beta_scope(self) -> Messenger | Handlers:
        """β_j times the annealed ``kl_weight`` (a handler to enter with ``with``); a zero weight
        masks the KL out (Pyro rejects a 0 scale)."""
        anneal = self.state.value(self.kl_weight)
        if self.shared_beta is not None:
            return kl_weighted(anneal * self.shared_beta)
        weight = anneal * self.betas
        positive = weight > 0
        return Handlers(ScaleMessenger(torch.where(positive, weight, torch.ones_like(weight))), MaskMessenger(positive))


class HIBGuide(ChannelScale):
    """``q(W_j | x) = N(f_θ(x), diag σ_j²)`` for every task j at once (eq. 1)."""

    def __init__(
        self, data: MultiTaskData, cfg: Mapping[str, Any], state: TrainState, encoder: nn.Module, device: torch.device
    ):
        super().__init__(data, cfg, state, device)
        for key, allowed in (("noise", NOISE_MODES), ("predict_w", PREDICT_MODES)):
            if cfg[key] not in allowed:
                raise ValueError(f"config key {key!r} must be one of {list(allowed)}, got {cfg[key]!r}")
        if cfg["fixed_noise_var"] <= 0:
            raise ValueError(f"config key 'fixed_noise_var' must be > 0, got {cfg['fixed_noise_var']}")
        self.encoder = encoder
        self.point = is_point(cfg["priors"]["w"])
        self.fixed = cfg["noise"] == "fixed"
        self.release_at = cfg["release_noise_at"]
        self.predict_mean = cfg["predict_w"] == "mean"
        T, D = data.num_tasks, cfg["latent_dim"]
        self.register_buffer(
            "fixed_log_var", torch.full((T, D), math.log(cfg["fixed_noise_var"]), device=device), persistent=False
        )
        # The authors start log σ² at 0.01·N(0, 1) (σ² ≈ 1); a released fixed channel starts where it was held.
        init = self.fixed_log_var.clone() if self.fixed else cfg["init_log_var_std"] * torch.randn(T, D, device=device)
        self.log_var = torch.nn.Parameter(init)

    def released(self) -> bool:
        """Whether Table V's second stage runs: σ_j learned on a frozen encoder."""
        return self.fixed and 0 < self.release_at <= self.state.step

    def channel_log_var(self) -> torch.Tensor:
        """``log σ_j²``, ``[T, D]``: the learned parameter, or the fixed value while it is held."""
        return self.fixed_log_var if self.fixed and not self.released() else self.log_var

    def represent(self, batch: Batch) -> torch.Tensor:
        """``Z = f_θ(x)``: ``[1, B, D]`` for SIMO inputs, ``[T, B, D]`` for MIMO ones."""
        z = self.encoder(batch.x)
        z = z.unsqueeze(-3) if batch.simo else z
        return z.detach() if self.released() else z

    def forward(self, batch: Batch) -> None:
        z = self.represent(batch)
        plates = Plates(batch)
        if self.point or (self.predict_mean and batch.split != "train"):
            channel = dist.Delta(z.expand(batch.num_tasks, batch.size, z.shape[-1]), event_dim=1)
        else:
            # z [1, B, D] and σ [T, 1, D] stay compact: the KL's variance terms are then [T, D].
            channel = DiagNormal(z, torch.exp(0.5 * self.channel_log_var()).unsqueeze(-2))
        with plates.locals(), self.beta_scope():
            pyro.sample("w", channel)


class MTVIBGuide(MultiTaskModule):
    """MTVIB's ``q(Z | x) = N(μ(x), diag σ²(x))``: one stochastic representation for all tasks.

    The paper's baseline (§V-A): a variational information bottleneck on the shared ``Z``
    (no per-task channels), its KL to ``N(0, I)`` weighted by ``beta``.
    """

    def __init__(
        self,
        data: MultiTaskData,
        cfg: Mapping[str, Any],
        state: TrainState,
        encoder: GaussianEncoder,
        device: torch.device,
    ):
        super().__init__(data.info.to(device), state, cfg["kl_weight"], {"z": cfg["beta"]})
        self.encoder = encoder

    def forward(self, batch: Batch) -> None:
        loc, scale = self.encoder(batch.x, batch.simo)
        with Plates(batch).locals(shared=batch.simo), self.kl_scope("z"):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))
