"""The dataset registry: ``load(name, fraction=..., seed=...)`` returns a split :class:`MultiTaskData`.

The embedded datasets (:mod:`pyromtl.data.embedded`) and the papers' benchmark loaders
(:data:`pyromtl.data.loaders.BENCHMARKS` and :data:`pyromtl.data.simo_benchmarks.SIMO_BENCHMARKS`,
which read files from ``root``) are registered here;
more can be added with :func:`register`.

A builder is a function ``builder(*, seed=0, root=None, **options) -> MultiTaskData``:

* if it takes ``seed``, it gets the split seed and draws its train/val/test split with it
  (fractions :data:`VAL_FRACTION` and :data:`TEST_FRACTION`); a builder that reads a fixed,
  official split simply does not take ``seed``;
* if it takes ``root``, it gets the folder the user passed. A ``root`` without a default makes
  :func:`load` refuse to run without one; a ``root`` given to a builder that reads no files
  is refused (it was meant for another dataset);
* its other keyword parameters are the dataset's options; anything else is refused.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from numbers import Integral, Real
from typing import Any, TypeVar

from pyromtl.data.core import MultiTaskData
from pyromtl.data.embedded import BUILDERS, TEST_FRACTION, VAL_FRACTION
from pyromtl.data.loaders import BENCHMARKS
from pyromtl.data.simo_benchmarks import SIMO_BENCHMARKS

__all__ = ["TEST_FRACTION", "VAL_FRACTION", "available", "default_fraction", "describe", "load", "register", "summary"]

Builder = TypeVar("Builder", bound=Callable[..., MultiTaskData])

_REGISTRY: dict[str, Callable[..., MultiTaskData]] = {}


def register(name: str, *, replace: bool = False) -> Callable[[Builder], Builder]:
    """Decorator that makes ``builder`` loadable as ``name`` (see the module docstring for its signature).

    Example::

        @register("office-home")
        def office_home(*, root: str, seed: int = 0) -> MultiTaskData:
            \"\"\"MIMO, 65 classes, 4 domains: Office-Home read from ``root``.\"\"\"
            ...

    Args:
        name: the dataset's name, as :func:`load` takes it.
        replace: allow re-registering an existing name.

    Returns:
        The decorator; it returns the builder unchanged.

    Raises:
        ValueError: ``name`` is not a non-empty string; when decorating, the builder is not
            callable, or ``name`` is taken by another builder and ``replace`` is False.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a dataset name must be a non-empty string, got {name!r}")

    def decorate(builder: Builder) -> Builder:
        if not callable(builder):
            raise ValueError(f"dataset {name!r}: the builder must be callable, got {builder!r}")
        if name in _REGISTRY and _REGISTRY[name] is not builder and not replace:
            raise ValueError(f"dataset {name!r} is already registered; pass replace=True to override it")
        _REGISTRY[name] = builder
        _build_cached.cache_clear()  # a replaced builder must not be served from the cache
        return builder

    return decorate


#: Few-shot fractions that runs use when the config leaves ``fraction = 0``. ``digits-domains``
#: stands in for Office-Home, which VMTL evaluates at 5% of the training data.
DEFAULT_FRACTIONS: dict[str, float] = {"digits-domains": 0.05}


def default_fraction(name: str) -> float | None:
    """The training fraction a run uses by default on ``name`` (None: the whole train split).

    Args:
        name: a dataset name.

    Returns:
        The fraction, or None where the dataset has no default (including unknown names).
    """
    return DEFAULT_FRACTIONS.get(name)


def available() -> list[str]:
    """Names of the registered datasets: the embedded ones first, then the benchmark loaders.

    Returns:
        The names, in registration order.
    """
    return list(_REGISTRY)


def describe(name: str) -> str:
    """The first line of a dataset's docstring: its setting, tasks and how it is built.

    Args:
        name: a registered dataset name.

    Returns:
        The line, or ``""`` when the builder has no docstring.

    Raises:
        ValueError: an unknown dataset.
    """
    doc = inspect.getdoc(_builder(name)) or ""
    return doc.splitlines()[0] if doc else ""


