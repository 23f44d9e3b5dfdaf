"""The method registry: ``register``, ``get`` and ``available``.

Each method declares itself (a :class:`~pyromtl.method.Method`) beside its code in
``models/<name>.py``, shipped as ``pyromtl.models``; the built-ins are found by importing every
module of that package. User code registers its own methods the same way.
"""

from __future__ import annotations

import importlib
import pkgutil

from pyromtl.method import ExportSite, Method

__all__ = ["ExportSite", "Method", "available", "get", "register"]

_REGISTRY: dict[str, Method] = {}
_DISCOVERED: list[bool] = []


def register(method: Method) -> Method:
    """Add ``method`` under its name; a name can be registered once."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def _discover() -> None:
    """Import every ``pyromtl.models`` module once; each registers the methods it declares."""
    if _DISCOVERED:
        return
    _DISCOVERED.append(True)
    import pyromtl.models as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def available() -> list[str]:
    """The registered method names, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get(name: str) -> Method:
    """The method registered as ``name``; ``ValueError`` listing the names if there is none."""
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
