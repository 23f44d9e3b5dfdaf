"""VMTL: variational multi-task learning with Gumbel-Softmax priors (Shen et al., NeurIPS 2021).

The model is the core latent model (:mod:`pyromtl.latent`) under L x M Monte-Carlo
plates (eq. 11), with conditional priors that mix the other tasks' variational posteriors:

* classifier (eq. 6–7): ``p(w_t) = sum_{i != t} alpha_ti q(w_i)``; the components are the other
  tasks' current posteriors with gradients stopped (they act as "the previous iteration");
* representation (eq. 9–10): ``p(z_tn | x_tn) = sum_{i != t} beta_ti q_phi(z | f(x_tn, D_i))``
  where ``f`` is cross-attention of ``x_tn`` over task i's training samples of the same class,
  encoded by the same inference network ``phi`` as the guide. Eq. 9 conditions on the previous
  iteration's ``phi``, so the components are computed without a graph by default;
  ``z_prior_grad = true`` lets gradients reach ``phi`` through them (a deviation, see docs/methods/vmtl.md).
  Encoding every ``f(x_tn, D_i)`` costs ``T·B·(T-1)`` encoder rows a step, quadratic in T; with
  ``z_components = k < T - 1`` each sample encodes k other tasks drawn uniformly without
  replacement, and the KL bound of eq. 11 is estimated without bias from them
  (:meth:`VMTLModel.z_prior_inputs`), which keeps the step linear in T.

The mixing weights and the KL treatment come from the prior specs (``task_mixture`` with
``weights = gumbel_softmax | learned | uniform`` and ``kl = upper_bound | monte_carlo``), so the
paper's ablations (Tables 1–2) are configuration, not code paths. α and β are recorded as the
deterministic sites ``w_weights`` and ``z_weights``, exported to ArviZ, and their expectations
are ``Fit.relatedness()``'s ``alpha`` and ``beta``. The logits π of α and β (eq. 7) are stepped by
an optimiser of their own at ``lr · mixture_lr_scale`` (:class:`MixtureLogitsObjective`; default 10,
a deviation: the paper trains every parameter with one Adam), so that α and β leave uniform
within a short run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from pyromtl.data.core import Batch, MultiTaskData
from pyromtl.guides.vmtl import AmortizedClassifier, MonteCarloDraws, VMTLGuide
from pyromtl.latent import (
    CLASSIFIER_EXPORT,
    VMTL_PAPER,
    ClassifierPosterior,
    LatentMTLModel,
    LatentOptions,
    tempered,
)
from pyromtl.method import ExportSite, Method, MethodContext
from pyromtl.nn import GaussianEncoder, cross_attention
from pyromtl.objective import Objective, TrainContext
from pyromtl.optim import ClippedAdam
from pyromtl.priors import PriorSite, mixture_weights, other_tasks, uses_components
from pyromtl.schedules import TrainState, as_schedule


class ClassAttention:
    """Precomputed ``f(x_tn, D_i)`` of eq. 10 for every training sample and every task i.

    ``f`` lives in input space, so it is computed once per dataset, one class at a time (a
    class's queries only attend over keys of that class, which bounds the memory of the
    score matrices even with DomainNet's 345 classes). The result ``[T, N, T, D]`` stays on the
    model's device unless it exceeds ``max_device_mb``; then it stays in host memory and each
    batch's rows are copied over. Regression tasks have no classes, so their queries attend
    over all of task i's training samples.
    """

    def __init__(self, data: MultiTaskData, device: torch.device, max_device_mb: float = 1024.0):
        if data.simo:
            raise ValueError("VMTL's representation prior needs MIMO data (each task has its own inputs)")
        xs, ys = [], []
        for t in range(data.num_tasks):  # data preparation: flatten each task's training split once
            idx = data.splits["train"][t]
            xs.append(data.x[t][idx].reshape(len(idx), -1))
            y = data.y[t][idx]
            # regression has no classes: every sample of task i is a key (one group)
            ys.append(torch.zeros(len(idx), dtype=torch.long) if data.task_types[t] == "regression" else y.long())
        T, D = data.num_tasks, xs[0].shape[1]
        n_max = max(len(x) for x in xs)
        out = torch.zeros(T, n_max, T, D)
        for c in torch.unique(torch.cat(ys)).tolist():
            members = [torch.nonzero(y == c).squeeze(1) for y in ys]
            # A task without class c falls back to all of its samples, so every component exists.
            members = [m if m.numel() else torch.arange(len(ys[i])) for i, m in enumerate(members)]
            n_c = max(m.numel() for m in members)
            keys = torch.zeros(T, n_c, D)
            mask = torch.zeros(T, n_c, dtype=torch.bool)
            for i, m in enumerate(members):
                keys[i, : m.numel()] = xs[i][m]
                mask[i, : m.numel()] = True
            for t in range(T):
                q_idx = torch.nonzero(ys[t] == c).squeeze(1)
                if q_idx.numel():
                    out[t, q_idx] = cross_attention(xs[t][q_idx], keys, mask)
        on_device = out.numel() * 4 / 2**20 <= max_device_mb
        self.device = device
        self.attended = out.to(device) if on_device else out.pin_memory() if device.type == "cuda" else out

    def __call__(self, index: torch.Tensor, tasks: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of a training batch (``index [T, B]``): ``[T, B, T, D]``, every task i.

        With ``tasks [T, B|1, C]`` (task i of each of C components), only those: ``[T, B, C, D]``.
        """
        T = index.shape[0]
        host = self.attended.device != index.device
        if host:
            index, tasks = index.cpu(), None if tasks is None else tasks.cpu()
        rows = torch.arange(T, device=index.device)
        if tasks is None:
            out = self.attended[rows[:, None], index]
        else:  # advanced indexing gathers just the C rows per sample, [T, B, C, D]
            out = self.attended[rows[:, None, None], index[:, :, None], tasks]
        return out.to(self.device, non_blocking=True) if host else out


class VMTLModel(MonteCarloDraws, LatentMTLModel):
    """VMTL's generative model: eq. 5 with the mixture priors of eq. 6 and 9."""

    def __init__(
        self,
        data: MultiTaskData,
        cfg: Mapping[str, Any],
        state: TrainState,
        encoder: GaussianEncoder,
        w_post: torch.nn.Module,
        device: torch.device,
        attention: ClassAttention,
    ):
        super().__init__(data, cfg, state, encoder, w_post, device)
        self.mc_z, self.mc_w = cfg["mc_z"], cfg["mc_w"]
        self.attention = attention
        self.z_prior_grad = cfg["z_prior_grad"]
        self.z_component_min_scale = cfg["z_component_min_scale"]
        self.z_num_components = _check_z_components(cfg, data.num_tasks)
        # [T, T-1]: row t lists the tasks i != t, whose components the z prior mixes (eq. 9)
        self._others = other_tasks(data.num_tasks, attention.device)

    def mixture_logits(self) -> list[torch.nn.Parameter]:
        """The learned logits π ``[T, T-1]`` of α and β (eq. 7), created now if no build made them yet.

        Created as ``task_mixture`` creates them (zeros: uniform weights), so the first build finds
        them; sites with ``weights = "uniform"`` or another prior kind (Table 1, 2 ablations) have none.
        """
        T = self.info.num_tasks
        out = []
        for site in (self.w_prior, self.z_prior):
            if site.spec.kind == "task_mixture" and site.spec.params["weights"] != "uniform":
                site.param("logits", torch.zeros(T, T - 1, device=site._anchor.device))
                out.append(site.params["logits"])
        return out

    def head(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """All L x M pairs: ``z [..., L, 1, T, B, d]`` and ``w [..., M, T, 1, K, d]`` give ``[..., L, M, T, B, K]``."""
        # One batched product per task over (L B) x (M K); a broadcast matmul would first copy z M times.
        w = w.squeeze(-3)
        w = w.reshape((1,) * (z.dim() - w.dim()) + w.shape)  # w's batch dims lack mc_z without outer plates
        return torch.einsum("...lotbd,...lmtkd->...lmtbk", z, w) + self.bias

    def w_components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every task's ``q(w_i)`` as a mixture component, ``[1, 1, T, K, d]``, gradients stopped (eq. 6)."""
        with torch.no_grad():  # no graph through VMTL-AC's network
            loc, scale = self.w_post()
        # no_grad() alone does not stop gradients here: ClassifierPosterior returns its loc
        # Parameter itself, a leaf that requires grad.
        return loc.detach().squeeze(1)[None, None], scale.detach().squeeze(1)[None, None]

    def z_component_tasks(self, batch: Batch) -> tuple[torch.Tensor, float]:
        """Which other tasks' components each training sample's z prior evaluates, and ``P(i ∈ S)``.

        With ``z_components = k >= T - 1``: every task i ≠ t, ``[T, 1, T-1]``, probability 1 (the
        exact eq. 9; the own task, whose weight is exactly 0, is skipped). With ``k < T - 1``: per
        sample, k distinct tasks drawn uniformly without replacement from the T - 1 others,
        ``[T, B, k]``, so each is drawn with probability ``k / (T-1)``. The draw is the top k of
        i.i.d. uniform keys: vectorised, and independent of every parameter (so the importance-
        weighted KL's gradient stays unbiased).
        """
        T, B = batch.num_tasks, batch.size
        others = self._others
        if others.device != batch.index.device:
            others = self._others = others.to(batch.index.device)
        k = self.z_num_components
        if k >= T - 1:
            return others[:, None, :], 1.0
        keys = torch.rand(T, B, T - 1, device=others.device)
        picked = keys.topk(k, dim=-1, sorted=False).indices  # k distinct positions among the T-1 others
        return others[:, None, :].expand(T, B, T - 1).gather(-1, picked), k / (T - 1)

    def z_prior_inputs(self, batch: Batch) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, dict[str, Any]]:
        """Components ``q_phi(z | f(x_tn, D_i))`` of z's prior (eq. 9–10) and their tasks, for ``task_mixture``.

        In training: ``(loc, scale)`` ``[T, B, C, d]`` for the C tasks of :meth:`z_component_tasks`,
        and the extras ``component_tasks`` and ``component_inclusion`` that tell the prior which
        column of β each component takes and how to weight it (``pyromtl.priors``: with
        ``C = k < T - 1``, ``β_ti (T-1)/k``, an unbiased estimate of eq. 11's ``Σ_i β_ti KL``).
        Only ``T·B·C`` rows are encoded, forward only unless ``z_prior_grad`` (eq. 9: the
        previous ``phi``), with the scales floored at ``z_component_min_scale``.

        Outside training the labels of a batch are not used: every component is then the
        sample's own ``q_phi(z | x)``, ``[T, B, T, d]`` (no extras), which leaves predictions
        untouched (they use the guide). A prior kind that reads no components (e.g. Table 1's
        ``deterministic`` z) gets none, and nothing is encoded for it.
        """
        T, B = batch.num_tasks, batch.size
        if not uses_components(self.z_prior.spec.kind):
            return None, {}  # e.g. Table 1's deterministic z: no attention or encoder pass for nothing
        if batch.split != "train":
            loc, scale = self.encoder(batch.x, batch.simo)
            return (loc.unsqueeze(-2).expand(T, B, T, -1), scale.unsqueeze(-2).expand(T, B, T, -1)), {}
        tasks, inclusion = self.z_component_tasks(batch)
        attended = self.attention(batch.index, tasks)  # [T, B, C, D]
        C = attended.shape[2]
        with torch.set_grad_enabled(self.z_prior_grad and torch.is_grad_enabled()):
            # the attention works on flattened inputs; the encoder reads them in their own shape
            loc, scale = self.encoder(attended.reshape(T, B * C, *self.info.input_shape), False)
        components = loc.reshape(T, B, C, -1), scale.clamp_min(self.z_component_min_scale).reshape(T, B, C, -1)
        return components, {"component_tasks": tasks, "component_inclusion": inclusion}


def _check_z_components(cfg: Mapping[str, Any], num_tasks: int) -> int:
    """``z_components`` as an int, or a ``ValueError`` naming what is wrong with it."""
    k = cfg["z_components"]
    if k < 1:
        raise ValueError(
            f"config key 'z_components' must be at least 1 (other tasks' components per sample in the "
            f"z prior's KL estimate), got {k}"
        )
    z_prior = cfg["priors"]["z"]
    if k < num_tasks - 1 and z_prior.get("kind") == "task_mixture" and z_prior.get("kl") == "monte_carlo":
        raise ValueError(
            f"priors.z.kl = 'monte_carlo' needs every other task's component, but z_components = {k} < "
            f"T - 1 = {num_tasks - 1}; set z_components >= {num_tasks - 1} or use kl = 'upper_bound'"
        )
    return k


# ---------------------------------------------------------------------------- declarations
@dataclass
class VMTLOptions(LatentOptions):
    """VMTL's options: the baselines' plus its Monte-Carlo draws and the VMTL-AC switch."""

    MINIMA: ClassVar[dict[str, tuple[float, bool]]] = {
        "mc_z": (1, True),
        "mc_w": (1, True),
        "z_components": (1, True),
        "mixture_lr_scale": (0.0, False),
    }

    mc_z: int = 10  # L draws of each z (eq. 11)
    mc_w: int = 10  # M draws of each w
    amortized_classifier: bool = False  # VMTL-AC
    ac_min_scale: float = 0.2  # floor of the amortised classifier's scales (guides/vmtl.py)
    attention_max_mb: float = 1024.0  # the precomputed attention stays on the device up to this size
    z_prior_grad: bool = False  # True: gradients reach phi through the z prior's components (not eq. 9)
    z_component_min_scale: float = 1.0  # floor on the z prior's component scales (docs/methods/vmtl.md: deviations)
    #: k other tasks' components per sample in the z prior (eq. 9). k >= T-1: all of them, exact;
    #: k < T-1: k drawn at random, the KL bound (eq. 11) estimated without bias at T·B·k encoder rows.
    z_components: int = 8
    #: Learning rate of the mixture logits π of α and β (eq. 7) as a multiple of ``lr`` (a
    #: separate ClippedAdam, :class:`MixtureLogitsObjective`); 1: one optimiser for everything, as
    #: in the paper. Adam's steps do not grow with the gradient, so the logits move at most about
    #: ``lr`` a step, too little for α to leave uniform in a 100-step run (docs: VMTL, relatedness).
    mixture_lr_scale: float = 10.0


class MixtureLogitsObjective(Objective):
    """VMTL's ELBO (eq. 11), with the mixture logits π of α and β (eq. 7) on an optimiser of their own.

    The loss and every gradient are the ELBO's, unchanged; only the step differs. The trainer's
    ClippedAdam updates everything but the logits (``own_parameters``); after each of its
    steps a second ClippedAdam, with ``lr · mixture_lr_scale`` and otherwise the trainer's
    settings (``clip_norm``, ``lr_decay``, ``weight_decay``), updates the logits from the same
    step's gradients. Adam's step is about ``lr`` whatever the gradient's size, so neither the
    KL tempering ``kl_weights`` nor a gradient multiplier can speed α up; a learning rate can.
    With ``mixture_lr_scale = 1`` the objective owns nothing and the trainer's optimiser steps
    the logits too, as in the paper (one Adam for all parameters).
    """

    def __init__(self, loss: torch.nn.Module, cfg: Mapping[str, Any]):
        super().__init__(loss)
        scale = cfg["mixture_lr_scale"]  # checked > 0 by config.resolve (VMTLOptions.MINIMA)
        self.logits = self.model.mixture_logits() if scale != 1 else []
        self.logit_optim = (
            ClippedAdam(
                self.logits,
                lr=cfg["lr"] * scale,
                clip_norm=cfg["clip_norm"],
                lrd=cfg["lr_decay"],
                weight_decay=cfg["weight_decay"],
            )
            if self.logits
            else None
        )

    def own_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.logits)

    def after_step(self, ctx: TrainContext) -> None:
        if self.logit_optim is None:
            return
        if self.group is not None:  # the global batch's gradient, as the trainer's parameters get
            self.group.mean_gradients(self.logits, torch.zeros((), device=ctx.device))
        self.logit_optim.step()
        self.logit_optim.zero_grad(set_to_none=True)

    def get_extra_state(self) -> dict[str, Any]:
        return {"logit_optim": self.logit_optim.state_dict() if self.logit_optim is not None else None}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if self.logit_optim is not None and state.get("logit_optim") is not None:
            self.logit_optim.load_state_dict(state["logit_optim"])


