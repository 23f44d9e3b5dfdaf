"""ArviZ export: :func:`to_datatree` builds an ArviZ (>= 1.0) DataTree with one chain of D draws.

* ``posterior``: the sites the method declares (``Method.export``; e.g. the classifier ``w``
  ``(chain, draw, task, class, latent_dim)`` and VMTL's mixing weights ``(chain, draw, task,
  other_task)``), plus ``noise`` ``(chain, draw, regression_task)``: the
  regression noise scale on the target's original scale, a point estimate repeated over the draws.
  Each declared site draws its D values in one vectorised call.
* ``posterior_predictive``, ``log_likelihood``, ``observed_data``: ``y`` over one ``obs`` dim
  that stacks the valid (task, sample) pairs of the split, task by task, so nothing is padded
  and ``az.loo`` sees a single observation dim. The coordinates ``task`` (its name) and
  ``row`` (its index into the task's arrays) label each obs. Regression targets, draws and
  log-likelihoods are on the original target scale.
* ``relatedness``: ``Fit.relatedness()`` ``(task, other_task)``.

Methods with inner Monte-Carlo plates (VMTL's L x M draws of z and w per model pass) give
L·M joint draws per pass: each is a draw of the DataTree, so D draws take ``ceil(D / (L M))``
passes (the inner draws of one pass share their z and w draws crosswise, so they are
correlated, as MCMC draws are).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from pyromtl.data.core import Batch
from pyromtl.likelihoods import MultiTaskOutput
from pyromtl.params import local_params
from pyromtl.predict import draw

#: Default number of draws: PSIS-LOO fits a tail to the top 20% of the draws and needs ≥ 5 there.
MIN_DRAWS = 100
#: Head outputs held by one vectorised pass over draws (64 MiB of float32), which bounds memory.
CHUNK_ELEMENTS = 2**24
#: The groups whose ``y`` runs over the stacked ``obs`` dim.
OBS_GROUPS = ("posterior_predictive", "log_likelihood", "observed_data")


def _draw_chunk(fit, batch: Batch, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``loglik [n I, T, B]`` and ``y_rep [n I, T, B]`` from ``n`` model passes of I inner draws each."""
    d = draw(fit.model, fit.guide, batch, n, fit.method.max_plate_nesting)
    y_rep = MultiTaskOutput(d.outputs, fit.model.info, fit.model.noise).sample()
    return d.loglik, y_rep


