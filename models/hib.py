"""HIB: compressed hierarchical representations for MTL and task clustering.

Machado de Freitas, Berg, Geiger, Mücke, IJCNN 2022. Equation numbers refer to the paper.

* Representation: ``Z = f_θ(X)``, a deterministic MLP shared by the tasks (§III-A).
* Task representations: the noise channels ``W_j = Z + N_j``, ``N_j ~ N(0, diag σ_j²)`` (eq. 1),
  sampled by the guide (``guides/hib.py``), one draw per step.
* Prior of ``w``: the learned marginal ``q_j = N(ν_j, diag ξ_j²)`` of eq. 7–8, by default the
  ``learned_normal`` prior with ``per_task = true`` and ``learn_loc = false`` (ν_j frozen at 0,
  which the paper found trains best). The KL between the channel and it is Pyro's analytic
  Normal KL, i.e. :func:`pyromtl.infer.hib.channel_kl` (with the ½ of the Gaussian KL).
* Heads: ``c_ψ,j(y | W_j)``, one linear map per task (``TaskLinear``), as in the paper's Table II.
* Objective: eq. 2 with the bounds of eq. 3 and 8, i.e. the mean-field ELBO with task j's KL
  scaled by β_j (``beta``, or per task ``task_beta``), in model and guide alike.

Task similarity is the eq. 11 distance between the learned ``log σ_j²``: ``Fit.relatedness()
["distance"]`` (drawn as the run's ``relatedness_distance.png``). Where the data declares its
groups (``data.relatedness``), ``metrics.json`` gets ``extra.clustering`` with the paper's
success criterion (§V-B), and the run's plots get a dendrogram of the average-linkage clustering.

The paper's ablations are configuration (``examples/configs/hib_*.toml``): no noise is the
``deterministic`` prior of ``w``, fixed noise (Table V) is ``noise = "fixed"``, and β = 0 is
``beta = 0``. Its baseline MTVIB (§V-A) is the method ``mtvib`` (:class:`MTVIBModel`).

Draws of the noise. The paper draws W_j once at train and at test time (§III-D). Training here
draws it once per step too, but a prediction (``predict_w = "sample"``) averages the predictive
over draws: validation, which picks the kept step, over ``eval_samples`` (20, the trainer's
default, kept for HIB), and the final metrics over at least ``MIN_DRAWS`` (100) draws
(:meth:`pyromtl.fit.Fit.predict`). So ``metrics.json`` scores the Monte-Carlo predictive, not one
noisy draw; the paper's single test draw is ``Fit.evaluate("test", num_samples=1)``. Measured on
``digits-grouped`` at the defaults, seeds 0, 1, 2 (on one CPU; see docs/methods/hib.md):

* one test draw scores 0.936, 0.941, 0.945 mean accuracy where the 100-draw predictive scores
  0.978, 0.979, 0.982 (a single draw's own accuracy averages 0.937-0.948 over 100 draws);
* validating on one draw (``eval_samples = 1``) instead of 20 gives the same mean test accuracy
  (0.980 and 0.980) and changes the kept step in 2 of 3 seeds (1,700 against 1,050 and 1,150
  against 1,500), with margins 12.78, 10.60, 7.76 against 7.06, 13.39, 7.76: a one-draw score
  is noisier (at seed 0's kept state its standard deviation over the random stream is 0.0041,
  against 0.0016 for 20 draws), and training itself is the same (validation draws from its own
  seeded stream).

``predict_w = "mean"`` predicts from W_j = Z instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import torch
from pyro import poutine

from pyromtl.base import MultiTaskModel, Plates
from pyromtl.data.core import Batch, MultiTaskData
from pyromtl.distributions import factor
from pyromtl.guides.hib import ChannelScale, HIBGuide, MTVIBGuide
from pyromtl.infer.hib import cluster_tasks, clustering_margin, noise_distance
from pyromtl.method import ExportSite, Method, MethodContext
from pyromtl.nn import GaussianEncoder, TaskLinear
from pyromtl.options import NetworkOptions
from pyromtl.plots import plot_dendrogram
from pyromtl.priors import PriorSite
from pyromtl.schedules import TrainState

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PAPER = (
    "Machado de Freitas, Berg, Geiger, Mücke, Compressed Hierarchical Representations for Multi-Task "
    "Learning and Task Clustering, IJCNN 2022"
)
#: Linkage of the task clustering (average linkage suits a non-Euclidean dissimilarity).
LINKAGE = "average"


class HIBModel(ChannelScale, MultiTaskModel):
    """``p(y, w | x) = Π_j q_j(w_j) c_ψ,j(y_j | w_j)``: the marginals of eq. 7 and the heads of eq. 3."""

    def __init__(self, data: MultiTaskData, cfg: Mapping[str, Any], state: TrainState, device: torch.device):
        super().__init__(data, cfg, state, device)
        self.latent_dim = cfg["latent_dim"]
        self.w_prior = PriorSite("w", cfg["priors"]["w"], device=device)
        self.heads = TaskLinear(data.num_tasks, self.latent_dim, self.info.out_dim).to(device)

    def forward(self, batch: Batch) -> None:
        plates = Plates(batch)
        T, B = batch.num_tasks, batch.size
        with plates.locals(), self.beta_scope():
            prior = self.w_prior.build(
                batch_shape=(T, B), event_shape=(self.latent_dim,), num_tasks=T, state=self.state
            )
            w = pyro.sample("w", prior)
        outputs = self.heads(w)  # [..., T, B, D] x [T, D, K]: every task's head in one matmul
        with plates.observations():
            self.observe(outputs, batch)


class MTVIBModel(MultiTaskModel):
    """MTVIB: ``Z ~ N(0, I)`` shared by the tasks, linear heads, and uncertainty weighting.

    Task j's log-likelihood is weighted by ``exp(-s_j)`` and each sample adds ``s_j / 2``
    (Kendall et al., 2018, with ``s_j`` a learned log variance), so the weights adapt to
    each task's loss instead of being fixed. The KL of ``Z`` is weighted by ``beta`` (in the guide).
    """

    def __init__(self, data: MultiTaskData, cfg: Mapping[str, Any], state: TrainState, device: torch.device):
        info = data.info.to(device)
        super().__init__(info, state, cfg["kl_weight"], {"z": cfg["beta"]})
        self.latent_dim = cfg["latent_dim"]
        self.z_prior = PriorSite("z", cfg["priors"]["z"], device=device)
        self.heads = TaskLinear(data.num_tasks, self.latent_dim, info.out_dim).to(device)
        self.log_task_var = torch.nn.Parameter(torch.zeros(data.num_tasks, 1, device=device))

    def forward(self, batch: Batch) -> None:
        plates = Plates(batch)
        rows = 1 if batch.simo else batch.num_tasks
        with plates.locals(shared=batch.simo), self.kl_scope("z"):
            prior = self.z_prior.build(
                batch_shape=(rows, batch.size),
                event_shape=(self.latent_dim,),
                num_tasks=batch.num_tasks,
                state=self.state,
            )
            z = pyro.sample("z", prior)
        outputs = self.heads(z)
        s = self.log_task_var  # [T, 1]
        with plates.observations():
            with poutine.scale(scale=torch.exp(-s)):
                self.observe(outputs, batch)
            factor("task_uncertainty", -0.5 * s.expand(batch.num_tasks, batch.size))


# ---------------------------------------------------------------------------- declarations
@dataclass
class HIBOptions(NetworkOptions):
    """HIB's options; the network defaults follow the paper's Table II (an MLP 32-32 and linear heads).

    The encoder ``f_θ`` is the backbone, then ``hidden`` layers to ``latent_dim``."""

    latent_dim: int = 8
    hidden: list[int] = field(default_factory=lambda: [32, 32])
    activation: str = "relu"
    beta: float = 0.1  # β_j of eq. 2 for every task
    task_beta: dict[str, float] = field(default_factory=dict)  # β_j by task name, overriding `beta`
    noise: str = "learned"  # "fixed": σ_j² = fixed_noise_var, Table V
    fixed_noise_var: float = math.e  # σ² of the fixed channel (Table V: e)
    release_noise_at: int = 0  # with noise = "fixed": from this step, freeze f_θ and learn σ_j (0: never)
    init_log_var_std: float = 0.01  # log σ_j² starts at this times N(0, 1), as the authors' code
    predict_w: str = "sample"  # outside training: "sample" W_j (§III-D) or take its "mean" Z


def build_hib(ctx: MethodContext) -> tuple[HIBModel, HIBGuide]:
    """HIB's model and guide; the guide owns the encoder f_θ and the channels' σ_j."""
    data, cfg, state, device = ctx.data, ctx.config, ctx.state, ctx.device
    if cfg["latent_dim"] < 1:
        raise ValueError("config key 'latent_dim' must be at least 1")
    encoder = ctx.backbone.shared(data.info.input_shape, cfg["hidden"], cfg["latent_dim"], cfg["activation"])
    guide = HIBGuide(data, cfg, state, encoder.to(device), device)
    model = HIBModel(data, cfg, state, device)
    return model, guide


@dataclass
class MTVIBOptions(NetworkOptions):
    """MTVIB's options: HIB's network, one β for the shared representation."""

    latent_dim: int = 8
    hidden: list[int] = field(default_factory=lambda: [32, 32])
    activation: str = "relu"
    beta: float = 0.1  # weight of KL(q(Z | x) ‖ N(0, I))


def build_mtvib(ctx: MethodContext) -> tuple[MTVIBModel, MTVIBGuide]:
    """MTVIB's model and guide; the guide owns the Gaussian encoder."""
    data, cfg, state, device = ctx.data, ctx.config, ctx.state, ctx.device
    encoder = GaussianEncoder(
        data.num_tasks,
        data.info.input_shape,
        cfg["hidden"],
        cfg["latent_dim"],
        cfg["activation"],
        backbone=ctx.backbone,
    ).to(device)
    return MTVIBModel(data, cfg, state, device), MTVIBGuide(data, cfg, state, encoder, device)


