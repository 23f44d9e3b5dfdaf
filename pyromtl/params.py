"""Module-local Pyro parameters, always: two fits in one process never share a parameter.

Under Pyro's default (global) parameter store, a ``PyroModule`` called inside a model trace
looks its ``PyroParam`` s up by name in the store and *replaces* its own with what it finds there.
Two fits whose models both have a ``bias`` would then read, and overwrite, each other's.
:class:`LocalParamsModule` makes every pyromtl module use its own parameters whatever the
global setting, and :func:`local_params` does the same for a whole function.
"""

from __future__ import annotations

import functools
from typing import Any

import pyro
import pyro.nn.module as pyro_module
from pyro.nn import PyroModule


def _module_local() -> bool:
    """``pyro.settings.get("module_local_params")``, read where that setting keeps it: ``get``
    imports the module by name on every call, and a step asks a dozen times."""
    return pyro_module._MODULE_LOCAL_PARAMS


def local_params(fn):
    """Run ``fn`` with Pyro's module-local parameters, so PyroModules own their parameters
    (no global param store) and ``ELBO()(model, guide)`` is a plain ``nn.Module``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with pyro.settings.context(module_local_params=True):
            return fn(*args, **kwargs)

    return wrapper


class _SwappedScope(pyro_module._Context):
    """PyroModule's call context, with its parameter-store scope made by swapping the store's
    dicts rather than copying them.

    Under module-local parameters Pyro scopes the global store to the module's own state for
    the length of a top-level call (``ParamStoreDict.scope``: copy the store's state, clear it,
    load the module's, run, copy it back, reload the old): about 20 µs a call for a store that
    is empty on both sides. Here the call gets fresh dicts holding the module's state, and the
    store's own dicts are put back afterwards, unchanged: the same contents inside and after
    the call, a ``pyro.param`` inside still lands in the module's state.
    """

    def __init__(self) -> None:
        super().__init__()
        if not hasattr(self, "param_state"):  # Pyro makes it only under module-local parameters
            self.param_state = {"params": {}, "constraints": {}}

    def __enter__(self) -> None:
        if not self.active and _module_local():
            store = pyro.get_param_store()
            self._outer = (store._params, store._param_to_name, store._constraints)
            params, constraints = self.param_state["params"], self.param_state["constraints"]
            store._params, store._constraints = dict(params), dict(constraints)
            store._param_to_name = {param: name for name, param in params.items()}
        self.active += 1
        self.used = True

    def __exit__(self, *exc: object) -> None:
        self.active -= 1
        if not self.active:
            self.cache.clear()
            outer = self.__dict__.pop("_outer", None)
            if outer is not None:  # swapped on entry
                store = pyro.get_param_store()
                self.param_state.update(store.get_state())
                store._params, store._param_to_name, store._constraints = outer


class LocalParamsModule(PyroModule):
    """A ``PyroModule`` that never reads or writes the global parameter store.

    Attribute access and calls switch module-local parameters on for their duration (a no-op
    when they already are, as during training), so tracing the module from user code cannot
    pick up another fit's parameters. Its submodules share its :class:`_SwappedScope`.
    """

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.__dict__["_pyro_context"] = _SwappedScope()

    def __getattr__(self, name: str) -> Any:
        # A plain nn.Parameter or nn.Module: inside a trace PyroModule would issue a "param"
        # statement per tensor through the whole handler stack for the global store's sake,
        # which these modules never use (12-14 statements, ~0.5 ms, of an SMTL step). Buffers
        # skip PyroModule's lookup chain too.
        plain = self.__dict__.get("_parameters", {}).get(name)
        if plain is None:
            module = self.__dict__.get("_modules", {}).get(name)
            plain = None if isinstance(module, PyroModule) else module
        if plain is None:
            plain = self.__dict__.get("_buffers", {}).get(name)
        if plain is not None:
            return plain
        if _module_local():
            return super().__getattr__(name)
        with pyro.settings.context(module_local_params=True):
            return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if _module_local():
            return super().__setattr__(name, value)
        with pyro.settings.context(module_local_params=True):
            return super().__setattr__(name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _module_local():
            return super().__call__(*args, **kwargs)
        with pyro.settings.context(module_local_params=True):
            return super().__call__(*args, **kwargs)
