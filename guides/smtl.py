"""Guide of the SMTL family (``models/smtl.py``).

Every SMTL parameter is a point estimate held by the model; the lite gates are random but
recorded as ``pyro.deterministic`` sites of those parameters, not latents. So by default the
guide samples nothing and the ELBO is the log-likelihood of eq. 2. Under a non-deterministic
gate prior (``priors.gate``) the gate is a latent site, and the guide draws it from
``q(g_t)``, the model's relaxed gate (eq. 4) at the model's logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import pyro
import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin

from pyromtl.base import MultiTaskModule, Plates, is_point
from pyromtl.data.core import Batch, MultiTaskData
from pyromtl.schedules import TrainState


class _GatedModel(Protocol):
    """What the guide reads of its model, ``models/smtl.py``'s ``SMTLModel`` (which imports this module)."""

    @property
    def gate_logit(self) -> torch.Tensor: ...

    def gate_distribution(self, logits: torch.Tensor) -> TorchDistributionMixin: ...


class GateGuide(MultiTaskModule):
    """``q(g) = prod_t RelaxedBernoulli[StraightThrough](τ, logits=logit_t)`` for a Bayesian gate; else empty."""

    def __init__(
        self,
        data: MultiTaskData,
        cfg: Mapping[str, Any],
        state: TrainState,
        model: _GatedModel,
        device: torch.device,
    ):
        super().__init__(data.info.to(device), state, cfg["kl_weight"])
        self.bayesian = not is_point(cfg["priors"]["gate"])
        # the gate module is shared, as the baselines share their encoder: its logits are q's parameters
        self.gates = [model]  # a list: the model's parameters belong to the model, not twice to the ELBO

    def forward(self, batch: Batch) -> None:
        if not self.bayesian:
            return
        model = self.gates[0]
        with Plates(batch).globals(), self.kl_scope("gate"):
            pyro.sample("gate", model.gate_distribution(model.gate_logit[:, None]))
