"""Gradient-weighting MTL baselines on ``bmtl``'s network, through torchjd.

Every method here trains exactly ``bmtl``'s model and guide (:mod:`pyromtl.latent`): one
shared encoder, one linear head per task, point estimates from ``deterministic`` priors on
``z`` and ``w``, with the same trainer, optimiser and step budget. Only the backward pass
differs. Each step reads the per-task losses ``ℓ_t`` from the model trace (the negative
log-likelihood of task t at the ``y`` site, summed over the batch with its ``N_t / B_t``
scale and padding mask) and combines them in one of two ways:

* **loss scalarisation**: a torchjd ``Scalarizer`` turns ``ℓ`` into one number whose
  ordinary backward sets every gradient, heads included (each with its task's weight):
  ``ls`` (``Sum``), ``rlw`` (``Random``), ``dwa`` (``DWA``) and ``uw`` (``UW``) come from
  ``torchjd.scalarization``; ``si`` is ``ScaleInvariant``, written here;
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

The torchjd code lives in :mod:`pyromtl.infer.weighting`, imported when a baseline is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pyromtl.base import is_point
from pyromtl.latent import CLASSIFIER_EXPORT, LatentOptions, build_latent
from pyromtl.method import Method, MethodContext
from pyromtl.objective import Objective


# ---------------------------------------------------------------------------- declarations
@dataclass
class WeightingOptions(LatentOptions):
    """``bmtl``'s options, plus whether the regression noise is learned (see the module doc)."""

    learn_noise: bool = False


@dataclass
class DWAOptions(WeightingOptions):
    MINIMA: ClassVar[dict[str, tuple[float, bool]]] = {"dwa_temperature": (0, False)}

    #: Softmax temperature of the loss-descent rates; the paper uses 2.
    dwa_temperature: float = 2.0


@dataclass
class CAGradOptions(WeightingOptions):
    #: Radius of CAGrad's ball around the average gradient, relative to its norm.
    cagrad_c: float = 0.4


@dataclass
class NashMTLOptions(WeightingOptions):
    MINIMA: ClassVar[dict[str, tuple[float, bool]]] = {"nash_update_every": (1, True), "nash_optim_niter": (1, True)}

    #: Largest norm of the aggregated gradient (0: no clipping), as in the paper's code.
    nash_max_norm: float = 1.0
    #: Re-solve the bargaining problem every this many steps (the paper's speed-up).
    nash_update_every: int = 1
    nash_optim_niter: int = 20


@dataclass(frozen=True)
class Weighting:
    """One baseline (its combiner is ``pyromtl.infer.weighting.COMBINERS[name]``)."""

    name: str
    summary: str
    paper: str
    options: type[WeightingOptions] = WeightingOptions
    #: The combiner takes logarithms of, or learns a weight against, the losses: they must stay positive.
    positive_losses: bool = False
    #: The fewest tasks its combiner is defined for (Nash-MTL's bargaining needs two players).
    min_tasks: int = 1


def _checked_build(spec: Weighting) -> Callable[..., tuple[Any, Any]]:
    """``bmtl``'s model and guide, refusing what would make them another network."""

    def build(ctx: MethodContext) -> tuple[Any, Any]:
        cfg = ctx.config
        if cfg["per_task_encoder"]:
            raise ValueError(
                f"method {spec.name!r} weights the gradients of one shared encoder; per_task_encoder must be false"
            )
        if not all(is_point(p) for p in cfg["priors"].values()):
            raise ValueError(
                f"method {spec.name!r} trains point estimates like bmtl: the priors of z and w must be 'deterministic'"
            )
        if cfg["learn_noise"] and spec.positive_losses:
            raise ValueError(
                f"method {spec.name!r} needs positive task losses, which a learned regression noise "
                "does not guarantee; keep learn_noise = false"
            )
        model, guide = build_latent(ctx)
        if not cfg["learn_noise"]:
            model.noise_unconstrained.requires_grad_(False)  # stays at its initial value, 1
        return model, guide

    return build


def _objective(ctx: MethodContext) -> Objective:
    from pyromtl.infer.weighting import weighting_objective  # torchjd loads its solvers: only when used

    method = ctx.method
    return weighting_objective(method.name, method.elbo(ctx)(ctx.model, ctx.guide), ctx.model, ctx.config)


_NAVON = "Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022"
WEIGHTINGS: tuple[Weighting, ...] = (
    Weighting(
        "ls",
        "linear scalarisation: the sum of the task losses (torchjd Sum)",
        "Caruana, Multitask Learning, Machine Learning 1997",
    ),
    Weighting(
        "si",
        "scale-invariant: the sum of the log task losses (written here as a torchjd Scalarizer)",
        _NAVON + " (SI baseline)",
        positive_losses=True,
    ),
    Weighting(
        "rlw",
        "random loss weighting: softmax of Gaussian weights drawn every step (torchjd Random)",
        "Lin et al., Reasonable Effectiveness of Random Weighting, TMLR 2022",
    ),
    Weighting(
        "dwa",
        "dynamic weight average: weights from the tasks' loss-descent rates over the last two epochs (torchjd DWA)",
        "Liu, Johns & Davison, End-to-End Multi-Task Learning with Attention, CVPR 2019",
        DWAOptions,
    ),
    Weighting(
        "uw",
        "uncertainty weighting: learned per-task log-variances (torchjd UW)",
        "Kendall, Gal & Cipolla, Multi-Task Learning Using Uncertainty to Weigh Losses, CVPR 2018",
        positive_losses=True,
    ),
    Weighting(
        "mgda",
        "min-norm point of the convex hull of the task gradients (torchjd MGDA)",
        "Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018",
    ),
    Weighting(
        "pcgrad",
        "projects each task gradient off the others it conflicts with (torchjd PCGrad)",
        "Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020",
    ),
    Weighting(
        "cagrad",
        "conflict-averse: best worst-case improvement near the mean gradient (torchjd CAGrad)",
        "Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021",
        CAGradOptions,
    ),
    Weighting(
        "imtl-g",
        "impartial: equal projections of the update on every task gradient (torchjd IMTLG)",
        "Liu et al., Towards Impartial Multi-task Learning, ICLR 2021",
    ),
    Weighting(
        "nash-mtl",
        "Nash bargaining solution over the task gradients (torchjd NashMTL)",
        _NAVON,
        NashMTLOptions,
        min_tasks=2,
    ),
    Weighting(
        "aligned-mtl",
        "aligns the task gradients' principal components (torchjd AlignedMTL)",
        "Senushkin et al., Independent Component Alignment for Multi-Task Learning, CVPR 2023",
    ),
    Weighting(
        "upgrad",
        "projects each task gradient onto the dual cone of all of them, then averages (torchjd UPGrad)",
        "Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, 2024",
    ),
)

METHODS: tuple[Method, ...] = tuple(
    Method(
        name=spec.name,
        summary=spec.summary,
        paper=spec.paper,
        build=_checked_build(spec),
        options=spec.options,
        overrides={"per_task_encoder": False},
        priors={"z": "deterministic", "w": "deterministic"},
        objective=_objective,
        export=(CLASSIFIER_EXPORT,),
        min_tasks=spec.min_tasks,
    )
    for spec in WEIGHTINGS
)
