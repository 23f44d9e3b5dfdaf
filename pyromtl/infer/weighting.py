"""The torchjd side of the gradient-weighting baselines (``models/weighting.py`` declares them).

Imported only when one of them is built: importing torchjd loads its solvers (qpsolvers,
cvxpy and, through qpsolvers, jax where installed), which costs seconds that no other method
should pay.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from torchjd import aggregation, scalarization
from torchjd.autojac import jac_to_grad, mtl_backward
from torchjd.linalg import Matrix

from pyromtl.data.core import Batch
from pyromtl.objective import Objective, TrainContext, is_finite


# ---------------------------------------------------------------------------- combiners
class ScaleInvariant(scalarization.Scalarizer):
    """``Σ_t log ℓ_t``, the scale-invariant baseline (SI) of Navon et al., *Multi-Task Learning
    as a Bargaining Game*, ICML 2022: its gradient ``Σ_t ∇ℓ_t / ℓ_t`` is unchanged when a
    task's loss is multiplied by a constant.

    Losses must be positive. One that underflows to zero (a task fitted perfectly) is clamped
    to the smallest positive float, so it adds a constant and no gradient instead of ``-inf``.
    """

    def forward(self, values: torch.Tensor, /) -> torch.Tensor:
        """The sum of the losses' logarithms.

        Args:
            values: the task losses ``ℓ [T]``, positive.

        Returns:
            The scalar ``Σ_t log ℓ_t``; NaN if a loss is negative (not checked).
        """
        return values.clamp_min(torch.finfo(values.dtype).tiny).log().sum()


class CheckpointedDWA(scalarization.DWA):
    """torchjd's Dynamic Weight Average (Liu, Johns & Davison, *End-to-End Multi-Task Learning
    with Attention*, CVPR 2019) with its loss history in the state dict.

    DWA's weights depend on the average losses of the last two epochs and on the running sum
    of the current one; keeping them in ``get_extra_state`` makes a resumed run exact.
    """

    def get_extra_state(self) -> dict[str, Any]:
        """DWA's loss history, for ``state_dict``.

        Returns:
            ``loss_sum`` (the current epoch's summed losses, None before its first batch),
            ``batches`` (how many batches that sum holds) and ``averages`` (the average losses
            of up to two finished epochs, oldest first).
        """
        return {"loss_sum": self._loss_sum, "batches": self._n_batches, "averages": list(self._previous_averages)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the loss history saved by :meth:`get_extra_state` (``load_state_dict``).

        Args:
            state: the dict :meth:`get_extra_state` returned.

        Raises:
            KeyError: ``state`` lacks one of its keys.
        """
        self._loss_sum, self._n_batches = state["loss_sum"], state["batches"]
        self._previous_averages = list(state["averages"])


class CheckpointedNashMTL(aggregation.NashMTL):
    """torchjd's Nash-MTL (Navon et al., ICML 2022) with its warm start in the state dict.

    Each solve starts from the previous step's weights; keeping them (and the step count that
    decides when to re-solve) in ``get_extra_state`` makes a resumed run exact. This reads
    torchjd's internal ``_NashMTLWeighting`` fields: recheck on a torchjd upgrade.
    """

    def get_extra_state(self) -> dict[str, Any]:
        """The weighting's warm start, for ``state_dict``.

        Returns:
            ``step`` (calls so far, as torchjd counts them: a float) and ``alpha`` (the last
            weights solved for, a ``[T]`` CPU tensor).
        """
        w = self.weighting
        return {"step": float(w.step), "alpha": torch.as_tensor(w.prvs_alpha, device="cpu").clone()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the warm start saved by :meth:`get_extra_state` (``load_state_dict``), and
        rebuild the convex problem that torchjd would otherwise build on its first call only.

        Args:
            state: the dict :meth:`get_extra_state` returned.

        Raises:
            KeyError: ``state`` lacks one of its keys.
        """
        w = self.weighting
        w.step, w.prvs_alpha = state["step"], state["alpha"].cpu().numpy()
        if w.step:  # torchjd builds its convex problem on the first call only (step 0)
            w._init_optim_problem()

    def forward(self, matrix: Matrix, /) -> torch.Tensor:
        """torchjd's Nash-MTL aggregation (Algorithm 1 of Navon et al.), without cvxpy's DPP warning.

        Args:
            matrix (torch.Tensor): the Jacobian ``[T, P]``, one task's gradient per row (a torchjd ``Matrix``).

        Returns:
            The aggregated gradient ``[P]``.
        """
        # cvxpy warns on every solve that torchjd's problem is not DPP: nothing a user can act on
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You are solving a parameterized problem that is not DPP")
            return super().forward(matrix)


class PCGrad(aggregation.PCGrad):
    """torchjd's PCGrad (Yu et al., NeurIPS 2020) with its random task orders drawn on the CPU,
    where its weighting computes, whatever torch's default device: torchjd draws them with
    ``torch.randperm(T)``, on the default device (on a CUDA one, from the CUDA RNG, with a host
    sync at every comparison). Pinning the default costs a mode per op, so it is set only when
    the default is not the CPU already."""

    def forward(self, matrix: Matrix, /) -> torch.Tensor:
        """torchjd's PCGrad aggregation (Algorithm 1 of Yu et al.), its random orders drawn on the CPU.

        Args:
            matrix (torch.Tensor): the Jacobian ``[T, P]``, one task's gradient per row (a torchjd ``Matrix``).

        Returns:
            The aggregated gradient ``[P]``.
        """
        if torch.get_default_device().type == "cpu":
            return super().forward(matrix)
        with torch.device("cpu"):
            return super().forward(matrix)


#: What combines the task losses: a torchjd scalariser, or an aggregator of their Jacobian.
Combiner = scalarization.Scalarizer | aggregation.Aggregator


# ---------------------------------------------------------------------------- objectives
class TaskLossObjective(Objective):
    """``bmtl``'s ELBO module plus the per-task losses of a batch, read from the model trace.

    :meth:`forward` stays the ELBO (the sum of the task losses), which the trainer uses to
    create lazy parameters; subclasses combine the losses in :meth:`backward`. The combiner is
    a submodule, so its parameters (``uw``'s log-variances) are trained and checkpointed with
    the rest, and its extra state (``dwa``'s history) is checkpointed too.

    Args:
        loss: the ``bmtl`` ELBO module, holding the model and guide.
        combine: a torchjd scalariser or aggregator (:data:`COMBINERS`).
    """

    def __init__(self, loss: torch.nn.Module, combine: Combiner):
        super().__init__(loss)
        self.combine = combine

    def task_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ℓ [T], z)``: each task's negative log-likelihood of ``batch`` and the shared
        representation ``z`` the heads read (``[1, B, d]`` for SIMO data).

        Args:
            batch: a training batch.

        Returns:
            ``(losses, z)``; the losses keep their graph.
        """
        guide_tr = poutine.trace(self.guide).get_trace(batch)
        model_tr = poutine.trace(poutine.replay(self.model, trace=guide_tr)).get_trace(batch)
        y = model_tr.nodes["y"]
        log_lik = scale_and_mask(y["fn"].log_prob(y["value"]), y["scale"], y["mask"])
        return -log_lik.sum(-1), guide_tr.nodes["z"]["value"]


class ScalarizedObjective(TaskLossObjective):
    """One backward pass of the scalarised losses: every parameter gets ``∇ combine(ℓ)``."""

    def backward(self, batch: Batch) -> torch.Tensor:
        """Set every parameter's gradient to that of the combined task losses of ``batch``.

        On several processes the combiner reads the global batch's losses. A non-finite total
        is not back-propagated (the trainer stops on it), and then feeds no combiner history.

        Args:
            batch: a training batch (this process's shard on several).

        Returns:
            The sum of the task losses, detached: the step's loss that the trainer reports.
        """
        losses, _ = self.task_losses(batch)
        if self.group is not None:  # combine the global batch's losses (a combiner may be nonlinear)
            losses = self.group.global_value(losses)
        total = losses.detach().sum()
        if is_finite(total):
            self.combine(losses).backward()
        return total

    def end_epoch(self, ctx: TrainContext) -> None:
        """Roll DWA's history on to the epoch just finished; other combiners keep no history.

        Args:
            ctx: the run and its progress (unused).
        """
        if isinstance(self.combine, scalarization.DWA):
            self.combine.step()  # DWA's weights follow the per-epoch average losses


class JacobianDescentObjective(TaskLossObjective):
    """torchjd's ``mtl_backward``: each head gets ``∇ℓ_t`` of its own task, and the shared
    encoder the aggregation of the Jacobian ``[∇ℓ_1; …; ∇ℓ_T]`` by ``combine``.

    Args:
        loss: the ``bmtl`` ELBO module, holding the model and guide.
        combine: a torchjd aggregator.
        shared: the shared encoder; its trainable parameters get the aggregated gradient.
    """

    combine: aggregation.Aggregator

    def __init__(self, loss: torch.nn.Module, combine: aggregation.Aggregator, shared: torch.nn.Module):
        super().__init__(loss, combine)
        # a tuple, not a submodule: the encoder is already in the state dict under ``loss.model``
        self.shared = tuple(p for p in shared.parameters() if p.requires_grad)  # a frozen backbone is left alone

    def backward(self, batch: Batch) -> torch.Tensor:
        """Set the gradients of one Jacobian-descent step on ``batch``: each head's from its own
        task's loss, the shared encoder's the aggregation of the task Jacobian by ``combine``.

        On several processes the Jacobian is averaged over them before it is aggregated (the
        aggregators are not linear). A non-finite total is not back-propagated.

        Args:
            batch: a training batch (this process's shard on several).

        Returns:
            The sum of the task losses, detached: the step's loss that the trainer reports.
        """
        losses, features = self.task_losses(batch)
        if self.group is not None:  # every process then decides alike whether the step is finite
            losses = self.group.global_value(losses)
        total = losses.detach().sum()
        if is_finite(total):
            # The heads run as one batched op, so the task losses share their graph up to the
            # per-task split; torchjd frees it after the first task unless it is retained.
            mtl_backward(list(losses), features=features, shared_params=self.shared, retain_graph=True)
            if self.group is not None:  # aggregate the global batch's Jacobian, the mean of the shards'
                self.group.mean_(p.jac for p in self.shared)  # type: ignore[attr-defined]
            jac_to_grad(self.shared, self.combine)
        return total


# ---------------------------------------------------------------------------- by name
#: Each baseline's combiner, built from the config and the number of tasks T.
COMBINERS: dict[str, Callable[[Mapping[str, Any], int], Combiner]] = {
    "ls": lambda cfg, T: scalarization.Sum(),
    "si": lambda cfg, T: ScaleInvariant(),
    "rlw": lambda cfg, T: scalarization.Random(),
    "dwa": lambda cfg, T: CheckpointedDWA(cfg["dwa_temperature"]),
    "uw": lambda cfg, T: scalarization.UW(T),
    "mgda": lambda cfg, T: aggregation.MGDA(),
    "pcgrad": lambda cfg, T: PCGrad(),
    "cagrad": lambda cfg, T: aggregation.CAGrad(c=cfg["cagrad_c"]),
    "imtl-g": lambda cfg, T: aggregation.IMTLG(),
    "nash-mtl": lambda cfg, T: CheckpointedNashMTL(
        T,
        max_norm=cfg["nash_max_norm"],
        update_weights_every=cfg["nash_update_every"],
        optim_niter=cfg["nash_optim_niter"],
    ),
    "aligned-mtl": lambda cfg, T: aggregation.AlignedMTL(),
    "upgrad": lambda cfg, T: aggregation.UPGrad(),
}


def weighting_objective(name: str, loss: torch.nn.Module, model, cfg: Mapping[str, Any]) -> Objective:
    """The objective of baseline ``name``: one scalarised backward, or Jacobian descent.

    Args:
        name: a key of :data:`COMBINERS`.
        loss: the ``bmtl`` ELBO module of ``model`` and its guide.
        model: the model; its ``info`` gives the task count and device, its ``encoder`` the
            shared parameters of Jacobian descent.
        cfg: the resolved config (the combiner's options, e.g. ``dwa_temperature``).

    Returns:
        A :class:`JacobianDescentObjective` for an aggregator, else a :class:`ScalarizedObjective`.

    Raises:
        KeyError: an unknown ``name``, or a config without the combiner's options.
    """
    combine = COMBINERS[name](cfg, model.info.num_tasks).to(model.info.type_code.device)
    if isinstance(combine, aggregation.Aggregator):
        return JacobianDescentObjective(loss, combine, model.encoder)
    return ScalarizedObjective(loss, combine)
