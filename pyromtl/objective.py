"""The objective hook: what the trainer calls every step, and at every epoch's end.

The default :class:`Objective` is the method's ELBO plus ``backward()``. A method whose paper
does more than that supplies its own subclass through ``Method.objective``:

* :meth:`Objective.backward` may set the gradients itself, e.g. push an aggregated gradient into
  a shared representation with ``h.backward(g)`` (BayesAgg-MTL) or call torchjd's
  ``mtl_backward`` (the gradient-weighting baselines);
* :meth:`Objective.after_step` runs after each optimiser step (e.g. a second optimiser over
  gates on a validation batch, SMTL's bi-level variant);
* :meth:`Objective.end_epoch` runs at every epoch's end (e.g. a full-data prior);
* parameters listed by :meth:`Objective.own_parameters` are left out of the trainer's optimiser,
  so the objective can update them with optimisers of its own. Checkpoint those optimisers (and
  any other state) through ``get_extra_state``/``set_extra_state``, the ``nn.Module`` hooks that
  put it into :meth:`~torch.nn.Module.state_dict`: a resumed run then continues exactly.

An objective is an ``nn.Module`` whose :meth:`~torch.nn.Module.state_dict` is what a checkpoint stores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pyromtl.data.core import Batch, MultiTaskData

if TYPE_CHECKING:
    from pyromtl.collective import Group


def is_finite(loss: torch.Tensor) -> bool:
    """Whether a scalar loss is finite: one copy to the host, where ``torch.isfinite`` costs four ops more.

    Args:
        loss: a one-element tensor.

    Returns:
        False for NaN or ±inf.

    Raises:
        RuntimeError: ``loss`` has more than one element.
    """
    return math.isfinite(loss.item())


@dataclass
class TrainContext:
    """What the trainer tells an objective's hooks: the run, and how far it has got.

    ``generator`` is the trainer's data RNG (checkpointed with the run), for hooks that draw
    batches. ``step`` counts the optimiser steps done, ``epoch`` the epochs done.
    """

    data: MultiTaskData
    cfg: Mapping[str, Any]
    device: torch.device
    generator: torch.Generator
    step: int = 0
    epoch: int = 0


class Objective(torch.nn.Module):
    """The method's ELBO (an ``ELBOModule`` holding the model and guide) and ``backward()``.

    Args:
        loss: the ELBO module, called with a batch; it has ``model`` and ``guide``.
    """

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss
        #: The processes of a run on several devices (:mod:`pyromtl.distributed`), set by the
        #: trainer; None on one. The batches an objective gets are then this process's shards,
        #: and a step that is not linear in the examples all-reduces what it needs through it.
        self.group: Group | None = None

    @property
    def model(self):
        """The loss module's model."""
        return self.loss.model

    @property
    def guide(self):
        """The loss module's guide."""
        return self.loss.guide

    def forward(self, batch: Batch) -> torch.Tensor:
        """The loss of ``batch`` (a differentiable tensor).

        Args:
            batch: a training batch.

        Returns:
            The scalar loss.
        """
        return self.loss(batch)

    def backward(self, batch: Batch) -> torch.Tensor:
        """Set the gradients of one training step; return the (detached) loss.

        The trainer stops on a NaN or infinite loss before its optimiser steps; such a loss is
        not back-propagated.

        Args:
            batch: a training batch.

        Returns:
            The scalar loss, detached.
        """
        loss = self.loss(batch)
        if is_finite(loss):
            loss.backward()
        return loss.detach()

    def own_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters this objective optimises itself (none by default)."""
        return []

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters of the trainer's optimiser: all of them but :meth:`own_parameters` and the
        frozen ones (``requires_grad=False``, e.g. a pretrained backbone's)."""
        own = {id(p) for p in self.own_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in own]

    def diagnostics(self) -> dict[str, float]:
        """Numbers the trainer logs beside the training loss in the run's history (default: none)."""
        return {}

    def after_step(self, ctx: TrainContext) -> None:
        """Runs after every optimiser step.

        Args:
            ctx: the run and its progress.
        """

    def end_epoch(self, ctx: TrainContext) -> None:
        """Runs at the end of every epoch (``ctx.epoch`` epochs done).

        Args:
            ctx: the run and its progress.
        """
