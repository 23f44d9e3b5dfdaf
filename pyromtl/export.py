"""ArviZ export: :func:`to_datatree` builds an ArviZ (>= 1.0) DataTree with one chain of D draws.

The draws are the fit's prediction of the split (``Fit.predict``), the very draws its metrics
come from: ``eval_samples`` model passes by default (raise it for PSIS-LOO, whose Pareto
diagnostics want a hundred draws or more).

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

A *point estimate* (every draw of every exported site and of the log-likelihood the same: ``stl``,
``bmtl``, the weighting baselines, ``bayesagg``, the SMTL variants with their deterministic gates,
``cross-stitch``) is exported as what it is: one draw in ``posterior`` and ``log_likelihood``
(``az.summary`` then reports it with no spurious r_hat warnings), the replicated ``y`` draws in
``posterior_predictive``, and the root attribute ``point_estimate = 1``. PSIS-LOO is undefined
for it (there is no posterior to leave an observation out of); ``pyromtl report`` says so and
gives the log predictive density.

Methods with inner Monte-Carlo plates (VMTL's L x M draws of z and w per model pass) give
L·M joint draws per pass: each is a draw of the DataTree, so n passes give D = n·L·M draws (the
inner draws of one pass share their z and w draws crosswise, so they are correlated, as MCMC
draws are).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from pyromtl.evaluation import SplitPrediction
from pyromtl.method import MethodContext

#: The groups whose ``y`` runs over the stacked ``obs`` dim.
OBS_GROUPS = ("posterior_predictive", "log_likelihood", "observed_data")


def _draw_sites(ctx: MethodContext, num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """``[D, ...]`` draws of every site the method exports (those its configuration has), seeded."""
    out = {}
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for site in ctx.method.export:
            values = site.draw(ctx, num_samples)
            if values is not None:
                out[site.name] = values.cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
    return out


def _prediction(fit, split: str, num_samples: int) -> SplitPrediction:
    """``num_samples`` draws of ``split``: the fewest model passes that give them (a pass of VMTL
    gives L·M), the surplus of the last pass dropped."""
    sp = fit.predict(split, math.ceil(num_samples / fit.draws_per_pass(split)))
    return replace(sp, loglik=sp.loglik[:num_samples], y_rep=sp.y_rep[:num_samples])


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


def _stack_obs(fit, sp: SplitPrediction, split: str):
    """``y`` of the three obs groups on the stacked ``obs`` dim, and the per-obs coordinates."""
    if sp.y_rep is None:  # the predictions an export makes draw them
        raise ValueError("the prediction has no replicated draws (y_rep); predict with replicate=True")
    t_idx, n_idx = np.nonzero(sp.mask)  # task-major, in split order within a task
    mean, std = _target_scale(fit.data)
    mean, std = mean[t_idx], std[t_idx]
    groups = {
        "posterior_predictive": (sp.y_rep[:, t_idx, n_idx] * std + mean)[None],
        # a density on the original scale: log p(y) = log p(y_std) - log std
        "log_likelihood": (sp.loglik[:, t_idx, n_idx] - np.log(std))[None],
        "observed_data": np.concatenate(sp.y).astype(np.float64),  # task-major, on the original scale
    }
    # valid entries are each task's first N_t positions, so the split's indices line up with them
    rows = np.concatenate([idx.cpu().numpy() for idx in fit.data.splits[split]]).astype(np.int64)
    names = np.array(fit.data.task_names)[t_idx]
    return groups, {"task": ("obs", names), "row": ("obs", rows)}


def _same_draws(*values: np.ndarray) -> bool:
    """Whether every array is the same along its first (draw) dim, NaN (a padded head) included;
    batched draws of one point may differ by float32 rounding, never by more."""
    for v in values:
        v = np.asarray(v, dtype=np.float64)
        finite = v[np.isfinite(v)]
        scale = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
        if v.shape[0] == 0 or not np.allclose(v, v[:1], rtol=0.0, atol=1e-6 * scale, equal_nan=True):
            return False
    return True


def to_datatree(fit, num_samples: int | None = None, split: str = "test"):
    """Export ``fit`` to an ArviZ DataTree (layout in the module docstring).

    By default the draws of the posterior and of the predictive on ``split`` are the ones the
    fit's metrics come from (``fit.predict(split)``); ``num_samples`` asks for that many draws
    instead (the fewest model passes that give them, the surplus of the last pass dropped).
    """
    import arviz as az
    import xarray as xr

    sp = fit.predict(split) if num_samples is None else _prediction(fit, split, num_samples)
    D = sp.loglik.shape[0]
    sites = _draw_sites(fit.context, D, int(fit.config["seed"]))
    point = _same_draws(sp.loglik, *sites.values())
    post, dims, coords = _posterior(fit, sites, D)
    obs, obs_coords = _stack_obs(fit, sp, split)
    if point:  # one draw of what does not vary
        post = {k: v[:, :1] for k, v in post.items()}
        obs["log_likelihood"] = obs["log_likelihood"][:, :1]
    names = list(fit.data.task_names)
    attrs = {
        "method": fit.method.name,
        "dataset": fit.data.name,
        "split": split,
        "draws": D,
        "point_estimate": int(point),
    }
    tree = az.from_dict(
        {"posterior": post, **{g: {"y": v} for g, v in obs.items()}},
        dims={**dims, "y": ["obs"]},
        coords={"task": names, "other_task": names, **coords},
        attrs={"/": attrs},
    )
    for group in OBS_GROUPS:
        tree[group] = tree[group].to_dataset().assign_coords(obs_coords)
    if not post:
        # No site to export (e.g. cross-stitch on classification): the group still carries the
        # sample dims, which PSIS-LOO reads to count chains and draws.
        tree["posterior"] = xr.Dataset(coords={"chain": [0], "draw": np.arange(1 if point else D)})
    rel = fit.relatedness()
    if rel:
        tree["relatedness"] = xr.Dataset(
            {k: (("task", "other_task"), np.asarray(v)) for k, v in rel.items()},
            coords={"task": names, "other_task": names},
        )
    return tree
