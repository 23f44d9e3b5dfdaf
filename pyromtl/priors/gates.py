"""SMTL's ``relaxed_bernoulli`` gate prior kind (beyond the paper: a Bayesian gate)."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import pyro.distributions as dist

from pyromtl.priors.spec import PriorContext, PriorKind, PriorSpec


def _probability(value: Any) -> float:
    # value first in each comparison: the Real ABC's stub defines only __lt__ and __le__
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or not math.isfinite(value)
        or value <= 0.0
        or not value < 1.0
    ):
        raise ValueError(f"must be in (0, 1), got {value!r}")
    return float(value)


def _relaxed_bernoulli(spec: PriorSpec, ctx: PriorContext) -> dist.RelaxedBernoulliStraightThrough:
    """A gate prior ``RelaxedBernoulli(τ, probs)`` at the gate's own temperature (``ctx.extras["temperature"]``).

    Straight-through so that it scores a hard draw at the relaxed value the draw came from
    (the hidden attribute of that exact tensor: the site's value is never copied).
    """
    probs = ctx.full(ctx.batch_shape, spec.params["probs"])
    return dist.RelaxedBernoulliStraightThrough(ctx.extras["temperature"], probs=probs)


RELAXED_BERNOULLI = PriorKind(
    "relaxed_bernoulli",
    _relaxed_bernoulli,
    defaults={"probs": 0.5},
    checks={"probs": _probability},
    uses_components=False,
)
