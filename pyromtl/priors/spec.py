"""A prior as data, and what a prior kind's builder is given: :class:`PriorSpec`,
:class:`PriorKind` and :class:`PriorContext`, with the parameter checks kinds share."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Protocol, cast

import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin
from torch.distributions import constraints

from pyromtl.schedules import as_schedule

# what pyro.sample takes: a torch distribution with Pyro's mixin
Builder = Callable[["PriorSpec", "PriorContext"], TorchDistributionMixin]
Check = Callable[[Any], Any]


@dataclass(frozen=True)
class PriorSpec:
    """A prior as data: its registered ``kind`` and its parameters.

    Treat ``params`` as read-only. :func:`parse_spec` returns specs whose ``params`` hold every
    parameter of the kind (defaults filled in), so two specs of the same prior compare equal
    however they were written.
    """

    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The TOML table of this spec: ``{"kind": ..., **params}``.

        Returns:
            A new dict.
        """
        return {"kind": self.kind, **{k: dict(v) if isinstance(v, Mapping) else v for k, v in self.params.items()}}


@dataclass(frozen=True)
class PriorKind:
    """A prior kind: its name, builder, parameters with their defaults, and their checks.

    :param builder: ``builder(spec, ctx) -> Distribution``.
    :param defaults: the accepted parameter names and their default values. A value a user
        gives is checked against the type of its default (bool, number, string) unless
        ``checks`` has an entry for that name.
    :param checks: per-parameter functions ``value -> normalised value`` that raise
        ``ValueError`` with a short reason for an invalid value.
    :param uses_components: whether the builder reads ``ctx.components``. ``False`` lets a model
        skip computing them (VMTL's z components cost an attention pass and an encoder pass over
        every sample's other tasks).

    Raises:
        ValueError: ``checks`` names a parameter without a default.
    """

    name: str
    builder: Builder
    defaults: Mapping[str, Any] = field(default_factory=dict)
    checks: Mapping[str, Check] = field(default_factory=dict)
    uses_components: bool = True

    def __post_init__(self) -> None:
        if unknown := sorted(set(self.checks) - set(self.defaults)):
            raise ValueError(
                f"checks for parameter(s) {unknown} of prior kind {self.name!r}, which has no defaults for them"
            )

    def parse(self, given: Mapping[str, Any]) -> PriorSpec:
        """The spec of this kind with ``given`` parameters checked and the defaults filled in.

        Args:
            given: ``{parameter: value}``, any subset of the kind's parameters.

        Returns:
            The resolved spec.

        Raises:
            ValueError: an unknown parameter, or a value its check refuses.
        """
        if unknown := sorted(set(given) - set(self.defaults)):
            raise ValueError(
                f"unknown parameter(s) {unknown} for prior kind {self.name!r}; valid parameters: "
                f"{sorted(self.defaults)}"
            )
        params = {}
        for name, default in self.defaults.items():
            value = given.get(name, default)
            try:
                params[name] = self.checks[name](value) if name in self.checks else check_like_default(value, default)
            except ValueError as err:
                raise ValueError(f"prior kind {self.name!r}, parameter {name!r}: {err}") from None
        return PriorSpec(self.name, params)


def check_like_default(value: Any, default: Any) -> Any:
    """Generic check: the value must have the type of its default (ints count as numbers)."""
    if default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value
    if isinstance(default, Real):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        if isinstance(default, int) and not float(value).is_integer():
            raise ValueError(f"must be an integer, got {value!r}")
        # the default's concrete type (int, float, ...) converts; the Real ABC's own constructor takes nothing
        return cast(Callable[[Any], Any], type(default))(value)
    if not isinstance(value, type(default)):
        raise ValueError(f"must be of type {type(default).__name__}, got {value!r}")
    return value


def positive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number, got {value!r}")
    return float(value)


def one_of(options: tuple[str, ...]) -> Check:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of {list(options)}, got {value!r}")
        return value

    return check


def temperature(value: Any) -> float | dict[str, Any]:
    schedule = as_schedule(value)
    if schedule.minimum() <= 0:
        raise ValueError(f"the temperature must stay > 0, got {value!r}")
    return schedule.to_config()


class ParamOwner(Protocol):
    """What stores a prior's learned parameters and cached constants (a :class:`~pyromtl.priors.PriorSite`)."""

    constants: dict[tuple, torch.Tensor]

    def param(
        self, name: str, init: torch.Tensor, constraint: constraints.Constraint = constraints.real
    ) -> torch.Tensor: ...