def _has_channels(guide: HIBGuide) -> bool:
    return not guide.point


def hib_relatedness(ctx: MethodContext) -> dict[str, np.ndarray]:
    """The eq. 11 distance between the tasks' log noise variances; none without channels."""
    guide = ctx.guide
    if not _has_channels(guide):
        return {}
    return {"distance": noise_distance(guide.channel_log_var().detach()).cpu().numpy()}


def hib_extra(ctx: MethodContext) -> dict[str, Any]:
    """The paper's clustering criterion (§V-B) where the data declares its task groups.

    ``success``: every across-group distance exceeds every within-group one; ``margin``: the
    smallest across minus the largest within (eq. 11 units).
    """
    distance = ctx.relatedness().get("distance")
    if distance is None or ctx.data.relatedness is None:
        return {}
    margin = clustering_margin(distance, ctx.data.relatedness)
    return {"clustering": {"success": margin > 0.0, "margin": margin, "linkage": LINKAGE}}


def hib_plots(ctx: MethodContext) -> dict[str, Callable[[], Figure]]:
    """The dendrogram of the eq. 11 task clustering, drawn when written."""
    distance = (ctx.doc.get("relatedness") or {}).get("distance")
    if distance is None:
        return {}
    names = list(ctx.doc["tasks"])
    return {
        "dendrogram_distance.png": lambda: plot_dendrogram(
            cluster_tasks(distance, LINKAGE), names, f"task clustering ({LINKAGE} linkage, eq. 11)"
        )
    }


