"""Predict a whole split and score it, per task, with :mod:`pyromtl.metrics`.

One prediction of a split is what both the run's metrics and its ArviZ export read, so the two
come from the same posterior draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pyromtl import metrics
from pyromtl.data.core import MultiTaskData
from pyromtl.likelihoods import MultiTaskOutput
from pyromtl.predict import draw, mean_prediction


@dataclass
class SplitPrediction:
    """Predictions of one split, on the original target scale.

    ``pred[t]`` is ``[N_t, C]`` class probabilities (classification), ``[N_t]`` ``P(y=1)``
    (binary) or ``[N_t]`` predictive means (regression); ``y[t]`` the targets. ``loglik``
    ``[D, T, N]`` and ``mask [T, N]`` hold per-draw pointwise log-likelihoods (padded); ``y_rep``
    ``[D, T, N]`` a replicated target per draw (standardised, padded) when asked for.
    """

    pred: list[np.ndarray]
    y: list[np.ndarray]
    loglik: np.ndarray
    mask: np.ndarray
    sites: dict[str, np.ndarray]
    y_rep: np.ndarray | None = None


@torch.no_grad()
def predict_split(
    model,
    guide,
    data: MultiTaskData,
    split: str,
    *,
    num_samples: int,
    max_plate_nesting: int,
    device: torch.device,
    keep: tuple[str, ...] = (),
    replicate: bool = False,
) -> SplitPrediction:
    """Posterior predictive of ``split`` from ``num_samples`` draws per batch (and the sites in ``keep``).

    ``replicate`` also draws ``y_rep`` from each draw's likelihood. Those draws take a fork of
    the RNG, so the predictions are the same with or without them.
    """
    info = model.info
    probs, ys, lls, masks, reps = [], [], [], [], []
    sites: dict[str, list[torch.Tensor]] = {k: [] for k in keep}
    for batch in data.eval_batches(split, device):
        d = draw(model, guide, batch, num_samples, max_plate_nesting, keep)
        if replicate:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                reps.append(MultiTaskOutput(d.outputs, info, model.noise).sample())
        probs.append(mean_prediction(d.outputs, info))
        ys.append(batch.y)
        lls.append(d.loglik)
        masks.append(batch.mask)
        for k, v in d.sites.items():
            sites[k].append(v)
    prob = torch.cat(probs, 1).cpu().numpy()
    y = torch.cat(ys, 1).cpu().numpy()
    mask = torch.cat(masks, 1).cpu().numpy()
    pred_t, y_t = [], []
    for t, kind in enumerate(data.task_types):
        m = mask[t]
        if kind == "classification":
            pred_t.append(prob[t, m, : data.num_classes[t]])
            y_t.append(y[t, m].astype(np.int64))
        elif kind == "binary":
            pred_t.append(prob[t, m, 0])
            y_t.append(y[t, m].astype(np.int64))
        else:
            mean, std = data.target_stats[t]
            pred_t.append(prob[t, m, 0] * std + mean)
            y_t.append(y[t, m] * std + mean)
    keep_sites = {
        k: torch.cat(v, -1).cpu().numpy() if v[0].dim() else v[0].cpu().numpy() for k, v in sites.items() if v
    }
    y_rep = torch.cat(reps, -1).cpu().numpy() if replicate else None
    return SplitPrediction(
        pred=pred_t, y=y_t, loglik=torch.cat(lls, -1).cpu().numpy(), mask=mask, sites=keep_sites, y_rep=y_rep
    )


def score_prediction(data: MultiTaskData, sp: SplitPrediction) -> dict:
    """``{"tasks": {name: {metric: value}}, "average": {metric: mean}}`` (metrics.json shape)."""
    tasks = {
        name: metrics.task_metrics(kind, sp.pred[t], sp.y[t])
        for t, (name, kind) in enumerate(zip(data.task_names, data.task_types))
    }
    return {"tasks": tasks, "average": metrics.average(tasks)}