@local_params
@torch.no_grad()
def _draw_split(fit, split: str, num_samples: int):
    """``loglik [D, T, N]``, ``y_rep [D, T, N]`` (standardised), ``y [T, N]``, ``mask [T, N]`` and the
    declared sites' draws.

    Vectorised over model passes, in chunks that hold about :data:`CHUNK_ELEMENTS` outputs.
    """
    batches = list(fit.data.eval_batches(split, fit.device))
    device = [fit.device] if fit.device.type == "cuda" else []
    with torch.random.fork_rng(devices=device):
        torch.manual_seed(fit.config["seed"])
        lls, reps = [], []

        def passes(n: int) -> int:
            parts = [_draw_chunk(fit, b, n) for b in batches]
            lls.append(torch.cat([p[0] for p in parts], -1))
            reps.append(torch.cat([p[1] for p in parts], -1))
            return lls[-1].shape[0] // n

        inner = passes(1)  # the first pass tells how many draws a pass gives
        total = math.ceil(num_samples / inner)
        chunk = max(1, CHUNK_ELEMENTS // (inner * max(b.y.numel() for b in batches) * fit.model.info.out_dim))
        for start in range(1, total, chunk):
            passes(min(chunk, total - start))
        posterior = _draw_sites(fit, num_samples)
    y = torch.cat([b.y for b in batches], 1).cpu().numpy()
    mask = torch.cat([b.mask for b in batches], 1).cpu().numpy()
    loglik, y_rep = torch.cat(lls)[:num_samples], torch.cat(reps)[:num_samples]
    return loglik.cpu().numpy(), y_rep.cpu().numpy(), y, mask, posterior


def _draw_sites(fit, num_samples: int) -> dict[str, np.ndarray]:
    """``[D, ...]`` draws of every site the method exports (those its configuration has)."""
    out = {}
    for site in fit.method.export:
        values = site.draw(fit.model, fit.guide, num_samples)
        if values is not None:
            out[site.name] = values.cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
    return out


def _target_scale(data) -> tuple[np.ndarray, np.ndarray]:
    """Per-task ``(mean, std)`` that map standardised targets back (``(0, 1)`` for labels)."""
    stats = np.asarray(data.target_stats, dtype=np.float64)
    return stats[:, 0], stats[:, 1]


def _posterior(fit, sites: dict[str, np.ndarray], num_samples: int):
    """Posterior variables ``[1, D, ...]``, their dims and the extra coords they need."""
    data = fit.data
    post: dict[str, np.ndarray] = {}
    dims: dict[str, list[str]] = {}
    coords: dict[str, Any] = {}
    declared = {s.name: s for s in fit.method.export}
    for name, values in sites.items():
        site = declared[name]
        post[name] = values[None]
        dims[name] = list(site.dims)
        if site.coords is not None:
            coords.update(site.coords(data, values.shape[1:]))
    reg = [t for t, kind in enumerate(data.task_types) if kind == "regression"]
    if reg:
        _, std = _target_scale(data)
        noise = (fit.model.noise.detach().cpu().numpy() * std)[reg]
        post["noise"] = np.broadcast_to(noise, (1, num_samples, len(reg))).copy()
        dims["noise"] = ["regression_task"]
        coords["regression_task"] = [data.task_names[t] for t in reg]
    return post, dims, coords


def _stack_obs(fit, loglik, y_rep, y, mask, split: str):
    """``y`` of the three obs groups on the stacked ``obs`` dim, and the per-obs coordinates."""
    t_idx, n_idx = np.nonzero(mask)  # task-major, in split order within a task
    mean, std = _target_scale(fit.data)
    mean, std = mean[t_idx], std[t_idx]
    groups = {
        "posterior_predictive": (y_rep[:, t_idx, n_idx] * std + mean)[None],
        # a density on the original scale: log p(y) = log p(y_std) - log std
        "log_likelihood": (loglik[:, t_idx, n_idx] - np.log(std))[None],
        "observed_data": y[t_idx, n_idx] * std + mean,
    }
    # valid entries are each task's first N_t positions, so the split's indices line up with them
    rows = np.concatenate([idx.cpu().numpy() for idx in fit.data.splits[split]]).astype(np.int64)
    names = np.array(fit.data.task_names)[t_idx]
    return groups, {"task": ("obs", names), "row": ("obs", rows)}


def to_datatree(fit, num_samples: int | None = None, split: str = "test"):
    """Export ``fit`` to an ArviZ DataTree (layout in the module docstring).

    ``num_samples`` draws (default ``max(eval_samples, MIN_DRAWS)``, enough for PSIS-LOO) of the
    posterior and of the predictive on ``split``.
    """
    import arviz as az
    import xarray as xr

    D = num_samples or max(int(fit.config["eval_samples"]), MIN_DRAWS)
    loglik, y_rep, y, mask, sites = _draw_split(fit, split, D)
    post, dims, coords = _posterior(fit, sites, D)
    obs, obs_coords = _stack_obs(fit, loglik, y_rep, y, mask, split)
    names = list(fit.data.task_names)
    tree = az.from_dict(
        {"posterior": post, **{g: {"y": v} for g, v in obs.items()}},
        dims={**dims, "y": ["obs"]},
        coords={"task": names, "other_task": names, **coords},
        attrs={"/": {"method": fit.method.name, "dataset": fit.data.name, "split": split, "draws": D}},
    )
    for group in OBS_GROUPS:
        tree[group] = tree[group].to_dataset().assign_coords(obs_coords)
    if not post:
        # No site to export (e.g. cross-stitch on classification): the group still carries the
        # sample dims, which PSIS-LOO reads to count chains and draws.
        tree["posterior"] = xr.Dataset(coords={"chain": [0], "draw": np.arange(D)})
    rel = fit.relatedness()
    if rel:
        tree["relatedness"] = xr.Dataset({k: (("task", "other_task"), np.asarray(v)) for k, v in rel.items()},
                                         coords={"task": names, "other_task": names})
    return tree