def vmtl_objective(ctx: MethodContext) -> Objective:
    """The ELBO with the mixture logits on their own learning rate (:class:`MixtureLogitsObjective`)."""
    return MixtureLogitsObjective(ctx.method.elbo(ctx)(ctx.model, ctx.guide), ctx.config)


def build_vmtl(ctx: MethodContext) -> tuple[VMTLModel, VMTLGuide]:
    """VMTL (and VMTL-AC when ``amortized_classifier``): mixture priors over the other tasks."""
    data, cfg, state, device = ctx.data, ctx.config, ctx.state, ctx.device
    info = data.info
    _check_z_components(cfg, info.num_tasks)  # before the attention's one-off precomputation
    encoder = GaussianEncoder(
        info.num_tasks, info.input_shape, cfg["hidden"], cfg["latent_dim"], cfg["activation"], backbone=ctx.backbone
    ).to(device)
    w_post: torch.nn.Module
    if cfg["amortized_classifier"]:
        w_post = AmortizedClassifier(
            data, encoder, cfg["hidden"], cfg["activation"], device, min_scale=cfg["ac_min_scale"]
        ).to(device)
    else:
        w_post = ClassifierPosterior(info.num_tasks, info.out_dim, cfg["latent_dim"]).to(device)
    attention = ClassAttention(data, device, cfg["attention_max_mb"])
    model = VMTLModel(data, cfg, state, encoder, w_post, device, attention=attention)
    guide = VMTLGuide(data, cfg, state, encoder, w_post, device)
    return model, guide


