"""A method of your own, registered from user code: Bayesian linear heads on a shared encoder.

``bayes-heads`` has a deterministic shared MLP encoder ``h = f(x)`` and one linear head per task,
``w_t ~ N(0, I)`` a priori with a diagonal Gaussian posterior ``q(w_t)``; the likelihood is
pyromtl's (any mix of classification, binary and regression tasks). Registering it takes one
``Method(...)`` declaration; nothing in pyromtl changes. Every callback of the declaration
(``build``, the export site's ``draw``) takes one :class:`~pyromtl.method.MethodContext`: the
resolved config, the data, the device, the training state, and the model and guide once built.

Run it::

    python examples/custom_method.py --steps 200 --out runs/custom

which fits it from Python, then from the command line next to ``stl`` (with ``--steps`` as given,
on the CPU; ``--steps 200`` is also the default)::

    pyromtl fit bayes-heads --import examples/custom_method.py --data digits-domains --steps 200 \\
        --out runs/custom/bayes-heads
    pyromtl fit stl --data digits-domains --steps 200 --out runs/custom/stl
    pyromtl compare runs/custom/bayes-heads runs/custom/stl --baseline runs/custom/stl

Typed again after the script, each ``fit`` finds its run complete; without ``--steps 200`` it
would ask for the default 100 steps, fewer than the run holds, and be refused.

``--import`` loads this file in the ``pyromtl`` process, so the method is registered there too
(``evaluate`` and ``report`` of such a run take the same option).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroParam

import pyromtl
from pyromtl.base import MultiTaskModel, MultiTaskModule, Plates
from pyromtl.data.core import Batch, MultiTaskData
from pyromtl.method import ExportSite, Method, MethodContext
from pyromtl.methods import available, register
from pyromtl.nn import MLP
from pyromtl.options import Options
from pyromtl.priors import PriorSite
from pyromtl.schedules import TrainState


@dataclass
class BayesHeadsOptions(Options):
    hidden: list[int] = field(default_factory=lambda: [128])
    latent_dim: int = 32
    activation: str = "elu"


class BayesHeadsModel(MultiTaskModel):
    """``p(w_t) p(y | f(x), w_t)``: the heads are the only latent site."""

    def __init__(
        self,
        data: MultiTaskData,
        cfg: Mapping[str, Any],
        state: TrainState,
        encoder: torch.nn.Module,
        device: torch.device,
    ):
        info = data.info.to(device)
        super().__init__(info, state, cfg["kl_weight"])
        self.encoder = encoder
        self.latent_dim = cfg["latent_dim"]
        self.w_prior = PriorSite("w", cfg["priors"]["w"], device=device)
        self.bias = PyroParam(torch.zeros(info.num_tasks, 1, info.out_dim, device=device))

    def forward(self, batch: Batch) -> None:
        T, K, d = self.info.num_tasks, self.info.out_dim, self.latent_dim
        plates = Plates(batch)
        with plates.globals(), self.kl_scope("w"):
            prior = self.w_prior.build(batch_shape=(T, 1), event_shape=(K, d), num_tasks=T, state=self.state)
            w = pyro.sample("w", prior)  # [..., T, 1, K, d]
        h = self.encoder(batch.x.flatten(-len(self.info.input_shape)))  # [B, d] (SIMO) or [T, B, d] (MIMO)
        outputs = torch.matmul(h, w.squeeze(-3).transpose(-1, -2)) + self.bias  # [..., T, B, K]
        with plates.observations():
            self.observe(outputs, batch)


class BayesHeadsGuide(MultiTaskModule):
    """``q(w_t) = N(loc_t, diag scale_t²)``."""

    def __init__(self, data: MultiTaskData, cfg: Mapping[str, Any], state: TrainState, device: torch.device):
        info = data.info.to(device)
        super().__init__(info, state, cfg["kl_weight"])
        shape = (info.num_tasks, 1, info.out_dim, cfg["latent_dim"])
        self.loc = torch.nn.Parameter(0.1 * torch.randn(shape, device=device))
        self.raw_scale = torch.nn.Parameter(torch.full(shape, -3.0, device=device))

    def posterior(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc, torch.nn.functional.softplus(self.raw_scale) + 1e-5

    def forward(self, batch: Batch) -> None:
        loc, scale = self.posterior()
        with Plates(batch).globals(), self.kl_scope("w"):
            pyro.sample("w", dist.Normal(loc, scale).to_event(2))


def build(ctx: MethodContext) -> tuple[BayesHeadsModel, BayesHeadsGuide]:
    data, cfg, state, device = ctx.data, ctx.config, ctx.state, ctx.device
    encoder = MLP(data.info.input_dim, cfg["hidden"], cfg["latent_dim"], cfg["activation"]).to(device)
    return BayesHeadsModel(data, cfg, state, encoder, device), BayesHeadsGuide(data, cfg, state, device)


def head_draws(ctx: MethodContext, n: int) -> torch.Tensor:
    """``n`` draws of every head, ``[n, T, K, d]``, for ArviZ."""
    loc, scale = ctx.guide.posterior()
    return (loc + scale * torch.randn(n, *loc.shape, device=loc.device)).squeeze(2)


if "bayes-heads" not in available():  # importing this file twice (script, then --import) registers once
    register(
        Method(
            name="bayes-heads",
            summary="Bayesian linear heads on a shared deterministic encoder (example)",
            paper="examples/custom_method.py",
            build=build,
            options=BayesHeadsOptions,
            priors={"w": {"kind": "normal", "scale": 1.0}},
            export=(ExportSite("w", ("task", "class", "latent_dim"), head_draws),),
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--data", default="digits-domains")
    parser.add_argument("--out", default="runs/custom")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    fit = pyromtl.fit("bayes-heads", args.data, steps=args.steps, device=args.device, quiet=True)
    print(f"from Python: bayes-heads on {args.data}, test accuracy {fit.evaluate()['average']['accuracy']:.4f}")

    out = Path(args.out)
    cli = [sys.executable, "-m", "pyromtl.cli"]
    common = ["--data", args.data, "--steps", str(args.steps), "--device", args.device, "--quiet"]
    for command in (
        [*cli, "fit", "bayes-heads", "--import", __file__, *common, "--out", str(out / "bayes-heads")],
        [*cli, "fit", "stl", *common, "--out", str(out / "stl")],
        [*cli, "compare", str(out / "bayes-heads"), str(out / "stl"), "--baseline", str(out / "stl")],
    ):
        print("$ pyromtl " + " ".join(command[3:]), flush=True)
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
