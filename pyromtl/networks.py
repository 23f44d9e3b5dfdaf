"""Networks a config names: a registry that the user's own code fills.

A method's network option (SMTL's ``encoder`` and ``decoder``) holds a *name*, and
``factory(in_dim, out_dim) -> nn.Module`` registered under that name builds the network::

    import pyromtl.networks
    from torch import nn

    def wide(in_dim: int, out_dim: int) -> nn.Module:
        return nn.Sequential(nn.Linear(in_dim, 512), nn.GELU(), nn.Linear(512, out_dim))

    pyromtl.networks.register("wide", wide)

From the command line, the module that registers it is imported with ``--import`` and the
config says ``encoder = "wide"``. A run directory stores only the name: opening it never
imports or runs anything it names. A name nobody registered is refused, before any training,
with one line that says which option named it. An empty name means the method's own MLP.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

#: ``factory(in_dim, out_dim) -> nn.Module``.
NetworkFactory = Callable[[int, int], nn.Module]

_REGISTRY: dict[str, NetworkFactory] = {}


def register(name: str, factory: NetworkFactory, *, replace: bool = False) -> NetworkFactory:
    """Register ``factory`` under ``name`` (a non-empty name; ``replace=True`` overrides an existing one)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a network name is a non-empty string, got {name!r}")
    if not callable(factory):
        raise ValueError(f"network {name!r}: the factory must be callable, got {factory!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"network {name!r} is already registered; pass replace=True to override it")
    _REGISTRY[name] = factory
    return factory


def available() -> list[str]:
    """The registered network names, sorted."""
    return sorted(_REGISTRY)


def check(option: str, name: str) -> None:
    """Refuse a config value ``name`` of ``option`` that names no registered network ('' is the method's MLP)."""
    if name and name not in _REGISTRY:
        raise ValueError(_unknown(f"config key {option!r} names network {name!r}", name))


def get(name: str) -> NetworkFactory:
    """The factory registered as ``name``; ``ValueError`` listing the registered names if there is none."""
    if name not in _REGISTRY:
        raise ValueError(_unknown(f"unknown network {name!r}", name))
    return _REGISTRY[name]


def _unknown(what: str, name: str) -> str:
    known = ", ".join(available()) or "none"
    return (
        f"{what}, which is not registered (registered: {known}); register it with pyromtl.networks.register "
        "in your own module and pass that module with --import"
    )
