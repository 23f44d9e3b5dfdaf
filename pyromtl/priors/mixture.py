"""VMTL's ``task_mixture`` prior kind: a mixture of the other tasks' posteriors (eq. 6, 7, 9)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.util import broadcast_shape

from pyromtl.distributions import KL_MODES, TaskMixture
from pyromtl.priors.spec import PriorContext, PriorKind, PriorSpec, one_of, temperature
from pyromtl.schedules import as_schedule

#: Values of the ``weights`` parameter of ``task_mixture`` (the ablation of VMTL Table 2).
MIXTURE_WEIGHTS = ("gumbel_softmax", "learned", "uniform")


def other_tasks(num_tasks: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[T, T-1]`` column indices of the other tasks of each row: row t lists ``i ≠ t`` in order.

    Args:
        num_tasks: the number of tasks T.
        device: where the indices go.

    Returns:
        ``[T, T-1]`` int64 indices.
    """
    j = torch.arange(num_tasks - 1, device=device)
    t = torch.arange(num_tasks, device=device).unsqueeze(-1)
    return j + (j >= t).long()


def _scatter_rows(rows: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """``[..., T, T-1]`` weights over the other tasks → ``[..., T, T]`` with a zero diagonal (α_tt = 0)."""
    index = other_tasks(num_tasks, rows.device).expand(rows.shape)
    return torch.zeros(*rows.shape[:-1], num_tasks, device=rows.device, dtype=rows.dtype).scatter(-1, index, rows)


def _uniform_rows(num_tasks: int, device: torch.device | None, dtype: torch.dtype | None) -> torch.Tensor:
    return torch.full((num_tasks, num_tasks - 1), 1.0 / (num_tasks - 1), device=device, dtype=dtype)


def mixture_weights(
    mode: str,
    num_tasks: int,
    logits: torch.Tensor | None = None,
    tau: float = 1.0,
    sample_shape: tuple[int, ...] = (),
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Mixing weights of a ``task_mixture`` prior, ``[*sample_shape, T, T]`` with a zero diagonal.

    ``mode`` is the prior's ``weights``: ``gumbel_softmax`` draws ``RelaxedOneHotCategorical(τ,
    logits=π_t)`` (eq. 7), one per ``sample_shape`` entry; ``learned`` gives ``softmax(π_t)``
    (also the Gumbel-Softmax's expected class); ``uniform`` gives ``1 / (T-1)`` (``logits``
    unused). ``logits`` ``[T, T-1]`` are the learned π.

    Args:
        mode: ``"gumbel_softmax"``, ``"learned"`` or ``"uniform"``.
        num_tasks: the number of tasks T.
        logits: the learned π, ``[T, T-1]`` (not needed for ``uniform``).
        tau: the Gumbel-Softmax temperature τ.
        sample_shape: leading dims of the result (independent draws for ``gumbel_softmax``).
        device: the device of uniform weights.
        dtype: the dtype of uniform weights.

    Returns:
        ``[*sample_shape, T, T]`` weights, each row on the simplex with a zero diagonal.

    Raises:
        ValueError: ``logits`` missing for a mode other than ``uniform``.
    """
    if mode == "uniform":
        rows = _uniform_rows(num_tasks, device, dtype).expand(*sample_shape, num_tasks, num_tasks - 1)
    elif logits is None:
        raise ValueError(f"mixture weights {mode!r} need the learned logits")
    elif mode == "learned":
        rows = torch.softmax(logits, dim=-1).expand(*sample_shape, num_tasks, num_tasks - 1)
    else:
        rows = dist.RelaxedOneHotCategorical(
            torch.full((), tau, device=logits.device, dtype=logits.dtype), logits=logits
        ).rsample(sample_shape)
        # At small τ the sample is computed from large log-space scores and its rows can miss
        # 1 by more than rounding; renormalise so the weights are on the simplex.
        rows = rows / rows.sum(-1, keepdim=True)
    return _scatter_rows(rows, num_tasks)


def _task_mixture(spec: PriorSpec, ctx: PriorContext) -> TaskMixture:
    """VMTL's prior: a mixture of the other tasks' posteriors (eq. 6 for ``w``, eq. 9 for ``z``).

    Row t (along ``task_axis``) mixes the components ``i ≠ t`` with weights α_t:

    * ``gumbel_softmax``: one ``RelaxedOneHotCategorical(τ(step), logits=π_t)`` draw per task and
      call (eq. 7), differentiable in the learned logits π ``[T, T-1]``;
    * ``learned``: ``softmax(π_t)``, no noise;
    * ``uniform``: ``1 / (T-1)`` (the mean of the others' posteriors).

    The ``[T, T]`` matrix α (zero diagonal) is recorded as ``pyro.deterministic(f"{site}_weights")``.
    ``kl`` selects the closed-form upper bound of eq. 11 or a Monte-Carlo KL (see TaskMixture).

    By default component i is task i (``C = T`` components, the own task at weight 0). A model
    may instead pass fewer, naming their tasks in ``ctx.extras``:

    * ``component_tasks``: integer tensor broadcastable to ``batch_shape + (C,)``, the task of
      each component (the columns of α it takes);
    * ``component_inclusion``: the probability ``P(i ∈ S)`` with which each other task i was
      drawn into the components ``S`` (default 1: ``S`` holds every other task, the mixture is
      exact). Below 1 the weights are ``α_ti / P(i ∈ S)`` and the mixture is a ``sampled``
      :class:`TaskMixture`: its KL bound ``Σ_{i∈S} α_ti / P(i∈S) · KL(q ‖ p_i)`` estimates eq. 11's
      ``Σ_i α_ti KL(q ‖ p_i)`` without bias, and ``kl = "monte_carlo"`` is refused.
    """
    T = ctx.num_tasks
    if T < 2:
        raise ValueError(f"task_mixture needs at least 2 tasks (site {ctx.site!r} has {T})")
    if ctx.components is None:
        raise ValueError(
            f"prior 'task_mixture' of site {ctx.site!r} needs the other tasks' posteriors as components "
            "(loc, scale); this model/method provides none"
        )
    if ctx.task_axis is None or ctx.batch_shape[ctx.task_axis] != T:
        raise ValueError(
            f"task_mixture for site {ctx.site!r}: batch_shape {tuple(ctx.batch_shape)} needs the {T} tasks on "
            f"task_axis {ctx.task_axis}"
        )
    loc, scale = ctx.components
    tasks: torch.Tensor | None = ctx.extras.get("component_tasks")
    inclusion = float(ctx.extras.get("component_inclusion", 1.0))
    if not 0.0 < inclusion <= 1.0:
        raise ValueError(f"task_mixture for site {ctx.site!r}: component_inclusion must be in (0, 1], got {inclusion}")
    sampled = inclusion < 1.0
    if sampled and spec.params["kl"] != "upper_bound":
        raise ValueError(
            f"task_mixture for site {ctx.site!r}: kl = 'monte_carlo' needs every component, but the model passed a "
            f"random subset of them (component_inclusion = {inclusion:.3g}); use kl = 'upper_bound', or have the "
            "model evaluate every other task (VMTL: z_components >= T - 1)"
        )
    num_components = T if tasks is None else tasks.shape[-1]
    comp = -(len(ctx.event_shape) + 1)
    if loc.dim() < -comp or loc.shape[comp] != num_components:
        raise ValueError(
            f"task_mixture for site {ctx.site!r}: components must be shaped batch_shape + ({num_components},) + "
            f"event_shape {tuple(ctx.event_shape)}, got loc {tuple(loc.shape)}"
        )
    mode = spec.params["weights"]
    logits = None if mode == "uniform" else ctx.param("logits", ctx.full((T, T - 1), 0.0))
    tau = as_schedule(spec.params["temperature"])(ctx.step, ctx.total_steps)
    alpha = mixture_weights(mode, T, logits, tau, device=ctx.device, dtype=ctx.dtype)
    # event_dim=2: α is one [T, T] value per call, independent of the enclosing plates.
    pyro.deterministic(f"{ctx.site}_weights", alpha, event_dim=2)
    weights = ctx.along_tasks(alpha)  # [..., T, ..., T]: row t on the task axis
    if tasks is not None:
        # Each component's own α_ti: gather the columns of α named by the component's task.
        shape = torch.Size(broadcast_shape(weights.shape[:-1], tasks.shape[:-1]))
        weights = weights.expand(shape + (T,)).gather(-1, tasks.expand(shape + (num_components,)))
        if sampled:
            weights = weights / inclusion  # Horvitz–Thompson: unbiased for the sum over all tasks
    mixture = TaskMixture(weights, loc, scale, event_dim=len(ctx.event_shape), kl=spec.params["kl"], sampled=sampled)
    return mixture.expand(broadcast_shape(mixture.batch_shape, ctx.batch_shape))


TASK_MIXTURE = PriorKind(
    "task_mixture",
    _task_mixture,
    defaults={"weights": "gumbel_softmax", "temperature": 1.0, "kl": "upper_bound"},
    checks={"weights": one_of(MIXTURE_WEIGHTS), "temperature": temperature, "kl": one_of(KL_MODES)},
)