def expected_weights(site: PriorSite, num_tasks: int | None = None) -> torch.Tensor:
    """The ``[T, T]`` expected mixing weights of a ``task_mixture`` site, detached (for relatedness).

    ``softmax(π_t)`` over the other tasks for ``gumbel_softmax`` (the Gumbel-Softmax's class
    probabilities, eq. 7) and ``learned``; ``1 / (T-1)`` for ``uniform``. The diagonal is 0.
    """
    if site.spec.kind != "task_mixture":
        raise ValueError(f"site {site.site!r} has prior kind {site.spec.kind!r}, not 'task_mixture'")
    T = num_tasks if num_tasks is not None else site.num_tasks
    if T is None:
        raise ValueError(f"site {site.site!r} has not been built yet; pass num_tasks")
    mode = site.spec.params["weights"]
    if mode != "uniform" and "logits" not in site.params:
        raise ValueError(f"site {site.site!r} has no learned weights yet; build the prior once first")
    logits = None if mode == "uniform" else site.params["logits"].detach()
    return mixture_weights(
        "uniform" if mode == "uniform" else "learned",
        T,
        logits,
        device=site._anchor.device,
        dtype=torch.get_default_dtype(),
    )


def _mixture_sites(model) -> dict[str, PriorSite]:
    """α's and β's prior sites; the Table 1 ablations give a site another prior kind (no weights)."""
    sites = {"alpha": model.w_prior, "beta": model.z_prior}
    return {k: s for k, s in sites.items() if s.spec.kind == "task_mixture"}


