"""Guide of BayesAgg-MTL (Achituve et al., ICML 2024): the heads' analytic posterior on a batch.

Every task ``t`` has a linear head ``θ_t`` over ``x = [h, 1]`` (bias last), stored class-major
as ``[K, d+1]`` and flattened to ``P = K(d+1)`` numbers, ``K`` the widest head of the dataset;
binary and regression tasks use row 0, a C-class task rows ``0..C-1``. The rows a task does not
use never meet data and keep their prior.

Given a training batch, the posterior of the used rows is computed in closed form, one batched
solve per group of tasks of one kind (regression, binary, C-class), never one per task:

* regression: the conjugate Gaussian posterior (eq. 2), noise τ = 1;
* classification: one Newton step from the learned heads ``θ̂`` with the generalised
  Gauss–Newton precision, keeping the first-order term (eq. 8–10).

Outside training (a batch of another split), the guide is a point mass at the prediction heads:
the full-data posterior mean for regression tasks (once an epoch has ended), ``θ̂`` otherwise;
or ``θ̂`` for every task (``predict = "learned"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from pyromtl.base import MultiTaskModule, Plates
from pyromtl.data.core import Batch, TaskInfo
from pyromtl.distributions import GaussianPrecision
from pyromtl.infer.bayesagg import Kind, add_bias, laplace_posterior, regression_posterior
from pyromtl.schedules import TrainState


@dataclass(frozen=True)
class HeadGroup:
    """Tasks of one kind (and class count) whose posteriors are solved together.

    ``kind`` is ``regression``, ``binary`` or ``multiclass``; ``tasks [K_g]`` their indices;
    ``classes`` the rows of ``θ_t`` they use; ``rows`` indexes the group's tasks along a task
    axis: a slice when they are consecutive (a view, not a gather), else ``tasks``.
    """

    kind: str
    tasks: Tensor
    classes: int
    rows: slice | Tensor

    def size(self, dim: int) -> int:
        """Numbers of ``θ_t`` the group uses, ``classes·(d+1)``."""
        return self.classes * (dim + 1)

    def labels(self, y: Tensor) -> Tensor:
        """``y [T, B]`` of the group's tasks as ``[B, K_g]`` (class indices for multiclass)."""
        y = y[self.rows].T
        return y.long() if self.kind == "multiclass" else y


def head_groups(info: TaskInfo) -> tuple[HeadGroup, ...]:
    """The tasks grouped by kind and class count (data preparation: runs once, at build time)."""
    keys: dict[tuple[str, int], list[int]] = {}
    for t, (kind, classes) in enumerate(zip(info.types, info.num_classes)):
        key = ("multiclass", classes) if kind == "classification" else (kind, 1)
        keys.setdefault(key, []).append(t)
    groups = []
    for (kind, classes), tasks in keys.items():
        index = torch.tensor(tasks, device=info.type_code.device)
        consecutive = tasks == list(range(tasks[0], tasks[0] + len(tasks)))
        groups.append(HeadGroup(kind, index, classes, slice(tasks[0], tasks[0] + len(tasks)) if consecutive else index))
    return tuple(groups)


@dataclass
class GroupPosterior:
    """One group's posterior: ``mean`` ``[K_g, d+1]`` (``[K_g, C, d+1]`` multiclass), ``cov`` and
    ``precision`` ``[K_g, P_g, P_g]`` (the precision only when asked for)."""

    mean: Tensor
    cov: Tensor | None
    precision: Tensor | None = None


def group_prior(prior: GaussianPrecision, group: HeadGroup, dim: int) -> tuple[Tensor, Tensor]:
    """The prior of the rows ``group`` uses: mean shaped like its posterior's, precision ``[P_g, P_g]`` or per task.

    Exact because every prior here is block-diagonal between used and unused rows.
    """
    size = group.size(dim)
    loc = prior.loc.reshape(-1, prior.loc.shape[-1])[group.rows, :size]
    if group.kind == "multiclass":
        loc = loc.view(-1, group.classes, dim + 1)
    precision = prior.precision
    if precision.dim() == 2:
        return loc, precision[:size, :size]
    precision = precision.reshape(-1, *precision.shape[-2:])
    if precision.stride(0) == 0:  # one matrix broadcast to every task (see share_rows)
        return loc, precision[0, :size, :size]
    precision = precision[group.rows, :size, :size]
    if group.kind == "regression" and torch.equal(precision, precision[:1].expand_as(precision)):
        # Regression heads see the same features, so every prior kind here gives them one
        # precision: pass it once, and the posterior is one factorisation for all of them.
        return loc, precision[0]
    return loc, precision


def group_priors(prior: GaussianPrecision, groups: tuple[HeadGroup, ...], dim: int) -> list[tuple[Tensor, Tensor]]:
    """:func:`group_prior` of every group, in the order of ``groups``."""
    return [group_prior(prior, group, dim) for group in groups]