def _log_var_draws(ctx: MethodContext, n: int) -> torch.Tensor | None:
    """``log σ_j²`` repeated over the ``n`` draws (a point estimate), ``[n, T, D]``."""
    guide = ctx.guide
    if not _has_channels(guide):
        return None
    log_var = guide.channel_log_var().detach()
    return log_var.expand(n, *log_var.shape)


def _latent_coords(data: MultiTaskData, shape: tuple[int, ...]) -> dict[str, Any]:
    return {"latent_dim": np.arange(shape[-1])}


#: ν_j frozen at 0 and ξ_j learned per task (§III-D).
MARGINAL = {"kind": "learned_normal", "loc": 0.0, "scale": 1.0, "learn_loc": False, "per_task": True}

HIB = Method(
    name="hib",
    summary="HIB: a deterministic shared Z, per-task Gaussian noise channels W_j = Z + N_j "
    "under a β_j-weighted KL, task clustering from the noise variances",
    paper=PAPER,
    build=build_hib,
    options=HIBOptions,
    min_tasks=2,  # eq. 11's distance and the clustering compare tasks
    priors={"w": dict(MARGINAL)},
    relatedness=hib_relatedness,
    relatedness_titles={"distance": "eq. 11: L1 distance between the tasks' log noise variances"},
    export=(ExportSite("channel_log_var", ("task", "latent_dim"), _log_var_draws, _latent_coords),),
    extra=hib_extra,
    plots=hib_plots,
)


def _task_log_var_draws(ctx: MethodContext, n: int) -> torch.Tensor:
    """The uncertainty weights' log variances ``s_j`` (point estimates), repeated over draws."""
    s = ctx.model.log_task_var.detach().squeeze(-1)
    return s.expand(n, *s.shape)


MTVIB = Method(
    name="mtvib",
    summary="MTVIB (HIB's baseline): one stochastic Z under N(0, I) with a β-weighted KL, "
    "linear heads and uncertainty-weighted task losses",
    paper=PAPER + " (baseline, §V-A)",
    build=build_mtvib,
    options=MTVIBOptions,
    priors={"z": "normal"},
    export=(ExportSite("task_log_var", ("task",), _task_log_var_draws),),
)

METHODS: tuple[Method, ...] = (HIB, MTVIB)
