"""The method registry: ``register``, ``get`` and ``available``.

Each built-in method is declared (a :class:`~pyromtl.method.Method`) beside its code in
``models/<name>.py``, shipped as ``pyromtl.models``, in the module's ``METHODS`` tuple; the
table in :func:`builtin` lists those modules, so every listing is complete in a fresh process,
whatever was imported first. User code registers its own methods with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from types import MappingProxyType

from pyromtl.method import ExportSite, Method, MethodContext

__all__ = ["ExportSite", "Method", "MethodContext", "available", "builtin", "get", "register"]

_USER: dict[str, Method] = {}


@cache
def builtin() -> Mapping[str, Method]:
    """The built-in methods by name, from the ``METHODS`` of each module of ``pyromtl.models``.

    Imported on first use, so ``import pyromtl`` and the CLI start without building them.

    Returns:
        A read-only mapping ``{name: Method}``.

    Raises:
        RuntimeError: two built-in methods share a name.
    """
    from pyromtl.models import baselines, bayesagg, cross_stitch, hib, smtl, vmtl, weighting

    modules = (baselines, vmtl, weighting, bayesagg, hib, smtl, cross_stitch)
    table: dict[str, Method] = {}
    for module in modules:
        for method in module.METHODS:
            if method.name in table:
                raise RuntimeError(f"built-in method {method.name!r} is declared twice")
            table[method.name] = method
    return MappingProxyType(table)


def register(method: Method) -> Method:
    """Add ``method`` under its name; a name can be registered once (built-in names are taken).

    Args:
        method: the declaration.

    Returns:
        ``method``, unchanged.

    Raises:
        ValueError: its name is already registered.
    """
    if method.name in builtin() or method.name in _USER:
        raise ValueError(f"method {method.name!r} is already registered")
    _USER[method.name] = method
    return method


def available() -> list[str]:
    """The registered method names, sorted.

    Returns:
        The built-in and user-registered names.
    """
    return sorted({**builtin(), **_USER})


def get(name: str) -> Method:
    """The method registered as ``name``; ``ValueError`` listing the names if there is none.

    Args:
        name: a registered method name.

    Returns:
        Its :class:`~pyromtl.method.Method`.

    Raises:
        ValueError: an unknown name.
    """
    method = builtin().get(name) or _USER.get(name)
    if method is None:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available())}")
    return method
