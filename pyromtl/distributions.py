"""Distributions pyromtl adds to Pyro.

:class:`TaskMixture` is the prior of VMTL: a mixture of diagonal Gaussians whose components
are the other tasks' variational posteriors, of the classifier ``w`` (eq. 6) or of the
representation ``z`` (eq. 9). Its KL from a diagonal Gaussian guide is registered with
:func:`torch.distributions.kl.register_kl` as the closed-form upper bound that VMTL's objective
(eq. 11) uses, so ``pyro.infer.TraceMeanField_ELBO`` picks it up analytically.

A ``TaskMixture(..., sampled=True)`` holds a random subset of a larger mixture's components with
importance weights: its KL bound is an unbiased estimate of the full mixture's (VMTL's z prior
with ``z_components < T - 1``, see ``models/vmtl.py``).

:class:`DiagNormal` is a diagonal Gaussian that keeps its mean and scale at their own
broadcastable shapes: HIB's noise channel ``N(Z, diag σ_j²)`` (``Z`` shared by the tasks, ``σ_j``
by the samples). Its KLs to a diagonal Gaussian prior (``Normal(...).to_event(k)`` or another
``DiagNormal``) and to a :class:`TaskMixture` are registered in closed form.

:class:`GaussianPrecision` is a multivariate Gaussian kept in precision form: BayesAgg-MTL's
priors and posteriors of its linear heads.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import pyro
import torch
from pyro.distributions import TorchDistribution, Unit
from pyro.distributions.util import broadcast_shape
from torch import Tensor
from torch.distributions import Independent, Normal, constraints
from torch.distributions.kl import register_kl

__all__ = ["KL_MODES", "DiagNormal", "GaussianPrecision", "TaskMixture", "factor"]

# The sample shapes torch's Distribution.sample/rsample take (its torch.types._size).
_SampleShape = torch.Size | list[int] | tuple[int, ...]

#: Values of :class:`TaskMixture`'s ``kl`` argument.
KL_MODES = ("upper_bound", "monte_carlo")


class _MixtureWeights(constraints.Constraint):
    """The simplex, up to the rounding of a sum over C weights.

    ``constraints.simplex`` allows a fixed 1e-6, which float32 Gumbel-Softmax weights of many
    tasks can exceed.
    """

    event_dim = 1

    def check(self, value: torch.Tensor) -> torch.Tensor:
        tolerance = max(1e-6, 4 * value.shape[-1] * torch.finfo(value.dtype).eps)
        return (value >= 0).all(-1) & ((value.sum(-1) - 1).abs() <= tolerance)


class _ImportanceWeights(constraints.Constraint):
    """Non-negative weights of a sampled mixture: each sums to 1 only in expectation."""

    event_dim = 1

    def check(self, value: torch.Tensor) -> torch.Tensor:
        return (value >= 0).all(-1)


class _UnexpandedParams(TorchDistribution):
    """A distribution that keeps its parameters at their own shapes: real-valued events, and an
    :meth:`expand` that returns the same type (not an ``ExpandedDistribution``, which would hide
    the registered KLs under ``pyro.plate``) sharing the parameters, which :meth:`_share` copies."""

    @property
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, len(self.event_shape))

    def _share(self, new: _UnexpandedParams) -> None:
        raise NotImplementedError

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape and _instance is None:
            return self  # Pyro's broadcast expands every site's distribution, mostly to its own shape
        cls = type(self)
        new = self._get_checked_instance(cls, _instance)
        if broadcast_shape(self.batch_shape, batch_shape) != batch_shape:
            raise RuntimeError(
                f"cannot expand {cls.__name__} of batch_shape {tuple(self.batch_shape)} to {tuple(batch_shape)}"
            )
        self._share(new)
        TorchDistribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new


class TaskMixture(_UnexpandedParams):
    r"""Mixture of diagonal Gaussians ``p(x) = Σ_c w_c N(x | loc_c, diag scale_c²)``.

    VMTL's priors are of this form: ``p(w_t) = Σ_{i≠t} α_ti q(w_i)`` (eq. 6) and
    ``p(z_tn | x_tn) = Σ_{i≠t} β_ti q(z | x_tn, D_i)`` (eq. 9), with the own task's weight 0.

    :param weights: mixing weights ``[..., C]`` on the simplex; zero weights are allowed and
        contribute nothing (no NaN in values or gradients).
    :param loc: component means ``[..., C, *event_shape]``.
    :param scale: component standard deviations, same layout as ``loc``.
    :param event_dim: number of rightmost dims of ``loc`` that form one event (1 for ``z [d]``,
        2 for ``w [K, d]``); the component dim sits just left of them.
    :param kl: how ``kl_divergence(diagonal Normal, TaskMixture)`` is computed. ``"upper_bound"``
        returns the closed-form bound ``Σ_c w_c KL(q ‖ N(loc_c, scale_c))`` (eq. 11); with
        ``"monte_carlo"`` it raises ``NotImplementedError``, so ``TraceMeanField_ELBO`` falls
        back to a Monte-Carlo estimate of the exact KL to the mixture.
    :param sampled: the components are a random subset ``S`` of a larger mixture ``Σ_i w_i p_i``,
        and ``weights`` are importance weights ``w_i / P(i ∈ S)`` (Horvitz–Thompson), so that
        ``Σ_{c∈S} weights_c g(p_c)`` is an unbiased estimate of ``Σ_i w_i g(p_i)`` for any
        per-component ``g``. The registered KL then returns an unbiased estimate of the full
        mixture's bound ``Σ_i w_i KL(q ‖ p_i)`` (eq. 11), in value and in gradient; the weights
        need only be ``>= 0``. Such a mixture is an estimator, not the full prior:
        :meth:`log_prob`, sampling, :attr:`mean` and :attr:`variance` are those of the subset with
        its weights renormalised (uniform over the subset if they are all 0), and
        ``kl="monte_carlo"`` is refused, since the exact KL to a subset is no unbiased estimate of
        the KL to the full mixture.

    ``batch_shape`` is the broadcast of ``weights.shape[:-1]`` and the batch dims of ``loc`` and
    ``scale``. :meth:`expand` returns a ``TaskMixture`` (not an ``ExpandedDistribution``), which
    keeps the registered KL reachable under ``pyro.plate``.

    ``has_rsample`` is ``False``: :meth:`rsample` reparameterises only the Gaussian draw given a
    sampled component, so no gradient flows to ``weights`` through samples. As a prior, the site is
    replayed from the guide in SVI and never sampled from in the loss.

    Raises:
        ValueError: a negative ``event_dim``, an unknown ``kl``, ``sampled`` with
            ``kl="monte_carlo"``, or ``weights``, ``loc`` or ``scale`` without a component dim.
    """

    has_rsample = False

    def __init__(
        self,
        weights: torch.Tensor,
        loc: torch.Tensor,
        scale: torch.Tensor,
        *,
        event_dim: int,
        kl: Literal["upper_bound", "monte_carlo"] = "upper_bound",
        sampled: bool = False,
        validate_args: bool | None = None,
    ):
        if event_dim < 0:
            raise ValueError(f"event_dim must be >= 0, got {event_dim}")
        if kl not in KL_MODES:
            raise ValueError(f"kl must be one of {list(KL_MODES)}, got {kl!r}")
        if sampled and kl != "upper_bound":
            raise ValueError(
                "a sampled TaskMixture (a random subset of the components, importance-weighted) estimates "
                "the KL upper bound only; kl='monte_carlo' needs every component"
            )
        for name, t in (("loc", loc), ("scale", scale)):
            if t.dim() < event_dim + 1:
                raise ValueError(
                    f"{name} of shape {tuple(t.shape)} needs a component dim left of its {event_dim} event dim(s)"
                )
        if weights.dim() < 1:
            raise ValueError("weights need a component dim (the last one)")
        comp = -(event_dim + 1)
        # Pyro's broadcast_shape: torch.broadcast_shapes costs ~50 us a call, and this runs every step.
        event_shape = torch.Size(
            broadcast_shape(loc.shape[loc.dim() - event_dim :], scale.shape[scale.dim() - event_dim :])
        )
        batch_shape = torch.Size(broadcast_shape(weights.shape[:-1], loc.shape[:comp], scale.shape[:comp]))
        num_components = broadcast_shape(weights.shape[-1:], loc.shape[comp : comp + 1], scale.shape[comp : comp + 1])
        # Kept as given: plates expand the batch shape (e.g. over Monte-Carlo draws), and the KL
        # and log_prob broadcast these small tensors instead of materialising the expansion.
        self._weights, self._loc, self._scale = weights, loc, scale
        self._num_components = num_components[0]
        self.kl = kl
        self.sampled = sampled
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    @property
    def arg_constraints(self) -> dict[str, constraints.Constraint]:
        # A sampled mixture's importance weights sum to 1 only in expectation.
        weights = _ImportanceWeights() if self.sampled else _MixtureWeights()
        return {"weights": weights, "loc": constraints.real, "scale": constraints.positive}

    @property
    def weights(self) -> torch.Tensor:
        """Mixing weights ``[*batch_shape, C]`` (a broadcast view, no copy); importance weights if ``sampled``."""
        return self._weights.expand(self.batch_shape + (self._num_components,))

    @property
    def loc(self) -> torch.Tensor:
        """Component means ``[*batch_shape, C, *event_shape]`` (a broadcast view)."""
        return self._loc.expand(self.batch_shape + (self._num_components,) + self.event_shape)

    @property
    def scale(self) -> torch.Tensor:
        """Component standard deviations, laid out as :attr:`loc` (a broadcast view)."""
        return self._scale.expand(self.batch_shape + (self._num_components,) + self.event_shape)

    @property
    def num_components(self) -> int:
        return self._num_components

    def _share(self, new: TaskMixture) -> None:
        new._weights, new._loc, new._scale = self._weights, self._loc, self._scale
        new._num_components = self._num_components
        new.kl = self.kl
        new.sampled = self.sampled

    def _mixing_weights(self) -> torch.Tensor:
        """The (compact) weights of the distribution itself: a sampled mixture's, renormalised."""
        weights = _compact(self._weights)
        if not self.sampled:
            return weights
        total = weights.sum(-1, keepdim=True)
        # No mass on the subset (all weights 0, e.g. underflowed Gumbel-Softmax weights): uniform
        # over it, so log_prob and sampling stay defined (the KL estimate is 0 then, as it should).
        return torch.where(
            total > 0,
            weights / total.clamp_min(torch.finfo(total.dtype).tiny),
            torch.full_like(weights, 1.0 / weights.shape[-1]),
        )

    def _log_weights(self) -> torch.Tensor:
        # log(0) has an infinite derivative and 0 * inf = NaN in backward: only take the log of
        # positive weights, and give zero weights -inf so logsumexp ignores them.
        weights = self._mixing_weights()
        positive = weights > 0
        safe = torch.where(positive, weights, torch.ones_like(weights))
        return torch.where(positive, safe.log(), torch.full_like(safe, -torch.inf))

    def _component_dim(self) -> int:
        return -(len(self.event_shape) + 1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Exact ``log Σ_c w_c Π_e N(value_e | loc_ce, scale_ce)``, shape ``sample_shape + batch_shape``."""
        if self._validate_args:
            self._validate_sample(value)
        E = len(self.event_shape)
        # Work on the unexpanded parameters (plates broadcast them over Monte-Carlo draws) and
        # touch the full [..., C, *event] broadcast only in the subtraction, scaling and square-sum.
        loc, scale = _compact(self._loc), _compact(self._scale)
        norm = (value.unsqueeze(self._component_dim()) - loc) * scale.reciprocal()
        if E:
            norm = norm.flatten(-E)
            sq, log_scale = torch.linalg.vecdot(norm, norm), scale.log().flatten(-E).sum(-1)
        else:
            sq, log_scale = norm.square(), scale.log()
        per_comp = -0.5 * sq - log_scale - 0.5 * math.log(2 * math.pi) * self.event_shape.numel()
        log_prob = torch.logsumexp(per_comp + self._log_weights(), dim=-1)
        return log_prob.expand(broadcast_shape(value.shape[: value.dim() - E], self.batch_shape))

    def rsample(self, sample_shape: _SampleShape = torch.Size()) -> torch.Tensor:
        """Draw a component per element of the batch, then a Gaussian (reparameterised given the component)."""
        sample_shape = torch.Size(sample_shape)
        E = len(self.event_shape)
        comp = self._component_dim()
        with torch.no_grad():
            probs = self._mixing_weights().expand(self.batch_shape + (self.num_components,))
            index = torch.distributions.Categorical(probs=probs, validate_args=False).sample(sample_shape)
        full = sample_shape + self.batch_shape + torch.Size([self.num_components]) + self.event_shape
        index = index.reshape(index.shape + (1,) * (E + 1)).expand(
            sample_shape + self.batch_shape + (1,) + self.event_shape
        )
        loc = self.loc.expand(full).gather(comp, index).squeeze(comp)
        scale = self.scale.expand(full).gather(comp, index).squeeze(comp)
        return loc + scale * torch.randn_like(loc)

    def sample(self, sample_shape: _SampleShape = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def _weights_over_event(self) -> torch.Tensor:
        weights = self._mixing_weights().expand(self.batch_shape + (self.num_components,))
        return weights.reshape(weights.shape + (1,) * len(self.event_shape))

    @property
    def mean(self) -> torch.Tensor:
        return (self._weights_over_event() * self.loc).sum(self._component_dim())

    @property
    def variance(self) -> torch.Tensor:
        second_moment = (self._weights_over_event() * (self.scale**2 + self.loc**2)).sum(self._component_dim())
        return second_moment - self.mean**2


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t`` with each broadcast dim (stride 0, from ``expand``) cut to size 1.

    Such a dim repeats the same values, so computing on the view and broadcasting afterwards
    gives the same numbers (and gradients) with less work.
    """
    if all(stride or size == 1 for stride, size in zip(t.stride(), t.shape)):
        return t
    return t[tuple(slice(None) if stride or size == 1 else slice(0, 1) for stride, size in zip(t.stride(), t.shape))]


def _kl_diag_normal_mixture_bound(
    q_loc: torch.Tensor, q_scale: torch.Tensor, q_event_dim: int, p: TaskMixture
) -> torch.Tensor:
    r"""``Σ_c w_c KL(N(q_loc, q_scale) ‖ N(loc_c, scale_c))``, summed over the event dims.

    This is the upper bound of ``KL(q ‖ Σ_c w_c p_c)`` that VMTL uses (eq. 11, by convexity of
    the KL in its second argument); all components at once, no loop. For a sampled ``p`` the
    same sum over its subset, with importance weights, estimates the full bound without bias.
    """
    if p.kl == "monte_carlo":
        # TraceMeanField_ELBO catches this and estimates the exact mixture KL by sampling.
        raise NotImplementedError("TaskMixture(kl='monte_carlo') has no closed-form KL")
    p_event_dim = len(p.event_shape)
    if q_event_dim != p_event_dim:
        raise ValueError(
            f"KL(Normal ‖ TaskMixture): the guide has {q_event_dim} event dim(s) but the TaskMixture prior has "
            f"{p_event_dim}; declare the guide's distribution with .to_event({p_event_dim})"
        )
    comp = -(p_event_dim + 1)
    batch_shape = broadcast_shape(q_loc.shape[: q_loc.dim() - p_event_dim], p.batch_shape)
    # Plates broadcast q over the prior's MC draws and p over q's: compute on the unexpanded
    # tensors and broadcast the (event-summed) result, not the [..., C, *event] terms.
    q_loc, q_scale = _compact(q_loc).unsqueeze(comp), _compact(q_scale).unsqueeze(comp)
    terms = _kl_terms(q_loc, q_scale, _compact(p._loc), _compact(p._scale))
    kl = 0.5 * (_event_sum(terms, p.event_shape) - p.event_shape.numel())  # [..., C]
    return (_compact(p._weights) * kl).sum(-1).expand(batch_shape)


@register_kl(Independent, TaskMixture)
def _kl_independent_task_mixture(q: Independent, p: TaskMixture) -> torch.Tensor:
    # `.to_event(a).to_event(b)` may nest Independents; count all reinterpreted dims.
    base, event_dim = _normal_base(q)
    if base is None:
        raise NotImplementedError(f"no closed-form KL from {q} to TaskMixture")
    return _kl_diag_normal_mixture_bound(base.loc, base.scale, event_dim, p)


@register_kl(Normal, TaskMixture)
def _kl_normal_task_mixture(q: Normal, p: TaskMixture) -> torch.Tensor:
    return _kl_diag_normal_mixture_bound(q.loc, q.scale, 0, p)


def _event_sum(t: torch.Tensor, event_shape: torch.Size) -> torch.Tensor:
    """Sum over the event dims, counting those where ``t`` broadcasts (size 1) as often as the event has them."""
    E = len(event_shape)
    if not E:
        return t
    if t.shape[max(t.dim() - E, 0) :] != event_shape:
        t = t.reshape((1,) * max(E - t.dim(), 0) + t.shape)
        t = t.expand(*t.shape[: t.dim() - E], *event_shape)
    if E == 1:
        return t.sum(-1)
    return t.flatten(-E).sum(-1)


class DiagNormal(_UnexpandedParams):
    r"""``N(loc, diag scale²)`` over the rightmost ``event_dim`` dims, with ``loc`` and ``scale`` kept as given.

    ``Normal(loc, scale).expand(shape).to_event(k)`` broadcasts both to the full shape when it is
    built, and its KL works on that shape. Here they only need to broadcast to ``shape``:
    HIB's channel (eq. 1) has ``loc = Z`` of shape ``[1, B, D]`` and ``scale = σ_j`` of shape
    ``[T, 1, D]``, and a prior ``N(0, ξ_j²)`` has ``[T, 1, D]`` parameters, so the KL's variance
    terms cost ``[T, D]`` rather than ``[T, B, D]``, and building either costs no tensor op.
    The registry's ``normal`` and ``learned_normal`` priors are of this type.

    :param loc: the mean, broadcastable to ``shape``.
    :param scale: the standard deviation (positive), broadcastable to ``shape``.
    :param event_dim: how many rightmost dims of ``shape`` form one event.
    :param shape: ``batch_shape + event_shape`` (default: the broadcast of ``loc`` and ``scale``).
    :param zero_loc: a promise that ``loc`` is all zeros (a frozen zero mean, as the registry's
        Gaussian priors with ``loc = 0`` give): the closed-form KLs then skip subtracting it.

    :meth:`expand` returns a ``DiagNormal``, so the KLs registered below stay reachable under
    ``pyro.plate``: to and from ``Normal(...).to_event(k)`` (closed form), to a
    :class:`TaskMixture` (VMTL's bound, eq. 11), and Pyro's ``Delta`` to it (``-log_prob``).

    Raises:
        ValueError: ``loc`` and ``scale`` do not broadcast (to ``shape``, if given), or
            ``event_dim`` is outside ``[0, len(shape)]``.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "loc": constraints.real,
        "scale": constraints.positive,
    }
    has_rsample = True

    def __init__(
        self,
        loc: torch.Tensor,
        scale: torch.Tensor,
        event_dim: int = 1,
        shape: tuple[int, ...] | torch.Size | None = None,
        validate_args: bool | None = None,
        zero_loc: bool = False,
    ):
        try:
            params = broadcast_shape(loc.shape, scale.shape, *(() if shape is None else (shape,)))
        except ValueError:
            params = None
        if params is None or (shape is not None and params != tuple(shape)):
            raise ValueError(
                f"loc {tuple(loc.shape)} and scale {tuple(scale.shape)} do not broadcast"
                + ("" if shape is None else f" to {tuple(shape)}")
            )
        shape = params
        if not 0 <= event_dim <= len(shape):
            raise ValueError(f"event_dim must be in [0, {len(shape)}] for shape {tuple(shape)}, got {event_dim}")
        self.loc, self.scale, self.zero_loc = loc, scale, zero_loc
        split = len(shape) - event_dim
        super().__init__(torch.Size(shape[:split]), torch.Size(shape[split:]), validate_args=validate_args)

    def _share(self, new: DiagNormal) -> None:
        new.loc, new.scale, new.zero_loc = self.loc, self.scale, self.zero_loc

    @property
    def mean(self) -> torch.Tensor:
        return self.loc.expand(self.batch_shape + self.event_shape)

    @property
    def stddev(self) -> torch.Tensor:
        return self.scale.expand(self.batch_shape + self.event_shape)

    @property
    def variance(self) -> torch.Tensor:
        return self.scale.square().expand(self.batch_shape + self.event_shape)

    def rsample(self, sample_shape: _SampleShape = torch.Size()) -> torch.Tensor:
        eps = torch.randn(self._extended_shape(sample_shape), dtype=self.loc.dtype, device=self.loc.device)
        return torch.addcmul(self.loc, eps, self.scale)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        norm = _event_sum(((value - self.loc) / self.scale).square(), self.event_shape)
        log_norm = (
            _event_sum(self.scale.log(), self.event_shape) + 0.5 * math.log(2 * math.pi) * self.event_shape.numel()
        )
        E = len(self.event_shape)
        return (-0.5 * norm - log_norm).expand(broadcast_shape(value.shape[: value.dim() - E], self.batch_shape))

    def entropy(self) -> torch.Tensor:
        const = 0.5 * (1 + math.log(2 * math.pi)) * self.event_shape.numel()
        return (_event_sum(self.scale.log(), self.event_shape) + const).expand(self.batch_shape)


def _kl_terms(
    q_loc: torch.Tensor,
    q_scale: torch.Tensor,
    p_loc: torch.Tensor,
    p_scale: torch.Tensor,
    zero_loc: tuple[bool, bool] = (False, False),
) -> torch.Tensor:
    """``2 KL(N(q_loc, q_scale²) ‖ N(p_loc, p_scale²)) + 1`` per element, at the parameters' broadcast shape.

    That is ``r - log r + δ²/p_scale²`` with ``r = q_scale²/p_scale²`` and ``δ = q_loc - p_loc``;
    ``zero_loc`` says which locs are known zeros, so ``δ`` needs no subtraction (HIB: ``δ = Z``
    is ``[1, B, D]``, squared before it meets the ``[T, 1, D]`` scales). Few ops on purpose: at
    HIB's sizes each op's dispatch costs more than its arithmetic, so the full-shape work is
    one ``addcmul``.
    """
    inv_var = p_scale.pow(-2)
    ratio = q_scale.square() * inv_var
    diff = q_loc if zero_loc[1] else p_loc if zero_loc[0] else q_loc - p_loc
    return torch.addcmul(ratio - ratio.log(), diff.square(), inv_var)


def _kl_diag_normals(
    q_loc: torch.Tensor,
    q_scale: torch.Tensor,
    p_loc: torch.Tensor,
    p_scale: torch.Tensor,
    event_shape: torch.Size,
    batch_shape: torch.Size,
    zero_loc: tuple[bool, bool] = (False, False),
) -> torch.Tensor:
    """``Σ_event KL(N(q_loc, q_scale²) ‖ N(p_loc, p_scale²))`` from :func:`_kl_terms`, broadcast to ``batch_shape``."""
    kl = _event_sum(_kl_terms(q_loc, q_scale, p_loc, p_scale, zero_loc), event_shape)
    return kl.sub_(event_shape.numel()).mul_(0.5).expand(batch_shape)


def _normal_base(d: Independent) -> tuple[Normal | None, int]:
    """The base of ``Normal(...).to_event(k)`` (nested Independents allowed) and its event dims; None if not Normal."""
    base, event_dim = d, 0
    while isinstance(base, Independent):
        event_dim += base.reinterpreted_batch_ndims
        base = base.base_dist
    return (base if isinstance(base, Normal) else None), event_dim


def _diag_params(d) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(loc, scale)`` of a diagonal Gaussian (``DiagNormal``, ``Normal`` or ``Normal(...).to_event(k)``), or None.

    An expanded ``Normal`` holds stride-0 views (a prior broadcast over the plates): one copy is enough.
    """
    if isinstance(d, DiagNormal):
        return d.loc, d.scale
    base, _ = _normal_base(d) if isinstance(d, Independent) else (d, 0)
    if not isinstance(base, Normal):
        return None
    return _compact(base.loc), _compact(base.scale)


def _kl_gaussians(q, p) -> torch.Tensor:
    """The closed-form KL between two diagonal Gaussians, one of them a ``DiagNormal``."""
    q_params, p_params = _diag_params(q), _diag_params(p)
    if q_params is None or p_params is None:
        raise NotImplementedError(f"no closed-form KL from {q} to {p}")
    if q.event_shape != p.event_shape:
        raise ValueError(
            f"KL({type(q).__name__} ‖ {type(p).__name__}): event shapes {tuple(q.event_shape)} and "
            f"{tuple(p.event_shape)} differ"
        )
    return _kl_diag_normals(
        *q_params,
        *p_params,
        q.event_shape,
        broadcast_shape(q.batch_shape, p.batch_shape),
        (getattr(q, "zero_loc", False), getattr(p, "zero_loc", False)),
    )


register_kl(DiagNormal, DiagNormal)(_kl_gaussians)
register_kl(DiagNormal, Independent)(_kl_gaussians)
register_kl(Independent, DiagNormal)(_kl_gaussians)
register_kl(Normal, DiagNormal)(_kl_gaussians)


@register_kl(DiagNormal, TaskMixture)
def _kl_diag_task_mixture(q: DiagNormal, p: TaskMixture) -> torch.Tensor:
    # Full-shape views (the bound compacts them again), so its batch shape is q's.
    return _kl_diag_normal_mixture_bound(q.mean, q.stddev, len(q.event_shape), p)


class GaussianPrecision(TorchDistribution):
    """``N(loc, precision⁻¹)`` over the last dim, kept in precision form.

    BayesAgg's priors and posteriors are precisions (``S_p⁻¹ + HᵀH``, ``B̃``); building one is free
    and only :meth:`rsample` and :meth:`log_prob` factorise it. ``precision`` is ``[P, P]`` (shared
    by the whole batch, e.g. an isotropic prior) or ``[*batch_shape, P, P]``.

    Args:
        loc: the mean ``[*batch_shape, P]``.
        precision: the precision, ``[P, P]`` or ``[*batch_shape, P, P]``, positive definite
            (checked only when factorised: :meth:`rsample` and :meth:`log_prob` then raise
            ``torch.linalg.LinAlgError``).
        validate_args: ignored (no argument validation).

    Raises:
        ValueError: batch shapes of ``loc`` and ``precision`` that do not broadcast.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: Tensor, precision: Tensor, validate_args=None):
        self.loc, self.precision = loc, precision
        batch_shape = torch.Size(broadcast_shape(loc.shape[:-1], precision.shape[:-2]))
        super().__init__(batch_shape, loc.shape[-1:], validate_args=False)

    def expand(self, batch_shape, _instance=None) -> GaussianPrecision:
        new = self._get_checked_instance(GaussianPrecision, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        # a shared precision stays one matrix
        new.precision = (
            self.precision
            if self.precision.dim() == 2
            else self.precision.expand(batch_shape + self.precision.shape[-2:])
        )
        super(GaussianPrecision, new).__init__(batch_shape, self.event_shape, validate_args=False)
        return new

    @property
    def mean(self) -> Tensor:
        return self.loc.expand(self.batch_shape + self.event_shape)

    def _factor(self) -> Tensor:
        return torch.linalg.cholesky(self.precision)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        # precision = L Lᵀ, so L⁻ᵀ ε has covariance precision⁻¹
        eps = torch.randn(
            torch.Size(sample_shape) + self.batch_shape + self.event_shape, dtype=self.loc.dtype, device=self.loc.device
        )
        factor = self._factor().mT.expand(eps.shape + eps.shape[-1:])
        return self.loc + torch.linalg.solve_triangular(factor, eps.unsqueeze(-1), upper=True).squeeze(-1)

    def log_prob(self, value: Tensor) -> Tensor:
        factor = self._factor()
        white = ((value - self.loc).unsqueeze(-2) @ factor).squeeze(-2)  # Lᵀ(x − m)
        half_log_det = factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return -0.5 * white.square().sum(-1) + half_log_det - 0.5 * self.event_shape[0] * math.log(2 * math.pi)


class _Unit(Unit):
    """Pyro's ``Unit`` (the distribution of ``pyro.factor``) with the factor kept as it is: Pyro's
    own copies it with ``torch.as_tensor``, onto torch's default device whatever its own device."""

    def __init__(self, log_factor: Tensor):
        self.log_factor = log_factor
        TorchDistribution.__init__(self, log_factor.shape, torch.Size((0,)))

    def expand(self, batch_shape, _instance=None) -> _Unit:
        return super().expand(batch_shape, _instance=self._get_checked_instance(_Unit, _instance))


def factor(name: str, log_factor: Tensor) -> None:
    """``pyro.factor(name, log_factor)`` in a model, on the factor's device (see :class:`_Unit`).

    Args:
        name: the site's name.
        log_factor: the log-density term added to the model, any shape.
    """
    unit = _Unit(log_factor)
    pyro.sample(name, unit, obs=unit.sample(), infer={"is_auxiliary": True})
