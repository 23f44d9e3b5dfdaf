"""Predict a whole split and score it, per task, with :mod:`pyromtl.metrics`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pyromtl import metrics
from pyromtl.data.core import MultiTaskData
from pyromtl.predict import draw, mean_prediction


@dataclass
class SplitPrediction:
    """Predictions of one split, on the original target scale.

    ``pred[t]`` is ``[N_t, C]`` class probabilities (classification), ``[N_t]`` ``P(y=1)``
    (binary) or ``[N_t]`` predictive means (regression); ``y[t]`` the targets. ``loglik``
    ``[D, T, N]`` and ``mask [T, N]`` hold per-draw pointwise log-likelihoods (padded).
    """

    pred: list[np.ndarray]
    y: list[np.ndarray]
    loglik: np.ndarray
    mask: np.ndarray
    sites: dict[str, np.ndarray]


@torch.no_grad()
def predict_split(model, guide, data: MultiTaskData, split: str, *, num_samples: int, max_plate_nesting: int,
                  device: torch.device, keep: tuple[str, ...] = ()) -> SplitPrediction:
    info = model.info
    probs, ys, lls, masks, sites = [], [], [], [], {k: [] for k in keep}
    for batch in data.eval_batches(split, device):
        d = draw(model, guide, batch, num_samples, max_plate_nesting, keep)
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
    keep_sites = {k: torch.cat(v, -1).cpu().numpy() if v[0].dim() else v[0].cpu().numpy() for k, v in sites.items() if v}
    return SplitPrediction(pred=pred_t, y=y_t, loglik=torch.cat(lls, -1).cpu().numpy(), mask=mask, sites=keep_sites)


def score_prediction(data: MultiTaskData, sp: SplitPrediction) -> dict:
    """``{"tasks": {name: {metric: value}}, "average": {metric: mean}}`` (metrics.json shape)."""
    tasks = {
        name: metrics.task_metrics(kind, sp.pred[t], sp.y[t])
        for t, (name, kind) in enumerate(zip(data.task_names, data.task_types))
    }
    return {"tasks": tasks, "average": metrics.average(tasks)}
