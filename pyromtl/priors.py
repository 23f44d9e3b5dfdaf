"""Declarative priors: a prior is a ``kind`` plus parameters, built by a registered function.

A spec is written as a :class:`PriorSpec`, a kind name, or a table (dict / TOML)::

    [priors.w]
    kind = "task_mixture"
    weights = "gumbel_softmax"
    temperature = { start = 5.0, end = 0.5, rate = 1e-3 }

:func:`parse_spec` validates it against the kind's registered defaults (unknown kinds and
parameters fail fast, naming the valid ones) and fills in the missing parameters, so a parsed
spec is the fully resolved prior. :func:`build` turns a spec plus a :class:`PriorContext`
(the site's shapes, the task count, the step, the mixture components) into a distribution.
Models own one :class:`PriorSite` per latent site, which holds the prior's learned
parameters (e.g. VMTL's π, eq. 7) as ordinary ``torch.nn.Parameter`` s.

Built-in kinds: ``normal``, ``learned_normal``, ``task_mixture`` (VMTL eq. 6, 7, 9) and
``deterministic`` (a flat prior; the guide then uses a point mass). New kinds are one
decorated function away, see :func:`register`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import TYPE_CHECKING, Any, Callable, Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.util import broadcast_shape
from torch.distributions import Distribution, constraints

from pyromtl.distributions import KL_MODES, DiagNormal, TaskMixture
from pyromtl.params import LocalParamsModule
from pyromtl.schedules import as_schedule

if TYPE_CHECKING:
    from pyromtl.base import TrainState

__all__ = [
    "PriorSpec",
    "PriorContext",
    "PriorSite",
    "parse_spec",
    "register",
    "build",
    "available",
    "describe",
    "mixture_weights",
    "other_tasks",
    "MIXTURE_WEIGHTS",
]

#: Values of the ``weights`` parameter of ``task_mixture`` (the ablation of VMTL Table 2).
MIXTURE_WEIGHTS = ("gumbel_softmax", "learned", "uniform")

Builder = Callable[["PriorSpec", "PriorContext"], Distribution]
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
        """The TOML table of this spec: ``{"kind": ..., **params}``."""
        return {"kind": self.kind, **{k: dict(v) if isinstance(v, Mapping) else v for k, v in self.params.items()}}


@dataclass(frozen=True)
class _Kind:
    builder: Builder
    defaults: dict[str, Any]
    checks: dict[str, Check]
    uses_components: bool = True


_REGISTRY: dict[str, _Kind] = {}


def register(
    kind: str,
    *,
    defaults: Mapping[str, Any] | None = None,
    checks: Mapping[str, Check] | None = None,
    uses_components: bool = True,
    replace: bool = False,
) -> Callable[[Builder], Builder]:
    """Decorator that registers ``fn(spec, ctx) -> Distribution`` as the builder of prior ``kind``.

    :param defaults: the accepted parameter names and their default values (``None``: the kind
        takes no parameters). Values given by a user are checked against the type of the
        default (bool, number, string) unless ``checks`` has an entry for that name.
    :param checks: per-parameter functions ``value -> normalised value`` that raise
        ``ValueError`` with a short reason for an invalid value.
    :param uses_components: whether the builder reads ``ctx.components``. Declare ``False`` when
        it does not: a model may then skip computing them (VMTL's z components cost an attention
        pass and an encoder pass over every sample's other tasks).
    :param replace: allow re-registering an existing kind.

    Example::

        @register("laplace", defaults={"scale": 1.0})
        def laplace(spec, ctx):
            d = dist.Laplace(torch.zeros((), device=ctx.device), spec.params["scale"])
            return d.expand(ctx.batch_shape + ctx.event_shape).to_event(len(ctx.event_shape))
    """
    defaults = dict(defaults or {})
    checks = dict(checks or {})
    if unknown := sorted(set(checks) - set(defaults)):
        raise ValueError(f"checks for parameter(s) {unknown} of prior kind {kind!r}, which has no defaults for them")
    if kind in _REGISTRY and not replace:
        raise ValueError(f"prior kind {kind!r} is already registered; pass replace=True to override it")

    def decorator(fn: Builder) -> Builder:
        _REGISTRY[kind] = _Kind(fn, defaults, checks, uses_components)
        return fn

    return decorator


def available() -> list[str]:
    """Names of the registered prior kinds, sorted."""
    return sorted(_REGISTRY)


def describe(kind: str) -> dict[str, Any]:
    """The parameters of prior ``kind`` with their default values."""
    return dict(_lookup(kind).defaults)


def uses_components(kind: str) -> bool:
    """Whether prior ``kind`` reads mixture components (see :func:`register`)."""
    return _lookup(kind).uses_components


def _lookup(kind: Any) -> _Kind:
    if not isinstance(kind, str) or kind not in _REGISTRY:
        raise ValueError(f"unknown prior kind {kind!r}; available kinds: {available()}")
    return _REGISTRY[kind]


def _check_like_default(value: Any, default: Any) -> Any:
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
        return type(default)(value)
    if not isinstance(value, type(default)):
        raise ValueError(f"must be of type {type(default).__name__}, got {value!r}")
    return value


def parse_spec(obj: PriorSpec | str | Mapping[str, Any]) -> PriorSpec:
    """Validate a prior spec and fill in its defaults.

    ``obj`` is a :class:`PriorSpec`, a kind name (``"normal"``) or a table with a ``kind`` key and
    the kind's parameters (a dict, e.g. from ``tomllib``). Raises ``ValueError`` naming an unknown
    kind or parameter (with the valid ones) or an invalid value.
    """
    if isinstance(obj, PriorSpec):
        kind, given = obj.kind, dict(obj.params)
    elif isinstance(obj, str):
        kind, given = obj, {}
    elif isinstance(obj, Mapping):
        if "kind" not in obj:
            raise ValueError(f"prior table {dict(obj)!r} has no 'kind'; available kinds: {available()}")
        given = {k: v for k, v in obj.items() if k != "kind"}
        kind = obj["kind"]
    else:
        raise ValueError(f"a prior spec is a kind name, a table with a 'kind' key or a PriorSpec, got {obj!r}")
    entry = _lookup(kind)
    if unknown := sorted(set(given) - set(entry.defaults)):
        raise ValueError(f"unknown parameter(s) {unknown} for prior kind {kind!r}; valid parameters: {sorted(entry.defaults)}")
    params = {}
    for name, default in entry.defaults.items():
        value = given.get(name, default)
        try:
            params[name] = entry.checks[name](value) if name in entry.checks else _check_like_default(value, default)
        except ValueError as err:
            raise ValueError(f"prior kind {kind!r}, parameter {name!r}: {err}") from None
    return PriorSpec(kind, params)


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
    owner: "PriorSite | None" = field(default=None, repr=False)
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
            loc, scale = self.components
            self.device = self.device if self.device is not None else loc.device
            self.dtype = self.dtype if self.dtype is not None else loc.dtype
        self.device = torch.device(self.device if self.device is not None else "cpu")
        self.dtype = self.dtype if self.dtype is not None else torch.get_default_dtype()

    def full(self, shape: tuple[int, ...] | torch.Size, value: float) -> torch.Tensor:
        """A constant tensor on this context's device and dtype; read it, never write to it.

        Built through a :class:`PriorSite`, the same tensor is returned at every build, since
        priors ask for the same constants every step.
        """
        key = (tuple(shape), float(value), self.device, self.dtype)
        cache = self.owner._constants if self.owner is not None else {}
        out = cache.get(key)
        if out is None:
            if len(cache) >= 64:  # shapes that change with the batch size: keep the cache small
                cache.clear()
            out = cache[key] = torch.full(key[0], key[1], device=self.device, dtype=self.dtype)
        return out

    def param(self, name: str, init: torch.Tensor, constraint: constraints.Constraint = constraints.real) -> torch.Tensor:
        """A persistent learnable parameter of this site, created from ``init`` on first use.

        The owner stores it unconstrained and returns ``transform_to(constraint)`` of it, so
        the optimiser works in unconstrained space.
        """
        if self.owner is None:
            raise RuntimeError(
                f"prior of site {self.site!r} wants a learned parameter {name!r}, but its context has no owner; "
                "build it through a PriorSite"
            )
        return self.owner.param(name, init, constraint)

    def along_tasks(self, matrix: torch.Tensor) -> torch.Tensor:
        """View a ``[T, C]`` matrix with its rows on ``task_axis`` of ``batch_shape`` (other dims 1), then ``C``."""
        if self.task_axis is None:
            raise ValueError(f"site {self.site!r} has no batch dims, so no task axis")
        n = len(self.batch_shape)
        shape = [1] * n + [matrix.shape[-1]]
        shape[n + self.task_axis] = matrix.shape[0]
        return matrix.reshape(shape)


def build(spec: PriorSpec | str | Mapping[str, Any], ctx: PriorContext) -> Distribution:
    """Parse ``spec``, call its kind's builder and check the result's shapes against ``ctx``."""
    return _build_parsed(parse_spec(spec), ctx)


def _build_parsed(spec: PriorSpec, ctx: PriorContext) -> Distribution:
    prior = _REGISTRY[spec.kind].builder(spec, ctx)
    if prior.batch_shape != ctx.batch_shape or prior.event_shape != ctx.event_shape:
        raise ValueError(
            f"prior kind {spec.kind!r} for site {ctx.site!r} built batch_shape {tuple(prior.batch_shape)} and event_shape "
            f"{tuple(prior.event_shape)}, but the site needs {tuple(ctx.batch_shape)} and {tuple(ctx.event_shape)}"
        )
    return prior


def _transform_to(constraint: constraints.Constraint) -> torch.distributions.Transform:
    """``transform_to(constraint)``, with ``exp`` alone for ``positive``.

    torch maps ``positive`` through ``exp`` and then the identity ``0 + 1·x``: the same values,
    two more ops and autograd nodes on every use.
    """
    if constraint is constraints.positive:
        return torch.distributions.ExpTransform()
    return torch.distributions.transform_to(constraint)


class PriorSite(LocalParamsModule):
    """The prior of one latent site, owned by a model; builds a distribution per call.

    Learned prior parameters (``learned_normal``'s loc/scale, ``task_mixture``'s logits π) are
    created lazily on the first :meth:`build` as ``torch.nn.Parameter`` s in :attr:`params`, so
    they appear in ``parameters()`` and ``state_dict()``. Build optimisers after one dry-run
    call. ``load_state_dict`` also creates parameters it finds in the state dict and does not hold
    yet, so a checkpoint loads into a fresh site (the trainer's dry run beforehand is harmless).

    :param site: the latent site's name.
    :param spec: its prior spec (anything :func:`parse_spec` takes).
    :param device: default device for new tensors (follows ``.to()``); a build's components or an
        explicit ``device=`` take precedence.
    """

    def __init__(self, site: str, spec: PriorSpec | str | Mapping[str, Any], device: torch.device | str | None = None):
        super().__init__()
        self.site = site
        self.spec = parse_spec(spec)
        self.params = torch.nn.ParameterDict()
        self._transforms: dict[str, torch.distributions.Transform] = {}
        self._constants: dict[tuple, torch.Tensor] = {}  # PriorContext.full's, by shape, value, device, dtype
        # An empty buffer that moves with .to(): the device for priors without components.
        self.register_buffer("_anchor", torch.empty(0, device=device), persistent=False)
        self.num_tasks: int | None = None

    def param(self, name: str, init: torch.Tensor, constraint: constraints.Constraint = constraints.real) -> torch.Tensor:
        """See :meth:`PriorContext.param`."""
        transform = self._transforms.get(name)
        if transform is None:
            transform = self._transforms[name] = _transform_to(constraint)
        if name not in self.params:
            with torch.no_grad():
                self.params[name] = torch.nn.Parameter(transform.inv(init.detach()).clone())
        raw = self.params[name]
        if raw.shape != init.shape:
            raise ValueError(
                f"prior parameter {self.site}.{name} has shape {tuple(raw.shape)} but {tuple(init.shape)} is asked; "
                "did the number of tasks or the latent size change?"
            )
        return transform(raw)

    def context(
        self,
        *,
        batch_shape: tuple[int, ...] | torch.Size,
        event_shape: tuple[int, ...] | torch.Size,
        num_tasks: int,
        state: "TrainState | None" = None,
        components: tuple[torch.Tensor, torch.Tensor] | None = None,
        task_axis: int | None = None,
        device: torch.device | str | None = None,
        extras: Mapping[str, Any] | None = None,
    ) -> PriorContext:
        """The :class:`PriorContext` of one build, owned by this site.

        ``state`` is the model's :class:`~pyromtl.base.TrainState`: the context's ``step`` and
        ``total_steps``, for annealed prior parameters (step 0 of a run of unknown length if None).
        """
        if device is None and components is None:
            device = self._anchor.device
        step, total = (state.step, state.total_steps) if state is not None else (0, None)
        return PriorContext(self.site, batch_shape, event_shape, num_tasks, step=step, total_steps=total,
                            components=components, task_axis=task_axis, device=device, owner=self, extras=dict(extras or {}))

    def build(self, **context: Any) -> Distribution:
        """Build the prior; keyword arguments as in :meth:`context`."""
        ctx = self.context(**context)
        if self.num_tasks != ctx.num_tasks:  # a module attribute write costs ~15 us a step
            self.num_tasks = ctx.num_tasks
        return _build_parsed(self.spec, ctx)  # parsed in __init__: skip re-validating it every step

    def forward(self, **context: Any) -> Distribution:
        return self.build(**context)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Create lazily-made parameters that a checkpoint holds, so strict loading works before
        # the first build; the ParameterDict's own loader then copies the values in.
        head = prefix + "params."
        for key, value in state_dict.items():
            name = key[len(head):] if key.startswith(head) else ""
            if name and "." not in name and name not in self.params:
                self.params[name] = torch.nn.Parameter(torch.empty_like(value, device=self._anchor.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


# --------------------------------------------------------------------------------------------
# Built-in kinds


def _positive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number, got {value!r}")
    return float(value)


def _one_of(options: tuple[str, ...]) -> Check:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of {list(options)}, got {value!r}")
        return value

    return check


def _temperature(value: Any) -> float | dict[str, Any]:
    schedule = as_schedule(value)
    if schedule.minimum() <= 0:
        raise ValueError(f"the temperature must stay > 0, got {value!r}")
    return schedule.to_config()


def _diag_normal(loc: torch.Tensor, scale: torch.Tensor, ctx: PriorContext, zero_loc: bool) -> Distribution:
    # Unexpanded parameters: the closed-form KLs then work on them, not on the plates' full shape.
    return DiagNormal(loc, scale, len(ctx.event_shape), ctx.batch_shape + ctx.event_shape, zero_loc=zero_loc)


@register("normal", defaults={"loc": 0.0, "scale": 1.0}, checks={"scale": _positive}, uses_components=False)
def _normal(spec: PriorSpec, ctx: PriorContext) -> Distribution:
    """``N(loc, scale²)`` on every element: VSTL / VBMTL's ``N(0, I)`` prior."""
    loc = spec.params["loc"]
    return _diag_normal(ctx.full((), loc), ctx.full((), spec.params["scale"]), ctx, zero_loc=loc == 0)


@register(
    "learned_normal",
    defaults={"loc": 0.0, "scale": 1.0, "learn_loc": True, "per_task": False},
    checks={"scale": _positive},
    uses_components=False,
)
def _learned_normal(spec: PriorSpec, ctx: PriorContext) -> Distribution:
    """Diagonal Gaussian with a learned scale and (unless ``learn_loc = false``) a learned mean.

    Parameters have the event shape, shared by the whole batch, or with ``per_task = true`` one
    set per task (along ``task_axis``). A frozen zero mean is HIB's best-training marginal
    (``ν_j = 0``, eq. 7–8).
    """
    shape = ctx.event_shape
    if spec.params["per_task"]:
        rows = [1] * len(ctx.batch_shape)
        rows[len(rows) + ctx.task_axis] = ctx.num_tasks
        shape = torch.Size(rows) + ctx.event_shape
    loc = ctx.full(shape, spec.params["loc"])
    learn_loc = spec.params["learn_loc"]
    if learn_loc:
        loc = ctx.param("loc", loc)
    scale = ctx.param("scale", ctx.full(shape, spec.params["scale"]), constraints.positive)
    return _diag_normal(loc, scale, ctx, zero_loc=not learn_loc and spec.params["loc"] == 0)


@register("deterministic", uses_components=False)
def _deterministic(spec: PriorSpec, ctx: PriorContext) -> Distribution:
    """A flat (improper, log density 0) prior: the site is a point estimate (STL / BMTL)."""
    support = constraints.independent(constraints.real, len(ctx.event_shape)) if ctx.event_shape else constraints.real
    return dist.ImproperUniform(support, ctx.batch_shape, ctx.event_shape)


def other_tasks(num_tasks: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[T, T-1]`` column indices of the other tasks of each row: row t lists ``i ≠ t`` in order."""
    j = torch.arange(num_tasks - 1, device=device)
    t = torch.arange(num_tasks, device=device).unsqueeze(-1)
    return j + (j >= t).long()


def _scatter_rows(rows: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """``[..., T, T-1]`` weights over the other tasks → ``[..., T, T]`` with a zero diagonal (α_tt = 0)."""
    index = other_tasks(num_tasks, rows.device).expand(rows.shape)
    return torch.zeros(*rows.shape[:-1], num_tasks, device=rows.device, dtype=rows.dtype).scatter(-1, index, rows)


def _uniform_rows(num_tasks: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((num_tasks, num_tasks - 1), 1.0 / (num_tasks - 1), device=device, dtype=dtype)


def mixture_weights(mode: str, num_tasks: int, logits: torch.Tensor | None = None, tau: float = 1.0,
                    sample_shape: tuple[int, ...] = (), *, device: torch.device | None = None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mixing weights of a ``task_mixture`` prior, ``[*sample_shape, T, T]`` with a zero diagonal.

    ``mode`` is the prior's ``weights``: ``gumbel_softmax`` draws ``RelaxedOneHotCategorical(τ,
    logits=π_t)`` (eq. 7), one per ``sample_shape`` entry; ``learned`` gives ``softmax(π_t)``
    (also the Gumbel-Softmax's expected class); ``uniform`` gives ``1 / (T-1)`` (``logits``
    unused). ``logits`` ``[T, T-1]`` are the learned π.
    """
    if mode == "uniform":
        rows = _uniform_rows(num_tasks, device, dtype).expand(*sample_shape, num_tasks, num_tasks - 1)
    elif mode == "learned":
        rows = torch.softmax(logits, dim=-1).expand(*sample_shape, num_tasks, num_tasks - 1)
    else:
        rows = dist.RelaxedOneHotCategorical(torch.full((), tau, device=logits.device, dtype=logits.dtype),
                                             logits=logits).rsample(sample_shape)
        # At small τ the sample is computed from large log-space scores and its rows can miss
        # 1 by more than rounding; renormalise so the weights are on the simplex.
        rows = rows / rows.sum(-1, keepdim=True)
    return _scatter_rows(rows, num_tasks)


@register(
    "task_mixture",
    defaults={"weights": "gumbel_softmax", "temperature": 1.0, "kl": "upper_bound"},
    checks={"weights": _one_of(MIXTURE_WEIGHTS), "temperature": _temperature, "kl": _one_of(KL_MODES)},
)
def _task_mixture(spec: PriorSpec, ctx: PriorContext) -> Distribution:
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
