"""Networks a config names: a registry that the user's own code fills.

A method's network option holds a *name*, and the factory registered under that name builds
the network. What the factory is given depends on the option:

* ``backbone`` (every built-in method, :mod:`pyromtl.backbones`): ``factory(input_shape) ->
  nn.Module``, a network mapping ``[B, *input_shape]`` to features ``[B, F]``;
* SMTL's ``decoder``: ``factory(in_dim, out_dim) -> nn.Module``.

::

    import math
    import pyromtl.networks
    from torch import nn

    def wide(input_shape: tuple[int, ...]) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 512), nn.GELU())

    pyromtl.networks.register("wide", wide)

From the command line, the module that registers it is imported with ``--import`` and the
config says ``backbone = "wide"``. A run directory stores only the name: opening it never
imports or runs anything it names. A name nobody registered is refused, before any training,
with one line that says which option named it. ``"mlp"``, ``"cnn"`` and names starting with
``"python:"`` are reserved.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

#: ``factory(input_shape)`` for a backbone, ``factory(in_dim, out_dim)`` for SMTL's decoder.
NetworkFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, NetworkFactory] = {}


def register(name: str, factory: NetworkFactory, *, replace: bool = False) -> NetworkFactory:
    """Register ``factory`` under ``name`` (a non-empty name; ``replace=True`` overrides an existing one).

    Args:
        name: the name a config gives (e.g. ``backbone = "wide"``).
        factory: builds the network (see the module docstring for its arguments).
        replace: allow re-registering an existing name.

    Returns:
        ``factory``, unchanged.

    Raises:
        ValueError: an empty or reserved name, a factory that is not callable, or a name
            already registered and ``replace`` False.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a network name is a non-empty string, got {name!r}")
    if name in ("mlp", "cnn") or name.startswith("python:"):
        raise ValueError(f"network name {name!r} is reserved (the built-in backbones, and objects given from Python)")
    if not callable(factory):
        raise ValueError(f"network {name!r}: the factory must be callable, got {factory!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"network {name!r} is already registered; pass replace=True to override it")
    _REGISTRY[name] = factory
    return factory


def available() -> list[str]:
    """The registered network names, sorted.

    Returns:
        The names.
    """
    return sorted(_REGISTRY)


def check(option: str, name: str) -> None:
    """Refuse a config value ``name`` of ``option`` that names no registered network ('' is the method's own MLP).

    Args:
        option: the config key, named in the error.
        name: its value.

    Raises:
        ValueError: ``name`` is neither empty nor registered.
    """
    if name and name not in _REGISTRY:
        raise ValueError(_unknown(f"config key {option!r} names network {name!r}", name))


def get(name: str) -> NetworkFactory:
    """The factory registered as ``name``; ``ValueError`` listing the registered names if there is none.

    Args:
        name: a registered network name.

    Returns:
        The factory.

    Raises:
        ValueError: ``name`` is not registered.
    """
    if name not in _REGISTRY:
        raise ValueError(_unknown(f"unknown network {name!r}", name))
    return _REGISTRY[name]


def _unknown(what: str, name: str) -> str:
    known = ", ".join(available()) or "none"
    return (
        f"{what}, which is not registered (registered: {known}); register it with pyromtl.networks.register "
        "in your own module and pass that module with --import"
    )
