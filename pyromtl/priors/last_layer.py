"""BayesAgg-MTL's last-layer prior kinds: ``isotropic``, ``full_data`` and ``previous_batch``.

Each is a :class:`~pyromtl.distributions.GaussianPrecision` over the flattened heads with the
isotropic scale γ (``scale``). ``full_data`` and ``previous_batch`` read the Gaussian the model
stores in ``ctx.extras`` under their own name, and are isotropic until there is one.
"""

from __future__ import annotations

import torch

from pyromtl.distributions import GaussianPrecision
from pyromtl.priors.spec import PriorContext, PriorKind, PriorSpec, positive


def _isotropic(spec: PriorSpec, ctx: PriorContext) -> GaussianPrecision:
    """``N(0, γ² I)`` over every head (γ = ``scale``); its precision is one shared matrix."""
    size = ctx.event_shape[-1]
    loc = ctx.full(ctx.batch_shape + ctx.event_shape, 0.0)
    eye = torch.eye(size, dtype=ctx.dtype, device=ctx.device)
    return GaussianPrecision(loc, eye / spec.params["scale"] ** 2)


def _stored(name: str, spec: PriorSpec, ctx: PriorContext) -> GaussianPrecision:
    """The Gaussian ``ctx.extras[name] = (mean [T, P], precision [T, P, P])``, or isotropic until there is one."""
    stored = ctx.extras.get(name)
    if stored is None:
        return _isotropic(spec, ctx)
    mean, precision = stored
    return GaussianPrecision(
        mean.reshape(ctx.batch_shape + ctx.event_shape),
        precision.reshape(ctx.batch_shape + ctx.event_shape + ctx.event_shape[-1:]),
    )


def _full_data(spec: PriorSpec, ctx: PriorContext) -> GaussianPrecision:
    """The heads' posterior on the previous epoch's features under ``N(0, γ² I)`` (BayesAgg §3.1, §3.2).

    Reads ``ctx.extras["full_data"]``; isotropic during the first epoch.
    """
    return _stored("full_data", spec, ctx)


def _previous_batch(spec: PriorSpec, ctx: PriorContext) -> GaussianPrecision:
    """The previous batch's posterior (``ctx.extras["previous_batch"]``); isotropic at the first step."""
    return _stored("previous_batch", spec, ctx)


def _kind(name: str, builder) -> PriorKind:
    return PriorKind(name, builder, defaults={"scale": 1.0}, checks={"scale": positive}, uses_components=False)


ISOTROPIC = _kind("isotropic", _isotropic)
FULL_DATA = _kind("full_data", _full_data)
PREVIOUS_BATCH = _kind("previous_batch", _previous_batch)
