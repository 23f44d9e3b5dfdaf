"""Safe multi-task learning (Guo, Ye, Zhang): SMTL, L-SMTL, SMTL_c and L-SMTL_c as Pyro models.

Every task ``t`` has a private encoder ``f_t`` and a private decoder ``h_t``; all tasks share a
public encoder ``f_S``. A gate per task, ``α_t = sigmoid(logit_t) ∈ [0, 1]`` (the weight of the
public side), mixes them:

=============  ==========================================================  ===========
method         output of task t                                            gate
=============  ==========================================================  ===========
``smtl``       ``h_t(α_t f_S(x) + (1 − α_t) f_t(x))`` (eq. 1)               soft ``α_t``
``lsmtl``      the same with ``α̃_t ∈ {0, 1}`` (eq. 3–4)                     straight-through
``smtl-c``     ``α_t h_{S,t}(f_S(x)) + (1 − α_t) h_t(f_t(x))`` (§3.4)       soft ``α_t``
``lsmtl-c``    the same with ``α̃_t ∈ {0, 1}``                               straight-through
=============  ==========================================================  ===========

The lite gates are ``RelaxedBernoulliStraightThrough(τ, probs=α_t)`` draws while gradients are
computed (a training step): hard in the forward pass, the relaxed sample's gradient in the
backward pass (eq. 4), with ``τ`` a schedule (``temperature``). A prediction (no gradient) uses
the paper's test-time gate ``1[α_t > 0.5]`` (§4, the discussion of Table 5: public when α_t "is
larger than 0.5", otherwise private, so a gate at exactly 0.5, where every gate starts, is
private), which :func:`export_pruned` turns into a network holding only the chosen encoders and
decoders (Fig. 1, right). The gate is recorded as the deterministic site ``gate``.

The gate logits have their own Adam (``gate_lr``, default 3e-2, ten times the trainer's ``lr``;
a schedule), in the joint objective of eq. 2 as in the bi-level one. Under Adam a parameter moves
by about one step size per step at most, whatever its gradient's size, and the logit's gradient
changes sign from batch to batch: in the trainer's optimiser (``lr`` 3e-3) the gates stayed at
α_t = 0.37-0.54 after 1,000 steps and never decided. The soft gates start at the tie (0.5); the
lite ones at ``α_t = 0.25`` (:class:`LiteSMTLOptions`), since a straight-through draw trains only
the side it picks. Both are our choices, beyond the paper (which gives neither);
``examples/smtl_gates.py`` measures them.

By default everything is a point estimate (the prior of ``gate`` is ``deterministic``), so the
ELBO is the log-likelihood of eq. 2, summed over tasks where eq. 2 averages them (a constant
factor ``m``; the authors' code sums too). Beyond the paper, the prior
``priors.gate.kind = "relaxed_bernoulli"`` (``probs = 0.5`` by default, at the gate's ``τ``)
makes the gate a latent site with the posterior ``q(g_t) = RelaxedBernoulli[StraightThrough](τ,
logits=logit_t)`` and a Monte-Carlo KL in the ELBO; predictions then average over gate draws.
``gates = "bilevel"`` learns the gates on a part of val (eq. 6, §4.4) with their own optimiser in
:class:`GateObjective`; the rest of val stays for model selection.

The encoders are the run's backbone (:mod:`pyromtl.backbones`: an MLP by default, or the user's
network) then the ``hidden`` layers; the decoders are MLPs (``decoder_hidden``) unless ``decoder``
names a network registered with :func:`pyromtl.networks.register` (``factory(in_dim, out_dim) ->
nn.Module``). Private copies of a user's network run together through
:class:`~pyromtl.nn.TaskStack` (``torch.vmap``), never in a task loop.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyromtl import networks
from pyromtl.base import MultiTaskModel, Plates, is_point
from pyromtl.data.core import Batch, MultiTaskData
from pyromtl.guides.smtl import GateGuide
from pyromtl.method import ExportSite, Method, MethodContext
from pyromtl.nn import Backbone, TaskMLP, TaskStack
from pyromtl.objective import Objective, TrainContext
from pyromtl.options import NetworkOptions, ScheduleValue
from pyromtl.plots import plot_gates
from pyromtl.priors import PriorSite
from pyromtl.schedules import TrainState, as_schedule

#: The part of val that trains the bi-level gates (eq. 6); model selection uses the rest.
GATE_SPLIT = "gates"
GATE_MODES = ("joint", "bilevel")


# ---------------------------------------------------------------------------- networks
def task_net(network: str, num_tasks: int, in_dim: int, hidden: list[int], out_dim: int, act: str) -> nn.Module:
    """One decoder per task, evaluated in one batched call (``TaskMLP`` or a :class:`~pyromtl.nn.TaskStack`)."""
    if not network:
        return TaskMLP(num_tasks, in_dim, hidden, out_dim, act)
    make = networks.get(network)
    return TaskStack([make(in_dim, out_dim) for _ in range(num_tasks)])


def select_tasks(module: nn.Module, index: torch.Tensor) -> nn.Module:
    """A copy of a task-stacked network (every parameter and buffer ``[T, ...]``) with the tasks in ``index`` only."""
    out = copy.deepcopy(module)
    for t in (*out.parameters(), *out.buffers()):
        t.data = t.data[index].clone()
    return out


# ---------------------------------------------------------------------------- gates
def relaxed_gate(logits: torch.Tensor, tau: torch.Tensor, lite: bool) -> dist.RelaxedBernoulli:
    """The relaxed gate of eq. 4 at temperature ``tau`` (lite: straight-through, a hard forward draw)."""
    kind = dist.RelaxedBernoulliStraightThrough if lite else dist.RelaxedBernoulli
    return kind(tau, logits=logits)


def straight_through_gate(logit: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """A lite gate ``[T]``: a straight-through draw (eq. 3–4) while gradients are computed,
    the test-time gate ``1[α_t > 0.5]`` otherwise (§4, Table 5's discussion: α_t = 0.5 is private)."""
    if torch.is_grad_enabled():
        return relaxed_gate(logit, tau, lite=True).rsample()
    # decided on α_t as reported (relatedness, ArviZ), not on the logit: a logit just above 0 whose
    # α_t rounds to 0.5 stays private, as its reported α_t says
    return (torch.sigmoid(logit) > 0.5).to(logit.dtype)


def mix_encoders(gate: torch.Tensor, public: torch.Tensor, private: torch.Tensor) -> torch.Tensor:
    """Eq. 1's ``α_t f_S(x) + (1 − α_t) f_t(x)`` (§3.4: the same on outputs): gates ``[..., T]``,
    ``public [B, *feat]`` or ``[T, B, *feat]``, ``private [T, B, *feat]``; output
    ``[..., T, B, *feat]``, for vector and feature-map features alike."""
    g = gate.reshape(*gate.shape, *(1,) * (private.dim() - 1))
    return g * public + (1 - g) * private


# ---------------------------------------------------------------------------- model
class SMTLModel(MultiTaskModel):
    """``p(y | x) = prod_t p(y_t | out_t(x))`` with ``out_t`` of eq. 1 (or §3.4 for ``combine="outputs"``)."""

    def __init__(
        self,
        data: MultiTaskData,
        cfg: Mapping[str, Any],
        state: TrainState,
        device: torch.device,
        *,
        lite: bool,
        combine: str,
        backbone: Backbone,
    ):
        info = data.info.to(device)
        super().__init__(info, state, cfg["kl_weight"])
        T, K, d, act = info.num_tasks, info.out_dim, cfg["latent_dim"], cfg["activation"]
        self.lite, self.combine = lite, combine
        self.temperature = as_schedule(cfg["temperature"])
        self.gate_prior = None if is_point(cfg["priors"]["gate"]) else PriorSite("gate", cfg["priors"]["gate"], device)
        self.gate_logit = nn.Parameter(
            torch.full((T,), math.log(cfg["gate_init"] / (1 - cfg["gate_init"])), device=device)
        )
        self.public = backbone.shared(info.input_shape, cfg["hidden"], d, act).to(device)
        # every parameter [T, ...], so that pruning can keep some tasks' encoders (select_tasks)
        self.private = backbone.per_task(T, info.input_shape, cfg["hidden"], d, act, sliceable=True).to(device)
        self.decoder = task_net(cfg["decoder"], T, d, cfg["decoder_hidden"], K, act).to(device)
        # SMTL_c: a public decoder h_{S,t} per task on f_S (§3.4)
        self.public_decoder = (
            task_net(cfg["decoder"], T, d, cfg["decoder_hidden"], K, act).to(device) if combine == "outputs" else None
        )

    def alpha(self) -> torch.Tensor:
        """``α_t`` ``[T]``: the weight of the public side (eq. 1)."""
        return torch.sigmoid(self.gate_logit)

    def tau(self) -> torch.Tensor:
        return torch.tensor(self.state.value(self.temperature), device=self.info.type_code.device)

    def gate_distribution(self, logits: torch.Tensor) -> dist.RelaxedBernoulli:
        """The relaxed gate of eq. 4 (lite: straight-through, a hard forward draw)."""
        return relaxed_gate(logits, self.tau(), self.lite)

    def gate(self) -> torch.Tensor:
        """The point-estimate gate ``[T]`` of this pass: ``α_t``; lite: a straight-through draw
        (eq. 3–4) while training, ``1[α_t > 0.5]`` when predicting (§4)."""
        return straight_through_gate(self.gate_logit, self.tau()) if self.lite else self.alpha()

    def gate_draws(self, n: int) -> torch.Tensor:
        """``n`` posterior draws of the gates ``[n, T]``: a Bayesian gate's relaxed draws at the
        current ``τ``; otherwise the point estimate that predictions use (α, or the hard lite
        gate), repeated."""
        if self.gate_prior is None:
            with torch.no_grad():
                return self.gate().expand(n, -1)
        return self.gate_distribution(self.gate_logit).sample((n,))

    def outputs(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Head outputs ``[..., T, B, K]`` of inputs ``x [B, *input_shape]`` under gates ``[..., T]``."""
        public, private = self.public(x), self.private(x)  # [B, d], [T, B, d]
        if self.combine != "outputs":
            return self.decoder(mix_encoders(gate, public, private))
        public_decoder = self.public_decoder
        if public_decoder is None:  # built with combine = "outputs"
            raise RuntimeError("SMTL_c has no public decoder")
        return mix_encoders(gate, public_decoder(public), self.decoder(private))

    def forward(self, batch: Batch) -> None:
        plates = Plates(batch)
        T = self.info.num_tasks
        if self.gate_prior is None:
            gate = self.gate()
            with plates.globals():
                pyro.deterministic("gate", gate[:, None])
        else:
            with plates.globals(), self.kl_scope("gate"):
                prior = self.gate_prior.build(
                    batch_shape=(T, 1),
                    event_shape=(),
                    num_tasks=T,
                    state=self.state,
                    extras={"temperature": self.tau()},
                )
                gate = pyro.sample("gate", prior).squeeze(-1)  # [..., T]
        out = self.outputs(batch.x, gate)
        with plates.observations():
            self.observe(out, batch)


# ---------------------------------------------------------------------------- pruning
class PrunedSMTL(nn.Module):
    """A lite SMTL network at inference (Fig. 1, right): the public encoder if any task chose it, the
    chosen private encoders, and their decoders; nothing else is kept or run.

    ``forward(x [B, ...]) -> [T, B, K]``, the gated model's head outputs under hard gates.
    """

    order: torch.Tensor  # a buffer

    def __init__(self, model: SMTLModel, gate: torch.Tensor):
        super().__init__()
        chosen = gate.bool()
        pub, priv = chosen.nonzero().flatten(), (~chosen).nonzero().flatten()
        head = model.public_decoder if model.public_decoder is not None else model.decoder
        self.public = copy.deepcopy(model.public) if len(pub) else None
        self.public_decoder = select_tasks(head, pub) if len(pub) else None
        self.private = select_tasks(model.private, priv) if len(priv) else None
        self.decoder = select_tasks(model.decoder, priv) if len(priv) else None
        self.register_buffer("order", torch.argsort(torch.cat([pub, priv])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        # each encoder is kept with its decoder, or neither is
        if self.public is not None and self.public_decoder is not None:
            parts.append(self.public_decoder(self.public(x)))
        if self.private is not None and self.decoder is not None:
            parts.append(self.decoder(self.private(x)))
        return torch.cat(parts)[self.order]


def prune(model: SMTLModel) -> PrunedSMTL:
    """The pruned network of a lite model at its test-time gates ``1[α_t > 0.5]`` (§4, Fig. 1 right)."""
    if not model.lite:
        raise ValueError(
            "soft SMTL gates mix both encoders of every task, so nothing can be pruned; "
            "fit a lite variant (lsmtl, lsmtl-c)"
        )
    with torch.no_grad():
        return PrunedSMTL(model, model.gate()).eval()


def export_pruned(ctx: MethodContext) -> PrunedSMTL:
    """``Fit.export_pruned()``: :func:`prune` of the fitted model."""
    return prune(ctx.model)


# ---------------------------------------------------------------------------- objective
class GateObjective(Objective):
    """The log-likelihood of eq. 2; with ``gates = "bilevel"`` the upper level of eq. 6 as well.

    The gate logits always have their own Adam at ``gate_lr`` (:meth:`own_parameters` keeps them
    out of the trainer's optimiser). Joint (eq. 2): it steps after each training step on the
    gradient that step's backward pass left on the logits, the same objective as the rest of
    the network at the gates' own step size. Under Adam a parameter moves at most about one
    learning rate per step whatever its gradient's size, so at the trainer's ``lr`` a logit
    cannot cross more than ``lr × steps`` (3 at 1,000 steps of 3e-3) and in practice, with a
    gradient whose sign flips from batch to batch, moves far less (``examples/smtl_gates.py``).
    Bi-level: after each training step, one step moves the gates on a batch of the ``gates``
    split (carved out of val by :func:`carve_gate_split`).
    """

    def __init__(self, loss: nn.Module, cfg: Mapping[str, Any], task_names: list[str] | None = None):
        super().__init__(loss)
        if cfg["gates"] not in GATE_MODES:
            raise ValueError(f"gates must be one of {GATE_MODES}, got {cfg['gates']!r}")
        self.bilevel = cfg["gates"] == "bilevel"
        self.gate_batch_size = cfg["batch_size"]
        self.gate_lr = as_schedule(cfg["gate_lr"])
        self.gate_optim = torch.optim.Adam([self.model.gate_logit], lr=self.model.state.value(self.gate_lr))
        self.task_names = list(task_names) if task_names is not None else None

    def _gate_step(self) -> None:
        for group in self.gate_optim.param_groups:  # the schedule's value at this step
            group["lr"] = self.model.state.value(self.gate_lr)
        self.gate_optim.step()

    def own_parameters(self) -> list[nn.Parameter]:
        return [self.model.gate_logit]

    def after_step(self, ctx: TrainContext) -> None:
        logit = self.model.gate_logit
        if not self.bilevel:  # eq. 2: the training step's own gradient on the logits
            if logit.grad is None:
                return
            if self.group is not None:  # the global batch's gradient: the mean of the shards'
                self.group.mean_([logit.grad])
            self._gate_step()
            logit.grad = None  # the trainer's zero_grad does not reach the gates' optimiser
            return
        batch = ctx.data.train_batch(self.gate_batch_size, ctx.generator, ctx.device, split=GATE_SPLIT)
        # only the gates move here: the lower-level parameters' gradients are not even formed
        if self.group is None:
            (logit.grad,) = torch.autograd.grad(self.loss(batch), [logit])
        else:  # the global gate batch's gradient: the mean of the shards'
            (logit.grad,) = torch.autograd.grad(self.loss(self.group.shard(batch)), [logit])
            self.group.mean_([logit.grad])
        self._gate_step()

    def diagnostics(self) -> dict[str, float]:
        """``α_t`` per task (``alpha/<task>``), logged into the run's history over training."""
        alpha = self.model.alpha().detach().cpu().tolist()
        names = self.task_names or [str(t) for t in range(len(alpha))]
        return {f"alpha/{name}": float(a) for name, a in zip(names, alpha, strict=True)}

    def get_extra_state(self) -> dict[str, Any]:
        return {"gate_optim": self.gate_optim.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("gate_optim") is not None:  # a checkpoint from before the joint gates had their own
            self.gate_optim.load_state_dict(state["gate_optim"])


def carve_gate_split(ctx: MethodContext) -> MultiTaskData:
    """Bi-level only: split val at random (seeded) into ``gates`` (the gates' data, eq. 6) and a
    smaller ``val`` (``selection_fraction`` of it) that model selection uses and the gates never see."""
    data, cfg = ctx.data, ctx.config
    if cfg["gates"] != "bilevel":
        return data
    val = data.splits["val"][0]  # SIMO: every task shares its rows
    order = val[torch.randperm(len(val), generator=torch.Generator().manual_seed(cfg["seed"]))]
    keep = round(len(val) * cfg["selection_fraction"])
    if keep < 1 or keep >= len(val):
        raise ValueError(
            f"bi-level gates need val rows both for the gates and for model selection; {data.name!r} "
            f"has {len(val)} val rows and selection_fraction = {cfg['selection_fraction']}"
        )
    selection, gates = order[:keep].sort().values, order[keep:].sort().values
    T = data.num_tasks
    return replace(data, splits={**data.splits, "val": [selection] * T, GATE_SPLIT: [gates] * T}, _cache={})


# ---------------------------------------------------------------------------- declarations
@dataclass
class SMTLOptions(NetworkOptions):
    """Options of the SMTL family: the public and private encoders are the backbone, then
    ``hidden`` layers to ``latent_dim``."""

    MINIMA: ClassVar[dict[str, tuple[float, bool]]] = {"temperature": (0, False), "gate_lr": (0, False)}

    #: Hidden layers of the decoders; none: a linear head, as ``stl``/``bmtl`` have.
    decoder_hidden: list[int] = field(default_factory=list)
    #: A network registered with ``pyromtl.networks.register`` (by name, ``factory(in_dim, out_dim)``)
    #: for the decoders; empty: an MLP.
    decoder: str = ""
    #: ``α_t`` at the start, in (0, 1): the tie for the soft gates; the lite variants start towards
    #: their private side (:class:`LiteSMTLOptions`).
    gate_init: float = 0.5
    #: ``τ`` of the straight-through gates (lite variants; the authors use 0.1); a schedule anneals it.
    temperature: ScheduleValue = 0.1
    #: ``joint`` (eq. 2: the gates learn on train) or ``bilevel`` (eq. 6: on a part of val).
    gates: str = "joint"
    #: The step size of the gates' own Adam, in both modes (a schedule: e.g. held at a small value
    #: while the encoders warm up). Adam moves a logit by at most about this much per step, so at
    #: the trainer's ``lr`` (3e-3, where the gates were before) α_t stayed at 0.37-0.54 in 1,000
    #: steps; 10× that lets them decide (``examples/smtl_gates.py``).
    gate_lr: ScheduleValue = 3e-2
    #: Bi-level: the share of val kept for model selection; the gates learn on the rest.
    selection_fraction: float = 0.5

    @classmethod
    def validate(cls, cfg: Mapping[str, Any]) -> None:
        super().validate(cfg)
        if not 0.0 < cfg["gate_init"] < 1.0:
            raise ValueError(f"config key 'gate_init' must be in (0, 1) (α_t at the start), got {cfg['gate_init']}")
        # names only: a network is looked up in the registry the user's own module filled
        networks.check("decoder", cfg["decoder"])


@dataclass
class LiteSMTLOptions(SMTLOptions):
    """The lite variants' options: as :class:`SMTLOptions`, but the gates start at ``α_t = 0.25``
    (logit −ln 3), towards the private side.

    A straight-through gate (eq. 3-4) trains only the side it draws, so at the tie whichever side
    fits faster early on, in practice the public one (it learns from every task that draws it),
    is drawn more, trained more and chosen for good; started private-leaning, a task's gate
    turns public only where the public side's training loss wins against a private encoder that
    trains in most steps. Beyond the paper, which states no initial value (``examples/smtl_gates.py``
    measures both).
    """

    gate_init: float = 0.25


def _builder(lite: bool, combine: str) -> Callable[[MethodContext], tuple[SMTLModel, GateGuide]]:
    def build(ctx: MethodContext) -> tuple[SMTLModel, GateGuide]:
        data, cfg, state, device = ctx.data, ctx.config, ctx.state, ctx.device
        model = SMTLModel(data, cfg, state, device, lite=lite, combine=combine, backbone=ctx.backbone)
        return model, GateGuide(data, cfg, state, model, device)

    return build


def gate_objective(ctx: MethodContext) -> GateObjective:
    return GateObjective(ctx.method.elbo(ctx)(ctx.model, ctx.guide), ctx.config, ctx.data.task_names)


def gate_relatedness(ctx: MethodContext) -> dict[str, np.ndarray]:
    """``{"gates": diag(α_t)}``: the gates are one number per task, shown on the diagonal (with a
    Bayesian gate, ``α_t`` is its posterior's ``probs``)."""
    return {"gates": np.diag(ctx.model.alpha().cpu().numpy())}


def gate_plots(ctx: MethodContext) -> dict[str, Any]:
    """α_t as bars (the relatedness matrix holds them on its diagonal only), drawn when written."""
    gates = (ctx.doc.get("relatedness") or {}).get("gates")
    if gates is None:
        return {}
    alpha, names = np.diag(np.asarray(gates, dtype=np.float64)), list(ctx.doc["tasks"])
    return {"relatedness_gates.png": lambda: plot_gates(alpha, names, "gate α_t: the weight of the public side")}


def _gate_draws(ctx: MethodContext, n: int) -> torch.Tensor:
    return ctx.model.gate_draws(n)


GATE_EXPORT = ExportSite("gate", ("task",), _gate_draws)
PAPER = "Guo, Ye, Zhang, Safe Multi-Task Learning, arXiv:2111.10601"

METHODS: tuple[Method, ...] = tuple(
    Method(
        name=name,
        summary=summary,
        paper=PAPER,
        build=_builder(lite, combine),
        options=LiteSMTLOptions if lite else SMTLOptions,
        priors={"gate": "deterministic"},
        settings=("simo",),
        objective=gate_objective,
        relatedness=gate_relatedness,
        relatedness_titles={"gates": "gate α_t (weight of the public side)"},
        export=(GATE_EXPORT,),
        plots=gate_plots,
        prepare_data=carve_gate_split,
        export_pruned=export_pruned,
    )
    for name, lite, combine, summary in (
        ("smtl", False, "encoders", "safe MTL: learned α_t mixes a public and a private encoder per task (eq. 1)"),
        ("lsmtl", True, "encoders", "lite SMTL: straight-through binary gates pick one encoder per task (eq. 3-4)"),
        ("smtl-c", False, "outputs", "SMTL_c: learned α_t mixes a public and a private decoder's outputs (§3.4)"),
        ("lsmtl-c", True, "outputs", "lite SMTL_c: straight-through binary gates pick one output per task (§3.4)"),
    )
)
