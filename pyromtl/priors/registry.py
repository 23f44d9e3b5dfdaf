"""The prior kinds: an explicit table of the built-in ones, and what user code adds with :func:`register`.

Every built-in kind is listed in :data:`BUILTIN_KINDS`, so a fresh process knows all of them
whatever it imported first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pyro.distributions.torch_distribution import TorchDistributionMixin

from pyromtl.priors import gates, gaussian, last_layer, mixture
from pyromtl.priors.spec import Builder, Check, PriorContext, PriorKind, PriorSpec

#: The built-in prior kinds.
BUILTIN_KINDS: tuple[PriorKind, ...] = (
    gaussian.NORMAL,
    gaussian.LEARNED_NORMAL,
    gaussian.DETERMINISTIC,
    mixture.TASK_MIXTURE,
    last_layer.ISOTROPIC,
    last_layer.FULL_DATA,
    last_layer.PREVIOUS_BATCH,
    gates.RELAXED_BERNOULLI,
)

_REGISTRY: dict[str, PriorKind] = {kind.name: kind for kind in BUILTIN_KINDS}


def register(
    kind: str,
    *,
    defaults: Mapping[str, Any] | None = None,
    checks: Mapping[str, Check] | None = None,
    uses_components: bool = True,
    replace: bool = False,
) -> Callable[[Builder], Builder]:
    """Decorator that registers ``fn(spec, ctx) -> Distribution`` as the builder of prior ``kind``.

    Example::

        @register("laplace", defaults={"scale": 1.0})
        def laplace(spec, ctx):
            d = dist.Laplace(torch.zeros((), device=ctx.device), spec.params["scale"])
            return d.expand(ctx.batch_shape + ctx.event_shape).to_event(len(ctx.event_shape))

    Args:
        kind: the kind's name, as a spec's ``kind`` gives it.
        defaults: the accepted parameter names and their default values (none: the kind
            takes no parameters). Values given by a user are checked against the type of the
            default (bool, number, string) unless ``checks`` has an entry for that name.
        checks: per-parameter functions ``value -> normalised value`` that raise
            ``ValueError`` with a short reason for an invalid value.
        uses_components: whether the builder reads ``ctx.components``. Declare ``False`` when
            it does not: a model may then skip computing them (VMTL's z components cost an attention
            pass and an encoder pass over every sample's other tasks).
        replace: allow re-registering an existing kind.

    Returns:
        The decorator; it returns the builder unchanged.

    Raises:
        ValueError: ``kind`` is already registered and ``replace`` is False.
    """
    if kind in _REGISTRY and not replace:
        raise ValueError(f"prior kind {kind!r} is already registered; pass replace=True to override it")

    def decorator(fn: Builder) -> Builder:
        _REGISTRY[kind] = PriorKind(kind, fn, dict(defaults or {}), dict(checks or {}), uses_components)
        return fn

    return decorator


def available() -> list[str]:
    """Names of the registered prior kinds, sorted.

    Returns:
        The kind names.
    """
    return sorted(_REGISTRY)


def describe(kind: str) -> dict[str, Any]:
    """The parameters of prior ``kind`` with their default values.

    Args:
        kind: a registered prior kind.

    Returns:
        A new dict ``{parameter: default}``.

    Raises:
        ValueError: an unknown kind.
    """
    return dict(lookup(kind).defaults)


def uses_components(kind: str) -> bool:
    """Whether prior ``kind`` reads mixture components (see :func:`register`).

    Args:
        kind: a registered prior kind.

    Returns:
        The kind's ``uses_components`` flag.

    Raises:
        ValueError: an unknown kind.
    """
    return lookup(kind).uses_components


def lookup(kind: Any) -> PriorKind:
    """The registered :class:`PriorKind` named ``kind``; ``ValueError`` listing the kinds if there is none."""
    if not isinstance(kind, str) or kind not in _REGISTRY:
        raise ValueError(f"unknown prior kind {kind!r}; available kinds: {available()}")
    return _REGISTRY[kind]


def parse_spec(obj: PriorSpec | str | Mapping[str, Any]) -> PriorSpec:
    """Validate a prior spec and fill in its defaults.

    ``obj`` is a :class:`PriorSpec`, a kind name (``"normal"``) or a table with a ``kind`` key and
    the kind's parameters (a dict, e.g. from ``tomllib``).

    Args:
        obj: the spec: a :class:`PriorSpec`, a kind name or a table.

    Returns:
        The resolved spec, every parameter filled in.

    Raises:
        ValueError: a table without ``kind``, an object of another type, an unknown kind or
            parameter (naming the valid ones), or an invalid value.
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
    return lookup(kind).parse(given)


def build(spec: PriorSpec | str | Mapping[str, Any], ctx: PriorContext) -> TorchDistributionMixin:
    """Parse ``spec``, call its kind's builder and check the result's shapes against ``ctx``.

    Args:
        spec: anything :func:`parse_spec` takes.
        ctx: the site's shapes, task count, step and components.

    Returns:
        The prior distribution, with ``ctx``'s batch and event shapes.

    Raises:
        ValueError: an invalid spec, or a built prior whose shapes differ from the site's.
    """
    return build_parsed(parse_spec(spec), ctx)


def build_parsed(spec: PriorSpec, ctx: PriorContext) -> TorchDistributionMixin:
    """:func:`build` of a spec :func:`parse_spec` returned (a :class:`PriorSite` parses once)."""
    prior = lookup(spec.kind).builder(spec, ctx)
    if prior.batch_shape != ctx.batch_shape or prior.event_shape != ctx.event_shape:
        raise ValueError(
            f"prior kind {spec.kind!r} for site {ctx.site!r} built batch_shape {tuple(prior.batch_shape)} and "
            "event_shape "
            f"{tuple(prior.event_shape)}, but the site needs {tuple(ctx.batch_shape)} and {tuple(ctx.event_shape)}"
        )
    return prior
