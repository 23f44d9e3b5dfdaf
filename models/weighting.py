"""Gradient-weighting MTL baselines on ``bmtl``'s network, through torchjd.

Every method here trains exactly ``bmtl``'s model and guide (``models/baselines.py``): one
shared encoder, one linear head per task, point estimates from ``deterministic`` priors on
``z`` and ``w``, with the same trainer, optimiser and step budget. Only the backward pass
differs. Each step reads the per-task losses ``ℓ_t`` from the model trace (the negative
log-likelihood of task t at the ``y`` site, summed over the batch with its ``N_t / B_t``
scale and padding mask) and combines them in one of two ways:

* **loss scalarisation**: a torchjd ``Scalarizer`` turns ``ℓ`` into one number whose
  ordinary backward sets every gradient, heads included (each with its task's weight):
  ``ls`` (``Sum``), ``rlw`` (``Random``), ``dwa`` (``DWA``) and ``uw`` (``UW``) come from
  ``torchjd.scalarization``; ``si`` is :class:`ScaleInvariant`, written here;
* **Jacobian descent**: torchjd's ``mtl_backward`` gives each head the gradient of its own
  loss and stores the T-row Jacobian of ``ℓ`` w.r.t. the shared encoder's parameters
  (computed through the shared representation ``z``); ``jac_to_grad`` aggregates it into the
  encoder's gradient with torchjd's ``MGDA``, ``PCGrad``, ``CAGrad``, ``IMTLG``, ``NashMTL``,
  ``AlignedMTL`` or ``UPGrad``.

The regression noise of ``bmtl``'s likelihood is fixed at 1 here by default (``learn_noise =
false``), so a regression loss is the squared error plus a constant, as in the papers these
baselines come from. A learned noise lets a Gaussian negative log-likelihood go below zero,
where ``si``'s logarithm is undefined and ``uw``'s objective has no minimum (its weight
``exp(-s)`` on a negative loss grows without bound); with ``learn_noise = true``, ``ls`` is
``bmtl`` exactly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from torchjd import aggregation, scalarization
from torchjd.autojac import jac_to_grad, mtl_backward

from pyromtl.base import TrainState, is_point
from pyromtl.data.core import Batch, MultiTaskData
from pyromtl.method import Method
from pyromtl.methods import register
from pyromtl.models.baselines import CLASSIFIER_EXPORT, LatentOptions, build_latent
from pyromtl.objective import Objective, TrainContext


# ---------------------------------------------------------------------------- combiners
class ScaleInvariant(scalarization.Scalarizer):
    """``Σ_t log ℓ_t``, the scale-invariant baseline (SI) of Navon et al., *Multi-Task Learning
    as a Bargaining Game*, ICML 2022: its gradient ``Σ_t ∇ℓ_t / ℓ_t`` is unchanged when a
    task's loss is multiplied by a constant.

    Losses must be positive. One that underflows to zero (a task fitted perfectly) is clamped
    to the smallest positive float, so it adds a constant and no gradient instead of ``-inf``.
    """

    def forward(self, values: torch.Tensor, /) -> torch.Tensor:
        return values.clamp_min(torch.finfo(values.dtype).tiny).log().sum()


class CheckpointedDWA(scalarization.DWA):
    """torchjd's Dynamic Weight Average (Liu, Johns & Davison, *End-to-End Multi-Task Learning
    with Attention*, CVPR 2019) with its loss history in the state dict.

    DWA's weights depend on the average losses of the last two epochs and on the running sum
    of the current one; keeping them in ``get_extra_state`` makes a resumed run exact.
    """

    def get_extra_state(self) -> dict[str, Any]:
        return {"loss_sum": self._loss_sum, "batches": self._n_batches, "averages": list(self._previous_averages)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._loss_sum, self._n_batches = state["loss_sum"], state["batches"]
        self._previous_averages = list(state["averages"])


class CheckpointedNashMTL(aggregation.NashMTL):
    """torchjd's Nash-MTL (Navon et al., ICML 2022) with its warm start in the state dict.

    Each solve starts from the previous step's weights; keeping them (and the step count that
    decides when to re-solve) in ``get_extra_state`` makes a resumed run exact. This reads
    torchjd's internal ``_NashMTLWeighting`` fields: recheck on a torchjd upgrade.
    """

    def get_extra_state(self) -> dict[str, Any]:
        w = self.weighting
        return {"step": float(w.step), "alpha": torch.as_tensor(w.prvs_alpha).clone()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        w = self.weighting
        w.step, w.prvs_alpha = state["step"], state["alpha"].cpu().numpy()
        if w.step:  # torchjd builds its convex problem on the first call only (step 0)
            w._init_optim_problem()

    def forward(self, matrix: torch.Tensor, /) -> torch.Tensor:
        # cvxpy warns on every solve that torchjd's problem is not DPP: nothing a user can act on
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You are solving a parameterized problem that is not DPP")
            return super().forward(matrix)


Combiner = scalarization.Scalarizer | aggregation.Aggregator


# ---------------------------------------------------------------------------- objectives
class TaskLossObjective(Objective):
    """``bmtl``'s ELBO module plus the per-task losses of a batch, read from the model trace.

    :meth:`forward` stays the ELBO (the sum of the task losses), which the trainer uses to
    create lazy parameters; subclasses combine the losses in :meth:`backward`. The combiner is
    a submodule, so its parameters (``uw``'s log-variances) are trained and checkpointed with
    the rest, and its extra state (``dwa``'s history) is checkpointed too.
    """

    def __init__(self, loss: torch.nn.Module, combine: Combiner):
        super().__init__(loss)
        self.combine = combine

    def task_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ℓ [T], z)``: each task's negative log-likelihood of ``batch`` and the shared
        representation ``z`` the heads read (``[1, B, d]`` for SIMO data)."""
        guide_tr = poutine.trace(self.guide).get_trace(batch)
        model_tr = poutine.trace(poutine.replay(self.model, trace=guide_tr)).get_trace(batch)
        y = model_tr.nodes["y"]
        log_lik = scale_and_mask(y["fn"].log_prob(y["value"]), y["scale"], y["mask"])
        return -log_lik.sum(-1), guide_tr.nodes["z"]["value"]


class ScalarizedObjective(TaskLossObjective):
    """One backward pass of the scalarised losses: every parameter gets ``∇ combine(ℓ)``."""

    def backward(self, batch: Batch) -> torch.Tensor:
        losses, _ = self.task_losses(batch)
        total = losses.detach().sum()
        if torch.isfinite(total):
            self.combine(losses).backward()
        return total

    def end_epoch(self, ctx: TrainContext) -> None:
        if isinstance(self.combine, scalarization.DWA):
            self.combine.step()  # DWA's weights follow the per-epoch average losses


class JacobianDescentObjective(TaskLossObjective):
    """torchjd's ``mtl_backward``: each head gets ``∇ℓ_t`` of its own task, and the shared
    encoder the aggregation of the Jacobian ``[∇ℓ_1; …; ∇ℓ_T]`` by ``combine``."""

    def __init__(self, loss: torch.nn.Module, combine: aggregation.Aggregator, shared: torch.nn.Module):
        super().__init__(loss, combine)
        # a tuple, not a submodule: the encoder is already in the state dict under ``loss.model``
        self.shared = tuple(shared.parameters())

    def backward(self, batch: Batch) -> torch.Tensor:
        losses, features = self.task_losses(batch)
        total = losses.detach().sum()
        if torch.isfinite(total):
            # The heads run as one batched op, so the task losses share their graph up to the
            # per-task split; torchjd frees it after the first task unless it is retained.
            mtl_backward(list(losses), features=features, shared_params=self.shared, retain_graph=True)
            jac_to_grad(self.shared, self.combine)
        return total


# ---------------------------------------------------------------------------- declarations
@dataclass
class WeightingOptions(LatentOptions):
    """``bmtl``'s options, plus whether the regression noise is learned (see the module doc)."""

    learn_noise: bool = False


@dataclass
class DWAOptions(WeightingOptions):
    #: Softmax temperature of the loss-descent rates; the paper uses 2.
    dwa_temperature: float = 2.0


@dataclass
class CAGradOptions(WeightingOptions):
    #: Radius of CAGrad's ball around the average gradient, relative to its norm.
    cagrad_c: float = 0.4


@dataclass
class NashMTLOptions(WeightingOptions):
    #: Largest norm of the aggregated gradient (0: no clipping), as in the paper's code.
    nash_max_norm: float = 1.0
    #: Re-solve the bargaining problem every this many steps (the paper's speed-up).
    nash_update_every: int = 1
    nash_optim_niter: int = 20


@dataclass(frozen=True)
class Weighting:
    """One baseline: how to build its combiner from the config and the number of tasks."""

    name: str
    summary: str
    paper: str
    make: Callable[[dict[str, Any], int], Combiner]
    options: type[WeightingOptions] = WeightingOptions
    #: The combiner takes logarithms of, or learns a weight against, the losses: they must stay positive.
    positive_losses: bool = False


def _checked_build(spec: Weighting) -> Callable[..., tuple[Any, Any]]:
    """``bmtl``'s model and guide, refusing what would make them another network."""

    def build(data: MultiTaskData, cfg: dict[str, Any], state: TrainState, device: torch.device):
        if cfg["per_task_encoder"]:
            raise ValueError(f"method {spec.name!r} weights the gradients of one shared encoder; "
                             "per_task_encoder must be false")
        if not all(is_point(p) for p in cfg["priors"].values()):
            raise ValueError(f"method {spec.name!r} trains point estimates like bmtl: "
                             "the priors of z and w must be 'deterministic'")
        if cfg["learn_noise"] and spec.positive_losses:
            raise ValueError(f"method {spec.name!r} needs positive task losses, which a learned regression noise "
                             "does not guarantee; keep learn_noise = false")
        model, guide = build_latent(data, cfg, state, device)
        if not cfg["learn_noise"]:
            model.noise_unconstrained.requires_grad_(False)  # stays at its initial value, 1
        return model, guide

    return build


def _objective(spec: Weighting) -> Callable[..., Objective]:
    def objective(method: Method, cfg: dict[str, Any], model, guide) -> Objective:
        loss = method.elbo(method, cfg)(model, guide)
        combine = spec.make(cfg, model.info.num_tasks).to(model.info.type_code.device)
        if isinstance(combine, aggregation.Aggregator):
            return JacobianDescentObjective(loss, combine, model.encoder)
        return ScalarizedObjective(loss, combine)

    return objective


_NAVON = "Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022"
WEIGHTINGS: tuple[Weighting, ...] = (
    Weighting("ls", "linear scalarisation: the sum of the task losses (torchjd Sum)",
              "Caruana, Multitask Learning, Machine Learning 1997", lambda cfg, T: scalarization.Sum()),
    Weighting("si", "scale-invariant: the sum of the log task losses (written here as a torchjd Scalarizer)",
              _NAVON + " (SI baseline)", lambda cfg, T: ScaleInvariant(), positive_losses=True),
    Weighting("rlw", "random loss weighting: softmax of Gaussian weights drawn every step (torchjd Random)",
              "Lin et al., Reasonable Effectiveness of Random Weighting, TMLR 2022", lambda cfg, T: scalarization.Random()),
    Weighting("dwa", "dynamic weight average: weights from the tasks' loss-descent rates over the last two epochs (torchjd DWA)",
              "Liu, Johns & Davison, End-to-End Multi-Task Learning with Attention, CVPR 2019",
              lambda cfg, T: CheckpointedDWA(cfg["dwa_temperature"]), DWAOptions),
    Weighting("uw", "uncertainty weighting: learned per-task log-variances (torchjd UW)",
              "Kendall, Gal & Cipolla, Multi-Task Learning Using Uncertainty to Weigh Losses, CVPR 2018",
              lambda cfg, T: scalarization.UW(T), positive_losses=True),
    Weighting("mgda", "min-norm point of the convex hull of the task gradients (torchjd MGDA)",
              "Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018",
              lambda cfg, T: aggregation.MGDA()),
    Weighting("pcgrad", "projects each task gradient off the others it conflicts with (torchjd PCGrad)",
              "Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020", lambda cfg, T: aggregation.PCGrad()),
    Weighting("cagrad", "conflict-averse: best worst-case improvement near the mean gradient (torchjd CAGrad)",
              "Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021",
              lambda cfg, T: aggregation.CAGrad(c=cfg["cagrad_c"]), CAGradOptions),
    Weighting("imtl-g", "impartial: equal projections of the update on every task gradient (torchjd IMTLG)",
              "Liu et al., Towards Impartial Multi-task Learning, ICLR 2021", lambda cfg, T: aggregation.IMTLG()),
    Weighting("nash-mtl", "Nash bargaining solution over the task gradients (torchjd NashMTL)", _NAVON,
              lambda cfg, T: CheckpointedNashMTL(T, max_norm=cfg["nash_max_norm"],
                                                 update_weights_every=cfg["nash_update_every"],
                                                 optim_niter=cfg["nash_optim_niter"]),
              NashMTLOptions),
    Weighting("aligned-mtl", "aligns the task gradients' principal components (torchjd AlignedMTL)",
              "Senushkin et al., Independent Component Alignment for Multi-Task Learning, CVPR 2023",
              lambda cfg, T: aggregation.AlignedMTL()),
    Weighting("upgrad", "projects each task gradient onto the dual cone of all of them, then averages (torchjd UPGrad)",
              "Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, 2024",
              lambda cfg, T: aggregation.UPGrad()),
)

for _spec in WEIGHTINGS:
    register(Method(name=_spec.name, summary=_spec.summary, paper=_spec.paper, build=_checked_build(_spec),
                    options=_spec.options, overrides={"per_task_encoder": False},
                    priors={"z": "deterministic", "w": "deterministic"}, objective=_objective(_spec),
                    export=(CLASSIFIER_EXPORT,)))
