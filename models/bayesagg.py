"""BayesAgg-MTL (Achituve et al., Bayesian Uncertainty for Gradient Aggregation in Multi-Task
Learning, ICML 2024) as a pyromtl method.

A shared deterministic extractor ``h(x)`` feeds one linear head ``θ_t`` per task (bias last, see
``guides/bayesagg.py`` for the layout). The Pyro model is the Bayesian last layer:
``θ ~ p(θ)`` (a prior kind from the registry) and ``y ~ p(y | h(x), θ)``; its guide is the
analytic batch posterior (eq. 2 for regression, eq. 8–10 for classification).

**The network is the baselines'.** ``ls`` and the eleven other weighting baselines
(:mod:`models.weighting`) train ``bmtl``'s network: a shared encoder whose ``loc`` half is the
representation ``z``, linear after its last layer, and a linear head ``[w, b]`` per task. BayesAgg
builds the same layers from the same random numbers (:class:`BayesAggModel`), with ``h = z``: no
activation after the latent layer. BayesAgg used to put an ELU there, which the baselines never
had; a check found that it gave about half of BayesAgg's gain over ``ls`` on ``digits-mixed``. We
dropped it from BayesAgg rather than give all thirteen methods a ``latent_activation`` option:
the baselines and their recorded results stay as they are, and a comparison with any of them at
the defaults measures the aggregation alone. Its loss is ``ls``'s too: each task's negative
log-likelihood of the batch, scaled by ``N / B`` (the ELBO's), summed over the tasks, with the
regression noise τ = 1.

Training (:class:`BayesAggObjective`, Algorithm 1):

* the first ``pretrain_steps`` steps are plain linear scalarisation (the sum of the task losses),
  and with ``aggregate = false`` every step is (``ls``, to the last bit);
* then each step computes the heads' batch posteriors, the mean and diagonal variance of each
  task's per-sample gradient with respect to ``h`` (eq. 4 in closed form for regression; eq. 11
  or quadrature for classification), aggregates them (eq. 7, with ``s`` per task type) and
  back-propagates the result ``g`` through the extractor once, at the loss's scale
  (``h.backward((N / B) g)``); the heads get the ordinary gradient of the task losses;
* at each epoch's end the full-data prior is rebuilt from one pass over every training example
  with the extractor as it is then (eval mode, no gradients; :meth:`BayesAggObjective.end_epoch`):
  the regression posterior from streamed ``HᵀH`` and ``Hᵀy``
  (:class:`~pyromtl.infer.bayesagg.GaussianStats`), and for classification the Laplace posterior
  around the heads as they are then.

Its prior kinds (``[priors.w] kind = ...``, in :mod:`pyromtl.priors.last_layer`), each with the
isotropic scale γ: ``full_data`` (the paper's), ``previous_batch`` (the last batch's posterior)
and ``isotropic`` (``N(0, γ² I)``). Prediction (``predict = "posterior"``) uses the full-data
posterior mean for regression tasks and the learned heads ``θ̂`` for classification tasks;
``predict = "learned"`` uses ``θ̂`` for every task, as ``ls``. :class:`BayesAggOptions` lists what
each combination of ``aggregate`` and ``predict`` is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyro
import torch
from pyro.distributions.util import scale_and_mask
from torch import Tensor, nn

from pyromtl.base import MultiTaskModel, Plates
from pyromtl.data.core import Batch, MultiTaskData
from pyromtl.distributions import GaussianPrecision
from pyromtl.guides.bayesagg import (
    BayesAggGuide,
    GroupPosterior,
    HeadGroup,
    assemble,
    batch_posterior,
    group_priors,
    head_groups,
    share_rows,
)
from pyromtl.infer.bayesagg import (
    GaussianStats,
    Kind,
    add_bias,
    aggregation_weights,
    classification_moments,
    laplace_as_prior,
    regression_moments,
)
from pyromtl.likelihoods import MultiTaskOutput
from pyromtl.method import ExportSite, Method, MethodContext
from pyromtl.objective import Objective, TrainContext, is_finite
from pyromtl.options import NetworkOptions
from pyromtl.predict import evaluating
from pyromtl.priors import PriorSite

PAPER = "Achituve et al., Bayesian Uncertainty for Gradient Aggregation in Multi-Task Learning, ICML 2024"
MOMENTS = ("quadrature", "monte_carlo")
#: What predicts: the full-data posterior mean for regression tasks (the paper's), or the learned heads.
PREDICT = ("posterior", "learned")
#: The loss whose per-sample gradient a regression task's moments describe: eq. 3's squared error
#: (the paper's), or the Gaussian negative log-likelihood at τ = 1, ½ of it, which the LS steps
#: and the heads' gradient use (moments ½ and ¼ as large).
REGRESSION_SCALES = ("squared", "gaussian")
#: History key prefix of the per-task aggregation weights (followed by the task index).
WEIGHT_KEY = "aggregation_weight_"
#: The last-layer prior kinds (``pyromtl.priors.last_layer``): each reads only ``PriorStore``, so
#: a built prior stays valid until the store's entry changes.
STORED_KINDS = ("isotropic", "full_data", "previous_batch")


# ----------------------------------------------------------------------------- model
class PriorStore(nn.Module):
    """What the priors and the prediction read, rebuilt during training and checkpointed.

    ``full_data`` and ``previous_batch`` are ``(mean [T, P], precision [T, P, P])`` or ``None``;
    ``regression_mean`` ``[K_reg, d+1]`` is the full-data posterior mean of the regression heads.
    """

    def __init__(self) -> None:
        super().__init__()
        self.full_data: tuple[Tensor, Tensor] | None = None
        self.previous_batch: tuple[Tensor, Tensor] | None = None
        self.regression_mean: Tensor | None = None

    def extras(self) -> dict[str, Any]:
        return {"full_data": self.full_data, "previous_batch": self.previous_batch}

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "full_data": self.full_data,
            "previous_batch": self.previous_batch,
            "regression_mean": self.regression_mean,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.full_data, self.previous_batch = state["full_data"], state["previous_batch"]
        self.regression_mean = state["regression_mean"]


class LocHalf(nn.Module):
    """The first ``d`` of the trunk's ``2d`` outputs: the baselines' ``loc`` half, which is ``h``.

    ``GaussianEncoder`` (``bmtl``, ``ls`` and the other weighting baselines) reads ``loc`` and a
    scale from one ``2d``-wide last layer; with ``deterministic`` priors the scale is never used.
    BayesAgg builds the same layer, so the two networks are drawn from the same random numbers,
    and reads the same half."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x[..., : self.dim]


