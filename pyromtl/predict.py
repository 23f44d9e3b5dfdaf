"""Posterior predictive draws for any pyromtl model + guide.

The guide is traced once under an outer vectorising plate of ``num_samples`` draws and the
model replayed against it, so every draw is computed in one batched pass (no Python loop
over draws or tasks). Inner Monte-Carlo plates of a model (VMTL's L x M) become extra draws.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine

from pyromtl.data.core import Batch, TaskInfo
from pyromtl.likelihoods import predictive_probs


@dataclass
class Draws:
    """Per-draw model quantities for one batch.

    ``outputs [D, T, B, K]`` (head outputs), ``loglik [D, T, B]`` (log p(y | draw)),
    ``sites`` holds other sampled or deterministic values by name, each ``[D, ...]``.
    """

    outputs: torch.Tensor
    loglik: torch.Tensor
    sites: dict[str, torch.Tensor]


def _flat(value: torch.Tensor, tail: int) -> torch.Tensor:
    """Fold every leading (draw or Monte-Carlo) dimension into one: ``[..., *tail] -> [D, *tail]``."""
    return value.reshape(-1, *value.shape[value.dim() - tail :]) if value.dim() > tail else value.unsqueeze(0)


@contextmanager
def evaluating(*modules: torch.nn.Module) -> Iterator[None]:
    """``modules`` in eval mode (BatchNorm reads its running statistics and updates none), then
    back in the mode each was in."""
    modes = [[(m, m.training) for m in module.modules()] for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in (pair for pairs in modes for pair in pairs):
            m.training = training


@torch.no_grad()
def draw(model, guide, batch: Batch, num_samples: int, max_plate_nesting: int, keep: tuple[str, ...] = ()) -> Draws:
    """Trace ``num_samples`` posterior draws of the guide and replay the model on ``batch`` (in eval mode)."""
    with evaluating(model, guide), pyro.plate("_draws", num_samples, dim=-(max_plate_nesting + 1)):
        guide_tr = poutine.trace(guide).get_trace(batch)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(batch)
    _T, _B = batch.y.shape
    outputs = model_tr.nodes["outputs"]["value"]
    loglik = model_tr.nodes["y"]["fn"].log_prob(batch.y)
    shape = torch.broadcast_shapes(outputs.shape[:-1], loglik.shape)
    outputs = _flat(outputs.expand(*shape, outputs.shape[-1]), 3)
    loglik = _flat(loglik.expand(shape), 2)
    sites = {}
    for name in keep:
        for tr in (model_tr, guide_tr):
            if name in tr.nodes:
                sites[name] = tr.nodes[name]["value"]
                break
    return Draws(outputs=outputs, loglik=loglik, sites=sites)


def mean_prediction(outputs: torch.Tensor, info: TaskInfo) -> torch.Tensor:
    """Monte-Carlo predictive ``[T, B, K]``: probabilities averaged over draws (VMTL eq. 12)."""
    return predictive_probs(outputs, info).mean(0)
