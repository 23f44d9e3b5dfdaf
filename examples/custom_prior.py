"""A prior kind defined outside pyromtl: a Laplace prior on the classifier ``w`` with a learned scale.

    python examples/custom_prior.py                 # 300 steps of VBMTL on digits-domains (5%)
    python examples/custom_prior.py --steps 5 --scale 0.2

A kind is one function registered with ``pyromtl.priors.register`` (docs/guide/priors.md). It
gets the resolved spec (``spec.params``: the table's values, defaults filled in) and a context
``ctx`` with the site's ``batch_shape`` and ``event_shape``, ``ctx.full`` for
constant tensors on the model's device and ``ctx.param`` for learned prior parameters, which the
model then owns and trains with everything else. Torch registers a closed-form KL from the
guide's Normal to a Laplace, so ``TraceMeanField_ELBO`` uses it; for a kind without one it falls
back to a Monte-Carlo estimate of that KL term.
"""

from __future__ import annotations

import argparse
from typing import Any

import pyro.distributions as dist
import torch
from torch.distributions import constraints, transform_to

import pyromtl
from pyromtl import priors
from pyromtl.tables import metrics_table


def _positive(value: Any) -> float:
    """Check of the ``scale`` parameter: a config or ``--set`` value must be a positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"must be a positive number, got {value!r}")
    return float(value)


@priors.register("laplace", defaults={"scale": 1.0}, checks={"scale": _positive})
def laplace(spec: priors.PriorSpec, ctx: priors.PriorContext) -> dist.Distribution:
    """Zero-mean Laplace on every element; one learned scale per element of the event, shared by the tasks.

    For ``w`` (event ``[classes, latent_dim]``) that is a sparsity prior whose strength is fitted
    per class and latent dimension (empirical Bayes); ``scale`` is its initial value.
    """
    scale = ctx.param("scale", ctx.full(ctx.event_shape, spec.params["scale"]), constraints.positive)
    loc = ctx.full(ctx.batch_shape + ctx.event_shape, 0.0)
    return dist.Laplace(loc, scale).to_event(len(ctx.event_shape))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps (default 300)")
    parser.add_argument("--scale", type=float, default=0.5, help="initial scale of the Laplace prior")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args(argv)

    # Small networks and lr 0.01 keep the default run within seconds on a CPU.
    fit = pyromtl.fit(
        "vbmtl",
        "digits-domains",
        fraction=0.05,
        priors={"w": {"kind": "laplace", "scale": args.scale}},
        seed=args.seed,
        device=args.device,
        steps=args.steps,
        lr=0.01,
        latent_dim=16,
        hidden=[64],
        eval_every=50,
        quiet=True,
    )
    scores = fit.evaluate("test")
    print(f"vbmtl on digits-domains (5% of train), w ~ Laplace(0, learned scale), {args.steps} steps:")
    print(metrics_table(scores["tasks"], scores["average"]))

    # The site stores the scale unconstrained; the prior sees it through transform_to(positive).
    with torch.no_grad():
        learned = transform_to(constraints.positive)(fit.model.w_prior.params["scale"])
    print(
        f"learned prior scale of w: mean {learned.mean():.3f}, min {learned.min():.3f}, max {learned.max():.3f} "
        f"(initial {args.scale})"
    )


if __name__ == "__main__":
    main()