def head(z: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Outputs ``[..., T, B, K] = z wᵀ + b`` of ``z [..., 1, B, d]``, ``w [..., T, K, d]``, ``b [..., T, 1, K]``.

    The same ops as the baselines' head (:meth:`pyromtl.latent.LatentMTLModel.head`), so the
    learned heads give their outputs to the last bit."""
    return torch.matmul(z, weight.transpose(-1, -2)) + bias


class BayesAggModel(MultiTaskModel):
    """``p(θ) p(y | h(x), θ)``: a Bayesian last layer on a deterministic extractor.

    The network is the weighting baselines' (``bmtl``'s with point estimates,
    :func:`pyromtl.latent.build_latent`), built in the same order from the same random numbers:
    the trunk (backbone, ``hidden`` layers, a linear layer to ``2d``) whose first ``d`` outputs
    are ``h`` (no activation after it), then ``weight [T, 1, K, d]`` (their ``w_post.loc``) and
    ``bias [T, 1, K]``. The learned heads ``θ̂ = [w, b]`` are :attr:`heads` ``[T, K, d+1]``; the
    regression noise stays at τ = 1 (§3.1): its parameter is frozen, as the baselines' is with
    ``learn_noise = false``.
    """

    def __init__(self, ctx: MethodContext):
        cfg, device = ctx.config, ctx.device
        info = ctx.data.info.to(device)
        super().__init__(info, ctx.state)
        self.latent_dim = d = cfg["latent_dim"]
        # the draws of build_latent: GaussianEncoder's net, then ClassifierPosterior's loc (on the CPU, then moved)
        trunk = ctx.backbone.shared(tuple(info.input_shape), list(cfg["hidden"]), 2 * d, cfg["activation"])
        self.extractor = nn.Sequential(trunk, LocHalf(d)).to(device)
        self.weight = nn.Parameter((torch.randn(info.num_tasks, 1, info.out_dim, d) / d**0.5).to(device))
        self.bias = nn.Parameter(torch.zeros(info.num_tasks, 1, info.out_dim, device=device))
        self.noise_unconstrained.requires_grad_(False)  # τ = 1
        self.w_prior = PriorSite("w", cfg["priors"]["w"], device=device)
        self.store = PriorStore()
        self.groups: tuple[HeadGroup, ...] = head_groups(info)
        self.regression_group = next((g for g in self.groups if g.kind == "regression"), None)

    @property
    def heads(self) -> Tensor:
        """The learned heads ``θ̂ [T, K, d+1]`` (bias last), the classification posteriors' expansion point."""
        return torch.cat([self.weight.squeeze(1), self.bias.squeeze(1).unsqueeze(-1)], -1)

    @property
    def size(self) -> int:
        """``P = K(d+1)``, the numbers of one task's head."""
        return self.info.out_dim * (self.latent_dim + 1)

    def features(self, x: Tensor) -> Tensor:
        """``h [B, d]`` of SIMO inputs ``x [B, *input_shape]``."""
        return self.extractor(x)

    def representation(self, x: Tensor) -> Tensor:
        """``h`` as the baselines' shared ``z`` ``[1, B, d]``."""
        return self.extractor(x).unsqueeze(-3)

    def prior(self) -> GaussianPrecision:
        """The heads' prior ``[T, 1]`` over ``P`` numbers, from the registry."""
        T = self.info.num_tasks
        return self.w_prior.build(
            batch_shape=(T, 1), event_shape=(self.size,), num_tasks=T, state=self.state, extras=self.store.extras()
        )

    def task_losses(self, z: Tensor, batch: Batch) -> Tensor:
        """The tasks' losses ``ℓ [T]`` at ``θ̂`` of ``z [1, B, d]``, as ``ls`` reads them from its trace.

        Each is the negative log-likelihood of the batch, scaled by ``N_t / B_t`` and masked
        (:mod:`models.weighting`); linear scalarisation is their sum."""
        outputs = head(z, self.weight.squeeze(-3), self.bias)
        log_lik = MultiTaskOutput(outputs, self.info, self.noise).log_prob(batch.y)
        return -scale_and_mask(log_lik, batch.scale, batch.mask).sum(-1)

    def forward(self, batch: Batch) -> None:
        plates = Plates(batch)
        with plates.globals():
            theta = pyro.sample("w", self.prior())  # [..., T, 1, P]
        theta = theta.unflatten(-1, (self.info.out_dim, self.latent_dim + 1))  # [..., T, 1, K, d+1]
        outputs = head(self.representation(batch.x), theta[..., : self.latent_dim].squeeze(-3), theta[..., -1])
        with plates.observations():
            self.observe(outputs, batch)


