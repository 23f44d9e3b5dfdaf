"""Guide of ``cross-stitch`` (``models/cross_stitch.py``): every parameter is a point estimate
held by the model, so the guide samples nothing and the ELBO is the log-likelihood."""

from __future__ import annotations

import torch

from pyromtl.base import MultiTaskModule
from pyromtl.data.core import Batch, MultiTaskData
from pyromtl.schedules import TrainState


class EmptyGuide(MultiTaskModule):
    """A guide with no latent sites."""

    def __init__(self, data: MultiTaskData, state: TrainState, device: torch.device):
        super().__init__(data.info.to(device), state)

    def forward(self, batch: Batch) -> None:
        return None
