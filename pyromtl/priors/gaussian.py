"""Gaussian and flat prior kinds: ``normal``, ``learned_normal`` and ``deterministic``."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions.util import broadcast_shape
from torch.distributions import constraints

from pyromtl.distributions import DiagNormal
from pyromtl.priors.spec import PriorContext, PriorKind, PriorSpec, positive


def _diag_normal(loc: torch.Tensor, scale: torch.Tensor, ctx: PriorContext, zero_loc: bool) -> DiagNormal:
    # Unexpanded parameters: the closed-form KLs then work on them, not on the plates' full shape.
    return DiagNormal(loc, scale, len(ctx.event_shape), ctx.batch_shape + ctx.event_shape, zero_loc=zero_loc)


def _normal(spec: PriorSpec, ctx: PriorContext) -> DiagNormal:
    """``N(loc, scale²)`` on every element: VSTL / VBMTL's ``N(0, I)`` prior."""
    loc = spec.params["loc"]
    return _diag_normal(ctx.full((), loc), ctx.full((), spec.params["scale"]), ctx, zero_loc=loc == 0)


def _learned_normal(spec: PriorSpec, ctx: PriorContext) -> DiagNormal:
    """Diagonal Gaussian with a learned scale and (unless ``learn_loc = false``) a learned mean.

    Parameters have the event shape, shared by the whole batch, or with ``per_task = true`` one
    set per task (along ``task_axis``). A frozen zero mean is HIB's best-training marginal
    (``ν_j = 0``, eq. 7–8).
    """
    shape = ctx.event_shape
    if spec.params["per_task"]:
        if ctx.task_axis is None:
            raise ValueError(f"site {ctx.site!r} has no batch dims, so no task axis for per_task parameters")
        rows = [1] * len(ctx.batch_shape)
        rows[len(rows) + ctx.task_axis] = ctx.num_tasks
        shape = torch.Size(rows) + ctx.event_shape
    loc = ctx.full(shape, spec.params["loc"])
    learn_loc = spec.params["learn_loc"]
    if learn_loc:
        loc = ctx.param("loc", loc)
    scale = ctx.param("scale", ctx.full(shape, spec.params["scale"]), constraints.positive)
    return _diag_normal(loc, scale, ctx, zero_loc=not learn_loc and spec.params["loc"] == 0)


class _Flat(dist.ImproperUniform):
    """Pyro's ``ImproperUniform`` with its zero log density made where the value is (Pyro's own
    makes ``torch.zeros(())`` on torch's default device, whatever the value's)."""

    def expand(self, batch_shape, _instance=None):
        return super().expand(batch_shape, _instance=self._get_checked_instance(_Flat, _instance))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        batch_shape = broadcast_shape(value.shape[: value.dim() - self.event_dim], self.batch_shape)
        return value.new_zeros(()).expand(batch_shape)


def _deterministic(spec: PriorSpec, ctx: PriorContext) -> dist.ImproperUniform:
    """A flat (improper, log density 0) prior: the site is a point estimate (STL / BMTL)."""
    support = constraints.independent(constraints.real, len(ctx.event_shape)) if ctx.event_shape else constraints.real
    return _Flat(support, ctx.batch_shape, ctx.event_shape)


NORMAL = PriorKind(
    "normal", _normal, defaults={"loc": 0.0, "scale": 1.0}, checks={"scale": positive}, uses_components=False
)
LEARNED_NORMAL = PriorKind(
    "learned_normal",
    _learned_normal,
    defaults={"loc": 0.0, "scale": 1.0, "learn_loc": True, "per_task": False},
    checks={"scale": positive},
    uses_components=False,
)
DETERMINISTIC = PriorKind("deterministic", _deterministic, uses_components=False)
