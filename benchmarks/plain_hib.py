"""HIB's training step written in plain PyTorch (no Pyro) the way the authors' code is organised,
as the speed reference for ``hib_step.py``.

The objective is ``hib``'s (models/hib.py, guides/hib.py), term by term:

* ``Z = f_θ(x)``, an MLP shared by the tasks (§III-A);
* per task j, one draw ``W_j = Z + ε σ_j`` with ``log σ_j²`` a learned ``[D]`` vector (eq. 1);
* task j's head ``c_ψ,j`` (a linear layer) and its cross-entropy, summed over the batch (eq. 3);
* ``β_j`` times the KL of eq. 7-8 (with the Gaussian KL's ½) to the learned marginal
  ``N(0, diag ξ_j²)``, summed over the batch.

As in the authors' code (``../shared/papers/README.md``), every per-task piece is a Python loop
over the tasks: a noise draw, a head, a KL and a loss each. pyromtl's step differs only in how
the sums are scaled (means over the training set instead of sums over a batch): the same
arithmetic per task, so the same amount of work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PlainHIB(nn.Module):
    """The shared encoder, T noise channels, T linear heads and T marginals, as separate modules.

    Args:
        num_tasks: T.
        input_dim: flattened input size.
        hidden: hidden layer widths of the encoder.
        latent_dim: D.
        num_classes: classes per task.
        beta: β_j for every task.
    """

    def __init__(
        self, num_tasks: int, input_dim: int, hidden: list[int], latent_dim: int, num_classes: int, beta: float
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, latent_dim))
        self.encoder = nn.Sequential(*layers)
        self.log_var = nn.ParameterList(nn.Parameter(0.01 * torch.randn(latent_dim)) for _ in range(num_tasks))
        self.prior_log_var = nn.ParameterList(nn.Parameter(torch.zeros(latent_dim)) for _ in range(num_tasks))
        self.heads = nn.ModuleList(nn.Linear(latent_dim, num_classes) for _ in range(num_tasks))
        self.beta = beta

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of one batch: ``x`` ``[B, input_dim]``, ``y`` ``[T, B]`` class labels."""
        z = self.encoder(x)
        total = z.new_zeros(())
        for j, head in enumerate(self.heads):
            log_var, prior_log_var = self.log_var[j], self.prior_log_var[j]
            w = z + torch.randn_like(z) * torch.exp(0.5 * log_var)
            total = total + F.cross_entropy(head(w), y[j], reduction="sum")
            kl = 0.5 * (prior_log_var - log_var + (torch.exp(log_var) + z.square()) / torch.exp(prior_log_var) - 1.0)
            total = total + self.beta * kl.sum()
        return total


def plain_step(model: PlainHIB, optim: torch.optim.Optimizer):
    """One training step of ``model``: zero the gradients, the loss, ``backward()``, the optimiser."""

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        optim.zero_grad(set_to_none=True)
        model.loss(*batch).backward()
        optim.step()

    return step
