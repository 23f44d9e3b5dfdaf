"""Guide of the SMTL family (``models/smtl.py``): empty.

Every SMTL parameter, the gates included, is a point estimate held by the model; the lite
gates are random but recorded as ``pyro.deterministic`` sites of those parameters, not latents.
So the guide samples nothing and the ELBO is the log-likelihood of eq. 2.
"""

from __future__ import annotations

import torch

from pyromtl.base import MultiTaskModule, TrainState
from pyromtl.data.core import Batch, MultiTaskData


class PointGuide(MultiTaskModule):
    """A guide with no sample sites, for models whose every parameter is a point estimate."""

    def __init__(self, data: MultiTaskData, state: TrainState, device: torch.device):
        super().__init__(data.info.to(device), state)

    def forward(self, batch: Batch) -> None:
        return None