def batch_posterior(
    features: Tensor,
    y: Tensor,
    heads: Tensor,
    priors: list[tuple[Tensor, Tensor]],
    groups: tuple[HeadGroup, ...],
    with_precision: bool = False,
) -> list[GroupPosterior]:
    """Posterior of every group's heads given labels ``y [T, B]`` (eq. 2, eq. 8–10).

    ``features`` ``[B, d+1]`` are ``add_bias(h)``, built once per step by the caller; ``heads``
    ``[T, K, d+1]`` are the learned ``θ̂`` the classification step starts from; ``priors`` are
    the groups' priors, :func:`group_priors`.
    """
    dim = features.shape[1] - 1
    h = features[:, :dim]
    out = []
    for group, (mean_p, precision_p) in zip(groups, priors):  # one batched solve per kind of task, not per task
        labels = group.labels(y)
        if group.kind == "regression":
            parts = regression_posterior(features, labels, mean_p, precision_p, with_precision=with_precision)
        else:
            theta = heads[group.rows, : group.classes]
            if group.kind == "binary":
                theta = theta.squeeze(1)
            kind: Kind = "binary" if group.kind == "binary" else "multiclass"
            parts = laplace_posterior(
                h, labels, theta[..., :dim], theta[..., dim], mean_p, precision_p, kind, with_precision=with_precision
            )
        # parts: (mean, cov), with the precision third when asked for
        out.append(GroupPosterior(parts[0], parts[1], parts[2] if with_precision else None))
    return out


def assemble(
    mean: Tensor, precision: Tensor, groups: tuple[HeadGroup, ...], posteriors: list[GroupPosterior], dim: int
) -> tuple[Tensor, Tensor]:
    """Write the groups' posteriors over a prior ``mean [T, P]``, ``precision [P, P]`` or ``[T, P, P]``.

    Returns ``(mean [T, P], precision [T, P, P])``: rows no group uses keep the prior.
    """
    num_tasks, size = mean.shape
    mean = mean.clone()
    precision = precision.reshape(-1, size, size).expand(num_tasks, size, size).clone()
    for group, post in zip(groups, posteriors):
        used = group.size(dim)
        if post.precision is None:
            raise ValueError("assemble needs the posteriors' precisions (batch_posterior(..., with_precision=True))")
        mean[group.rows, :used] = post.mean.reshape(len(group.tasks), used)
        precision[group.rows, :used, :used] = post.precision
    return mean, precision


def share_rows(precision: Tensor) -> Tensor:
    """``precision [T, P, P]`` as one matrix broadcast to every task when all are equal, else unchanged.

    Run once per rebuilt prior, so the steps under it skip :func:`group_prior`'s comparison.
    """
    if torch.equal(precision, precision[:1].expand_as(precision)):
        return precision[:1].expand_as(precision)
    return precision


class BayesAggGuide(MultiTaskModule):
    """``q(θ)``: the batch posterior on training batches, a point mass at the prediction heads otherwise.

    It shares the model's extractor, heads and prior, so it holds no parameters of its own.
    ``posterior_mean``: whether regression tasks predict with their full-data posterior mean.
    """

    def __init__(self, model: Any, state: TrainState, posterior_mean: bool = True):
        super().__init__(model.info, state)
        self._model = [model]  # a plain reference, not a submodule: the model's state is saved once
        self.posterior_mean = posterior_mean

    def prediction_heads(self) -> Tensor:
        """``[T, P]``: the full-data posterior mean for regression tasks (once known, and with
        ``posterior_mean``), else ``θ̂``."""
        model = self._model[0]
        theta = model.heads.detach().flatten(1)  # a new tensor (a concatenation of the parameters)
        regression = model.store.regression_mean
        if regression is not None and self.posterior_mean:
            group = model.regression_group
            theta[group.rows, : group.size(model.latent_dim)] = regression
        return theta

    def posterior(self, batch: Batch) -> GaussianPrecision:
        """The batch posterior of every head as one ``[T, 1, P]`` distribution."""
        model = self._model[0]
        prior = model.prior()
        with torch.no_grad():
            features = add_bias(model.features(batch.x))
            posts = batch_posterior(
                features,
                batch.y,
                model.heads,
                group_priors(prior, model.groups, model.latent_dim),
                model.groups,
                with_precision=True,
            )
            mean, precision = assemble(prior.mean.squeeze(-2), prior.precision, model.groups, posts, model.latent_dim)
        return GaussianPrecision(mean.unsqueeze(-2), precision.unsqueeze(-3))

    def forward(self, batch: Batch) -> None:
        with Plates(batch).globals():
            if batch.split == "train":
                pyro.sample("w", self.posterior(batch))
            else:
                pyro.sample("w", dist.Delta(self.prediction_heads().unsqueeze(-2), event_dim=1))