@dataclass
class PriorContext:
    """What a prior builder may know about the site it builds for.

    :param site: the latent site's name (``"w"``, ``"z"``).
    :param batch_shape: batch shape of the site's distribution (e.g. ``(T, 1)`` for ``w``,
        ``(T, B)`` for ``z``).
    :param event_shape: event shape (``(K, d)`` for ``w``, ``(d,)`` for ``z``).
    :param num_tasks: the number of tasks T.
    :param step: the training step, for annealed parameters.
    :param total_steps: the run's length, for schedules written relative to it (``None``: unknown).
    :param components: ``(loc, scale)`` of mixture components, broadcastable to
        ``batch_shape + (T,) + event_shape``; component ``i`` is task i's variational posterior
        (VMTL eq. 6) or ``q(z | f(x, D_i))`` (eq. 9). The caller decides whether gradients flow
        through them: VMTL detaches both (the previous iteration's posteriors) unless its
        ``z_prior_grad`` option says otherwise. Builders pass them through unchanged. A model may
        pass ``C`` components of named tasks instead of all T (``task_mixture``'s
        ``component_tasks`` extra).
    :param task_axis: the dim of ``batch_shape`` that indexes the task owning each row (negative
        or non-negative; default: the first batch dim). Stored as a negative index.
    :param device: where new tensors go; default the components' device, else the CPU.
    :param dtype: their dtype; default the components' dtype, else torch's default dtype.
    :param owner: the :class:`PriorSite` that stores learned parameters (see :meth:`param`).
    :param extras: whatever else a prior kind needs, by name, from the model that builds it
        (e.g. statistics of the full training set's features, or the previous batch's
        posterior, for a last-layer prior); builders read what they need and say so.
    """

    site: str
    batch_shape: torch.Size
    event_shape: torch.Size
    num_tasks: int
    step: int = 0
    total_steps: int | None = None
    components: tuple[torch.Tensor, torch.Tensor] | None = None
    task_axis: int | None = None
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    owner: ParamOwner | None = field(default=None, repr=False)
    extras: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.batch_shape = torch.Size(self.batch_shape)
        self.event_shape = torch.Size(self.event_shape)
        n = len(self.batch_shape)
        if self.task_axis is None:
            self.task_axis = -n if n else None
        elif not -n <= self.task_axis < n:
            raise ValueError(f"task_axis {self.task_axis} is out of range for batch_shape {tuple(self.batch_shape)}")
        else:
            self.task_axis = self.task_axis - n if self.task_axis >= 0 else self.task_axis
        if self.components is not None:
            loc, _scale = self.components
            self.device = self.device if self.device is not None else loc.device
            self.dtype = self.dtype if self.dtype is not None else loc.dtype
        self.device = torch.device(self.device if self.device is not None else "cpu")
        self.dtype = self.dtype if self.dtype is not None else torch.get_default_dtype()

    def full(self, shape: tuple[int, ...] | torch.Size, value: float) -> torch.Tensor:
        """A constant tensor on this context's device and dtype; read it, never write to it.

        Built through a :class:`PriorSite`, the same tensor is returned at every build, since
        priors ask for the same constants every step.

        Args:
            shape: the tensor's shape.
            value: its value.

        Returns:
            The constant tensor (possibly shared: do not write to it).
        """
        key = (tuple(shape), float(value), self.device, self.dtype)
        cache = self.owner.constants if self.owner is not None else {}
        out = cache.get(key)
        if out is None:
            if len(cache) >= 64:  # shapes that change with the batch size: keep the cache small
                cache.clear()
            out = cache[key] = torch.full(key[0], key[1], device=self.device, dtype=self.dtype)
        return out

    def param(
        self, name: str, init: torch.Tensor, constraint: constraints.Constraint = constraints.real
    ) -> torch.Tensor:
        """A persistent learnable parameter of this site, created from ``init`` on first use.

        The owner stores it unconstrained and returns ``transform_to(constraint)`` of it, so
        the optimiser works in unconstrained space.

        Args:
            name: the parameter's name within the site.
            init: its initial (constrained) value, which also fixes its shape.
            constraint: the constraint the returned value satisfies.

        Returns:
            The constrained value, differentiable with respect to the stored parameter.

        Raises:
            RuntimeError: the context has no owner (it was not built through a :class:`PriorSite`).
            ValueError: the stored parameter's shape differs from ``init``'s.
        """
        if self.owner is None:
            raise RuntimeError(
                f"prior of site {self.site!r} wants a learned parameter {name!r}, but its context has no owner; "
                "build it through a PriorSite"
            )
        return self.owner.param(name, init, constraint)

    def along_tasks(self, matrix: torch.Tensor) -> torch.Tensor:
        """View a ``[T, C]`` matrix with its rows on ``task_axis`` of ``batch_shape`` (other dims 1), then ``C``.

        Args:
            matrix: ``[T, C]``.

        Returns:
            A view shaped ``[1, ..., T, ..., 1, C]``.

        Raises:
            ValueError: the site has no task axis.
        """
        if self.task_axis is None:
            raise ValueError(f"site {self.site!r} has no batch dims, so no task axis")
        n = len(self.batch_shape)
        shape = [1] * n + [matrix.shape[-1]]
        shape[n + self.task_axis] = matrix.shape[0]
        return matrix.reshape(shape)