# ----------------------------------------------------------------------------- objective
class _TaskLoss(nn.Module):
    """The LS loss, the sum of :meth:`BayesAggModel.task_losses`, as the objective's ``loss``
    module (what it reports, and trains with when it does not aggregate)."""

    def __init__(self, model: BayesAggModel, guide: BayesAggGuide):
        super().__init__()
        self.model, self.guide = model, guide

    def forward(self, batch: Batch) -> Tensor:
        return self.model.task_losses(self.model.representation(batch.x), batch).sum()


class BayesAggObjective(Objective):
    """Algorithm 1: LS pre-training, then the aggregated gradient pushed into ``h``; the full-data prior per epoch.

    With ``aggregate = false`` every step is LS (``ls``'s step, to the last bit)."""

    # buffers (register_buffer), declared for the type checker
    order: Tensor
    s: Tensor

    def __init__(self, model: BayesAggModel, guide: BayesAggGuide, cfg: Mapping[str, Any]):
        super().__init__(_TaskLoss(model, guide))
        if cfg["moments"] not in MOMENTS:
            raise ValueError(f"config key 'moments' must be one of {list(MOMENTS)}, got {cfg['moments']!r}")
        if cfg["num_samples"] < 2:
            raise ValueError(f"config key 'num_samples' must be at least 2, got {cfg['num_samples']}")
        if (scale := cfg["regression_scale"]) not in REGRESSION_SCALES:
            raise ValueError(f"config key 'regression_scale' must be one of {list(REGRESSION_SCALES)}, got {scale!r}")
        keys = ("moments", "num_samples", "nodes", "pretrain_steps", "aggregate", "predict", "regression_scale")
        self.cfg = {k: cfg[k] for k in keys}
        self.prior_kind = cfg["priors"]["w"]["kind"]
        self.prior_scale = cfg["priors"]["w"].get("scale", 1.0)  # a user prior kind may have no γ
        regression = torch.tensor([kind == "regression" for kind in model.info.types], device=model.weight.device)
        # the tasks in the order the head groups stack their moments (fixed by the data), and their s
        order = torch.cat([g.tasks for g in model.groups]).to(model.weight.device)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer(
            "s", torch.where(regression, cfg["s_regression"], cfg["s_classification"])[order], persistent=False
        )
        # one s for every task (e.g. all regression) is a float: no tensor op to apply it
        self.shared_s = float(self.s[0]) if bool((self.s == self.s[0]).all()) else None
        # each task's mean aggregation weight at the last step [T] (tasks in group order), computed
        # only when asked (a logged step), since the torch path would pay a pass over [B, T, d]
        self._mean_weights: Callable[[], Tensor] | None = None
        # (what the prior was built from, prior, group priors): see _priors
        self._prior_cache: tuple[tuple[Any, ...], GaussianPrecision, list[tuple[Tensor, Tensor]]] | None = None

    def moments(
        self, features: Tensor, y: Tensor, posteriors: list[GroupPosterior]
    ) -> tuple[Tensor, Tensor, Tensor | float]:
        """Mean and diagonal variance of each task's per-sample gradient w.r.t. ``h`` (eq. 4, eq. 11).

        ``features`` are ``add_bias(h)``. Returns ``mu``, ``var`` ``[B, T, d]`` and ``s`` (``[T]``,
        or a float when every task has the same), tasks in group order.
        """
        dim = features.shape[1] - 1
        h = features[:, :dim]
        mus, variances = [], []
        for group, post in zip(self.model.groups, posteriors):  # one batched call per kind of task
            labels = group.labels(y)
            if post.cov is None:  # batch_posterior's always have it
                raise ValueError("the gradient moments need the batch posteriors' covariances")
            if group.kind == "regression":
                # the constant feature's coordinate is not part of h: skip it
                mu, var = regression_moments(features, post.mean, post.cov, labels, coords=dim)
                if self.cfg["regression_scale"] == "gaussian":  # the gradient of ½(y − ŷ)²
                    mu, var = mu.mul_(0.5), var.mul_(0.25)
            else:
                mu, var = classification_moments(
                    h,
                    post.mean,
                    post.cov,
                    labels,
                    "binary" if group.kind == "binary" else "multiclass",
                    self.cfg["moments"],
                    num_samples=self.cfg["num_samples"],
                    nodes=self.cfg["nodes"],
                )
            mus.append(mu)
            variances.append(var)
        s = self.s if self.shared_s is None else self.shared_s
        if len(mus) == 1:  # one kind of task: no copy
            return mus[0], variances[0], s
        return torch.cat(mus, 1), torch.cat(variances, 1), s

    def _priors(self) -> tuple[GaussianPrecision, list[tuple[Tensor, Tensor]]]:
        """The heads' prior and each group's part of it (:func:`group_priors`).

        A kind of :data:`STORED_KINDS` is built again only when the store's entries are replaced
        (an epoch's end, a previous-batch step, a checkpoint load) or the heads move: building
        one costs more than the step's largest tensor ops. Other kinds are built every step, as
        they may read the step or learned parameters.
        """
        model = self.model
        store, weight = model.store, model.weight
        source = (store.full_data, store.previous_batch, weight.device, weight.dtype)
        cached = self._prior_cache
        if (
            cached is None
            or self.prior_kind not in STORED_KINDS
            or cached[0][0] is not source[0]
            or cached[0][1] is not source[1]
            or cached[0][2:] != source[2:]
        ):
            prior = model.prior()
            cached = self._prior_cache = source, prior, group_priors(prior, model.groups, model.latent_dim)
        return cached[1], cached[2]

    def aggregated_gradient(self, features: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """``g [B, d]`` (eq. 7) from the heads' posteriors on a batch (``features = add_bias(h)``,
        ``y``); on several processes ``mask`` (``[T, B]``) marks the shard's padding, whose rows get zero.

        Updates the ``previous_batch`` prior."""
        model = self.model
        prior, priors = self._priors()
        keep = self.prior_kind == "previous_batch"
        # on several processes, every one solves for the global batch's posterior from its real rows
        rows, labels = features, y
        if self.group is not None:
            if mask is None:
                raise ValueError("a shard's aggregated gradient needs its mask")
            real = self.group.gather(mask[0])  # SIMO: the tasks share their rows
            rows, labels = self.group.gather(features)[real], self.group.gather(y, 1)[:, real]
        posteriors = batch_posterior(rows, labels, model.heads.detach(), priors, model.groups, with_precision=keep)
        if keep:
            model.store.previous_batch = assemble(
                prior.mean.squeeze(-2), prior.precision, model.groups, posteriors, model.latent_dim
            )
        mu, var, s = self.moments(features, y, posteriors)
        # aggregate()'s sum, with the weights kept as they are (diagnostics() normalises them if
        # asked), and mu overwritten, which moments() made for this step alone
        weights, total = aggregation_weights(var, s, overwrite_var=True)
        self._mean_weights = lambda: (weights / total.unsqueeze(1)).mean((0, 2))
        g = mu.mul_(weights).sum(1).div_(total)
        return g if mask is None else g.mul_(mask[0, :, None])

    def backward(self, batch: Batch) -> Tensor:
        """Set the gradients of one step (Algorithm 1) and return the LS loss of the batch.

        The loss is ``ls``'s, the sum of :meth:`BayesAggModel.task_losses` (each scaled by
        ``N / B``); an aggregated step gives the heads its ordinary gradient and ``h`` the
        aggregated per-sample gradient ``g`` at the same scale, ``(N / B) g``, in place of the
        loss's ``(N / B) Σ_t ∇_h ℓ_t``."""
        model = self.model
        z = model.representation(batch.x)  # h as [1, B, d]
        if not self.cfg["aggregate"] or model.state.step < self.cfg["pretrain_steps"]:
            loss = model.task_losses(z, batch).sum()  # linear scalarisation, as ls
            if is_finite(loss):
                loss.backward()
            return loss.detach()
        z_fixed = z.detach()
        with torch.no_grad():
            features = add_bias(z_fixed[0])  # once per step: the posterior and the moments
        loss = model.task_losses(z_fixed, batch).sum()  # the heads' ordinary gradients; h gets none from it
        if not is_finite(loss if self.group is None else self.group.mean(loss)):  # every process alike
            return loss.detach()
        with torch.no_grad():
            g = self.aggregated_gradient(features, batch.y, batch.mask)
        if not z.requires_grad:  # a frozen extractor (every parameter requires_grad=False): the heads alone learn
            loss.backward()
            return loss.detach()
        # one pass of the autograd engine for both graphs: the heads' loss, and g through the extractor
        # (SIMO: every task's scale is N / B)
        torch.autograd.backward([loss, z], [None, g.mul_(batch.scale[0]).unsqueeze(0)])
        return loss.detach()

    def diagnostics(self) -> dict[str, float]:
        """Each task's aggregation weight ``λ_k^s / Σ_j λ_j^s`` (eq. 7) at the last step, averaged over
        the batch and the coordinates of ``h`` (the analogue of the paper's Fig. 3); none in pre-training."""
        if self._mean_weights is None:
            return {}
        means = self._mean_weights()
        weights = means.new_zeros(len(self.order)).index_copy(0, self.order, means)
        return {f"{WEIGHT_KEY}{t}": w for t, w in enumerate(weights.tolist())}

    @torch.no_grad()
    def end_epoch(self, ctx: TrainContext) -> None:
        """Rebuild the full-data posterior from one pass over every training example of ``ctx.data``.

        The pass runs the extractor as it is now, in eval mode (BatchNorm reads its running
        statistics and updates none) and without gradients, over ``data.eval_batches("train")``
        on the model's device. From its features ``H = add_bias(h)`` and under ``N(0, γ² I)``
        (§3.1's isotropic prior): the regression heads' Gaussian posterior from ``HᵀH`` and
        ``Hᵀy`` (τ = 1), whose mean the prediction uses whatever the prior kind; and, for the
        ``full_data`` kind, every classification head's Laplace posterior around the heads as
        they are now (eq. 8–10 on all the examples). Nothing is kept from the epoch's steps: the
        prior is the same however the epoch's batches fell, so a resumed run rebuilds it exactly.

        Its cost at the defaults (1,078 training rows, 17 steps of 64 an epoch; CPU, one thread,
        medians over epochs, three runs): on ``digits-mixed`` 30–33 ms, 0.05–0.07 of an epoch of
        aggregated steps (0.6–0.9 of an epoch of LS pre-training steps), of which the extractor
        pass is 2–3 ms and the rest the solves, mostly the 10-class head's Laplace precision
        (650 × 650); on ``digits-regression`` 3–4 ms, 0.06–0.07 of an aggregated epoch (0.09–0.12
        of an LS one).

        What nothing reads is not built: without ``aggregate`` the steps read no prior, and with
        ``predict = "learned"`` the prediction reads no regression mean (with both, no pass).
        """
        model, store = self.model, self.model.store
        regression = model.regression_group
        full = self.cfg["aggregate"] and self.prior_kind == "full_data"
        if not full and (regression is None or self.cfg["predict"] != "posterior"):
            return  # nothing would read the pass
        precision = 1.0 / self.prior_scale**2
        classify = full and any(g.kind != "regression" for g in model.groups)
        stats, h, y = self._training_pass(ctx.data, keep=classify)
        reg_post = None
        if regression is not None:
            mean, reg_precision = stats.as_prior(0.0, precision)
            store.regression_mean = mean
            reg_post = GroupPosterior(mean, None, reg_precision)
        if full:
            mean, full_precision = self._full_data(h, y, reg_post, precision)
            store.full_data = mean, share_rows(full_precision)

    def _training_pass(self, data: MultiTaskData, keep: bool) -> tuple[GaussianStats, Tensor | None, Tensor | None]:
        """One pass of the extractor (eval mode, no gradients) over every training example.

        Returns the regression heads' streamed ``HᵀH`` and ``Hᵀy`` of ``H = add_bias(h)``, and with
        ``keep`` the features ``h [N, d]`` and labels ``y [T, N]`` of every example (for the
        Laplace posteriors, which need them all at once). SIMO: every task has the same rows, so
        a row is data where every task's mask holds (the rest is padding). On several processes
        each runs the extractor on its shard of every chunk, and the features are all-gathered in
        the rows' order, so every process solves the same posteriors."""
        model = self.model
        group = model.regression_group
        stats = GaussianStats()
        hs: list[Tensor] = []
        ys: list[Tensor] = []
        with torch.no_grad(), evaluating(model):
            for batch in data.eval_batches("train", model.weight.device):
                if self.group is None:
                    rows, y = batch.mask.all(0), batch.y
                    h = model.features(batch.x)
                else:  # each process runs the extractor on its shard of the rows; all then have every row
                    shard = self.group.shard(batch)
                    h = self.group.gather(model.features(shard.x))
                    rows, y = self.group.gather(shard.mask.all(0)), self.group.gather(shard.y, 1)
                h, y = h[rows], y[:, rows]
                if group is not None:
                    stats.update(add_bias(h), group.labels(y))
                if keep:
                    hs.append(h)
                    ys.append(y)
        if not keep:
            return stats, None, None
        return stats, torch.cat(hs), torch.cat(ys, 1)

    def _full_data(
        self, h: Tensor | None, y: Tensor | None, reg_post: GroupPosterior | None, precision: float
    ) -> tuple[Tensor, Tensor]:
        """``(mean [T, P], precision [T, P, P])``: every group's posterior on the training set.

        ``h [N, d]`` and ``y [T, N]`` are the pass's features and labels, ``reg_post`` the
        regression heads' posterior (already solved from the pass's statistics)."""
        model = self.model
        dim, heads = model.latent_dim, model.heads.detach()
        posteriors: list[GroupPosterior] = []
        for group in model.groups:  # one batched solve per kind of task
            if group.kind == "regression":
                if reg_post is None:  # end_epoch solves it whenever there is a regression group
                    raise RuntimeError("no regression posterior for the full-data prior")
                posteriors.append(reg_post)
                continue
            if h is None or y is None:  # the pass keeps them whenever there is a classification group
                raise RuntimeError("no features kept for the classification heads' full-data posterior")
            theta = heads[group.rows, : group.classes]
            theta = theta.squeeze(1) if group.kind == "binary" else theta
            kind: Kind = "binary" if group.kind == "binary" else "multiclass"
            mean, prec = laplace_as_prior(h, group.labels(y), theta[..., :dim], theta[..., dim], 0.0, precision, kind)
            posteriors.append(GroupPosterior(mean, None, prec))
        base = heads.new_zeros(model.info.num_tasks, model.size)
        eye = torch.eye(model.size, dtype=heads.dtype, device=heads.device) * precision
        return assemble(base, eye, model.groups, posteriors, dim)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Checkpoints written before the full-data prior came from a pass over the training set
        # carry the epoch's collected statistics as this module's extra state: nothing reads
        # them now (the epoch's end makes the prior from the pass alone), so they are dropped.
        state_dict.pop(prefix + "_extra_state", None)
        super()._load_from_state_dict(state_dict, prefix, *args)


# ----------------------------------------------------------------------------- declaration
@dataclass
class BayesAggOptions(NetworkOptions):
    """BayesAgg-MTL's options; the prior kind and γ are the prior spec's (``[priors.w] kind, scale``).

    The network is the weighting baselines' (``ls`` and the others, :mod:`models.weighting`): the
    backbone, then the ``hidden`` layers (each with ``activation``), then a linear layer whose
    first ``latent_dim`` outputs are ``h``, with no activation after it, as the baselines' ``z``.

    ``aggregate`` and ``predict`` give the controls that separate the aggregation from the rest:

    * ``aggregate = false, predict = "learned"``: ``ls`` to the last bit (same seed, same steps:
      the same parameters, training losses and test metrics);
    * ``aggregate = false, predict = "posterior"``: LS training, regression tasks predicted by the
      full-data posterior mean of their heads on the LS features;
    * ``aggregate = true, predict = "learned"``: BayesAgg's training, every task predicted by its
      learned head;
    * ``aggregate = true, predict = "posterior"`` (the defaults): BayesAgg-MTL as in the paper.
    """

    MINIMA: ClassVar[dict[str, tuple[float, bool]]] = {"nodes": (1, True), "num_samples": (2, True)}

    #: eq. 7's power of the precisions, per task type (the paper: 0.75–0.95 regression, 5e-4–5e-2 classification)
    s_regression: float = 0.9
    s_classification: float = 0.01
    #: classification gradient moments: "quadrature" (binary Gauss–Hermite, multiclass logit draws) or
    #: "monte_carlo" (eq. 11)
    moments: str = "quadrature"
    #: J: draws of the heads (monte_carlo) or of the multiclass logits (quadrature)
    num_samples: int = 64
    #: Gauss–Hermite nodes of binary quadrature
    nodes: int = 32
    #: linear-scalarisation steps first, counted in the run's step budget
    pretrain_steps: int = 100
    #: false: every step is linear scalarisation (the sum of the task losses, as ``ls``), no aggregation
    aggregate: bool = True
    #: "posterior": regression tasks predict with their heads' full-data posterior mean, classification
    #: tasks with the learned heads (the paper's); "learned": every task with its learned head, as ``ls``
    predict: str = "posterior"
    #: a regression task's moments: of eq. 3's squared error (the paper's), or "gaussian": of ½ of
    #: it, the scale of the LS steps and of the heads' gradient (the Gaussian NLL at τ = 1)
    regression_scale: str = "squared"


def build_bayesagg(ctx: MethodContext) -> tuple[BayesAggModel, BayesAggGuide]:
    predict = ctx.config["predict"]
    if predict not in PREDICT:
        raise ValueError(f"config key 'predict' must be one of {list(PREDICT)}, got {predict!r}")
    model = BayesAggModel(ctx)
    return model, BayesAggGuide(model, ctx.state, posterior_mean=predict == "posterior")


def bayesagg_objective(ctx: MethodContext) -> Objective:
    return BayesAggObjective(ctx.model, ctx.guide, ctx.config)


def _prediction_heads(ctx: MethodContext, n: int) -> Tensor:
    """The prediction heads ``[n, T, K, d+1]`` (a point estimate: every draw is the same)."""
    theta = ctx.guide.prediction_heads().unflatten(-1, ctx.model.heads.shape[1:])
    return theta.expand(n, *theta.shape)


def _head_coords(data: MultiTaskData, shape: tuple[int, ...]) -> dict[str, Any]:
    return {"class": np.arange(shape[-2]), "feature": np.arange(shape[-1])}


def bayesagg_extra(ctx: MethodContext) -> dict[str, Any]:
    """The aggregation weights over training, from the run's history: ``{"step": [...], task: [...]}``."""
    logged = [h for h in ctx.history if f"{WEIGHT_KEY}0" in h]
    if not logged:
        return {}
    weights = {"step": [h["step"] for h in logged]}
    weights.update({name: [h[f"{WEIGHT_KEY}{t}"] for h in logged] for t, name in enumerate(ctx.data.task_names)})
    return {"aggregation_weights": weights}


def bayesagg_plots(ctx: MethodContext) -> dict[str, Any]:
    """Each task's mean aggregation weight against the step (the analogue of the paper's Fig. 3), drawn when written."""
    weights = (ctx.doc.get("extra") or {}).get("aggregation_weights")
    if not weights:
        return {}
    return {"aggregation_weights.png": lambda: _plot_aggregation_weights(weights)}


def _plot_aggregation_weights(weights: Mapping[str, list[float]]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    for name, values in weights.items():
        if name != "step":
            ax.plot(weights["step"], values, label=name)
    ax.axhline(1.0 / (len(weights) - 1), color="grey", linestyle=":", linewidth=1, label="uniform")
    ax.set_xlabel("step")
    ax.set_ylabel("mean aggregation weight")
    ax.set_title("BayesAgg: each task's weight in the shared gradient (eq. 7)")
    ax.legend(fontsize=7, ncol=2 if len(weights) > 6 else 1)
    return fig


METHODS: tuple[Method, ...] = (
    Method(
        name="bayesagg",
        summary="shared extractor, Bayesian linear heads; precision-weighted aggregation of the "
        "heads' gradient moments (BayesAgg-MTL)",
        paper=PAPER,
        build=build_bayesagg,
        options=BayesAggOptions,
        priors={"w": {"kind": "full_data", "scale": 1.0}},
        settings=("simo",),
        objective=bayesagg_objective,
        export=(ExportSite("w", ("task", "class", "feature"), _prediction_heads, _head_coords),),
        extra=bayesagg_extra,
        plots=bayesagg_plots,
    ),
)