#: The name ``pyromtl list datasets`` uses.
summary = describe


def load(name: str, fraction: float | None = None, seed: int = 0, **options: Any) -> MultiTaskData:
    """Build dataset ``name``, split it with ``seed``, and keep ``fraction`` of each task's train split.

    ``fraction`` (in (0, 1], or None for all) draws a few-shot training set per task, stratified
    by class, with ``seed``; val and test stay whole. ``options`` go to the dataset's builder,
    e.g. ``load("synthetic-clusters", setting="simo", num_tasks=12)`` or
    ``load("office-home", root="~/data/OfficeHome")``. The construction is cached (files under
    ``root`` are read once per process), so loading again with the same name, seed and options
    is cheap; every call returns its own object.

    Args:
        name: a registered dataset name (:func:`available`).
        fraction: the fraction of each task's train split to keep, in (0, 1]; None keeps all.
        seed: a non-negative integer seeding the split and the few-shot draw.
        options: the builder's options; ``root`` for the datasets that read files.

    Returns:
        A fresh :class:`~pyromtl.MultiTaskData`.

    Raises:
        ValueError: an unknown dataset or option, a missing or unwanted ``root``, a ``fraction``
            outside (0, 1], or a negative or non-integer ``seed``.
        TypeError: the builder returned something other than a :class:`~pyromtl.MultiTaskData`.
    """
    builder = _builder(name)
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, Real) or not 0 < fraction <= 1):
        # written so that NaN fails too
        raise ValueError(f"fraction must be a number in (0, 1], or None for the whole train split; got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    kwargs = _bind(name, builder, seed, options)
    try:
        key = tuple(sorted(kwargs.items()))
        hash(key)
    except TypeError:  # unhashable option values: build without the cache
        data = _build(name, kwargs)
    else:
        data = _build_cached(name, key)
    # a shallow copy per call: callers may move tensors to a device or edit the split lists
    data = replace(data, splits={s: list(v) for s, v in data.splits.items()}, _cache={})
    return data.with_fraction(fraction, seed)


# ------------------------------------------------------------------------------- internals
def _builder(name: str) -> Callable[..., MultiTaskData]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _bind(name: str, builder: Callable[..., MultiTaskData], seed: int, options: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments for ``builder``: checked options, ``root`` where it reads files, ``seed``."""
    params = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    by_name = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    named = {n for n, p in params.items() if p.kind in by_name}
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if key == "root" and "root" not in named and not takes_any:
            raise ValueError(f"dataset {name!r} is built in and reads no files; drop --root (root=)")
        if key not in named and not takes_any:
            choices = sorted(named - {"seed", "root", "fraction"})  # fraction is load()'s own
            raise ValueError(
                f"dataset {name!r} has no option {key!r}; its options are: {', '.join(choices) or '(none)'}"
            )
        kwargs[key] = value
    needs_root = "root" in params and params["root"].default is inspect.Parameter.empty
    given = kwargs.get("root")
    if needs_root and (given is None or (isinstance(given, str) and not given.strip())):
        raise ValueError(
            f"dataset {name!r} reads its files from a folder: pass root=PATH (--root PATH on the command line)"
        )
    if "seed" in named or takes_any:
        kwargs["seed"] = seed
    return kwargs


def _build(name: str, kwargs: dict[str, Any]) -> MultiTaskData:
    data = _REGISTRY[name](**kwargs)
    if not isinstance(data, MultiTaskData):
        raise TypeError(f"dataset {name!r}: the builder returned {type(data).__name__}, not a MultiTaskData")
    return data


@lru_cache(maxsize=16)
def _build_cached(name: str, key: tuple[tuple[str, Any], ...]) -> MultiTaskData:
    return _build(name, dict(key))


for _name, _fn in {**BUILDERS, **BENCHMARKS, **SIMO_BENCHMARKS}.items():
    register(_name)(_fn)