def vmtl_relatedness(ctx: MethodContext) -> dict[str, np.ndarray]:
    """Expected mixing weights: α (classifier prior, eq. 7) and β (representation prior, eq. 9)."""
    return {k: expected_weights(s).cpu().numpy() for k, s in _mixture_sites(ctx.model).items()}


def _weight_draws(which: str):
    """Draws of α or β as the model samples them at its current step; None for an ablated site."""

    def draw(ctx: MethodContext, n: int) -> torch.Tensor | None:
        model = ctx.model
        site = _mixture_sites(model).get(which)
        if site is None:
            return None
        if site.num_tasks is None:
            raise ValueError(f"site {site.site!r} has not been built yet; build the prior once first")
        logits = site.params["logits"].detach() if "logits" in site.params else None
        tau = model.state.value(as_schedule(site.spec.params["temperature"]))
        return mixture_weights(
            site.spec.params["weights"],
            site.num_tasks,
            logits,
            tau,
            (n,),
            device=site._anchor.device,
            dtype=torch.get_default_dtype(),
        )

    return draw


_MIXTURE = {
    "kind": "task_mixture",
    "weights": "gumbel_softmax",
    "temperature": {"start": 5.0, "end": 0.5, "decay_fraction": 0.25},
    "kl": "upper_bound",
}
METHODS: tuple[Method, ...] = tuple(
    Method(
        name=name,
        summary=summary,
        paper=VMTL_PAPER,
        build=build_vmtl,
        options=VMTLOptions,
        objective=vmtl_objective,
        overrides={
            **tempered(1e-2),
            "amortized_classifier": amortized,
            "eval_samples": 2,
        },  # each draw already averages L x M = 100 inner pairs
        priors={"z": dict(_MIXTURE), "w": dict(_MIXTURE)},
        settings=("mimo",),
        min_tasks=2,
        max_plate_nesting=4,
        relatedness=vmtl_relatedness,
        relatedness_titles={
            "alpha": "α: classifier-prior mixing weights",
            "beta": "β: representation-prior mixing weights",
        },
        export=(
            CLASSIFIER_EXPORT,
            ExportSite("w_weights", ("task", "other_task"), _weight_draws("alpha")),
            ExportSite("z_weights", ("task", "other_task"), _weight_draws("beta")),
        ),
    )
    for name, amortized, summary in (
        ("vmtl", False, "VMTL: Gumbel-Softmax mixture priors over the other tasks' posteriors for z and w"),
        ("vmtl-ac", True, "VMTL-AC: VMTL with an amortised classifier from per-class mean representations"),
    )
)
