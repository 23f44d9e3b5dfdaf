"""Typed run options: the trainer's :class:`TrainOptions` and each method's own dataclass.

A method declares its options as a dataclass (a subclass of :class:`Options`), so its keys,
types and defaults are written once. :func:`check` validates one value against a field's type
hint; ``pyromtl.config.resolve`` runs it on every key before anything is trained, so a typo or
an ill-typed value fails with one line that names the key.

Supported field types: ``bool``, ``int`` (``>= 0``), ``float`` (finite, ``>= 0``), ``str``,
``list[int]`` (positive), ``dict[str, float]`` (a table of finite numbers ``>= 0``) and
:data:`ScheduleValue` (a number or a schedule table, see :mod:`pyromtl.schedules`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pyromtl.nn import DEFAULT_CONV_CHANNELS, check_backbone

#: A number or a schedule table (``pyromtl.schedules``): a value annealed over training steps.
ScheduleValue = float | dict

#: Integer options must fit an int64: torch (seeds, sizes) overflows beyond it.
_INT_MAX = 2**63 - 1
#: The largest entry of a list of sizes (layer widths, channels): a planted config cannot ask for
#: a layer that no machine could allocate.
MAX_WIDTH = 2**20


@dataclass
class Options:
    """Base of every method's options dataclass (it may add no fields at all).

    ``MINIMA`` (merged over the class's bases) gives numeric options a least value, checked with
    the types before anything is built: an integer size at least 1, a temperature above 0.
    """

    #: ``{key: (least value, whether the least value itself is allowed)}``.
    MINIMA: ClassVar[dict[str, tuple[float, bool]]] = {}

    @classmethod
    def minima(cls) -> dict[str, tuple[float, bool]]:
        """Every declared least value of this class and its bases (a subclass may override one)."""
        out: dict[str, tuple[float, bool]] = {}
        for base in reversed(cls.__mro__):
            out.update(vars(base).get("MINIMA", {}))
        return out

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{key: default}`` of every field, with fresh copies of mutable defaults."""
        return {
            f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            for f in dataclasses.fields(cls)
        }

    @classmethod
    def hints(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def validate(cls, cfg: Mapping[str, Any]) -> None:
        """Checks of a resolved config that a field's type cannot say (allowed values, keys that
        must agree); ``pyromtl.config.resolve`` calls it after the per-key checks, before any data
        is loaded. Raise ``ValueError`` naming the key. The default checks nothing."""

    @classmethod
    def of(cls, cfg: Mapping[str, Any]):
        """The typed view of a resolved config: this dataclass filled from ``cfg``'s keys."""
        return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})


@dataclass
class TrainOptions(Options):
    """Options every method understands: the run's data, the trainer's loop and its output."""

    MINIMA: ClassVar[dict[str, tuple[float, bool]]] = {"devices": (1, True), "num_nodes": (1, True)}

    data: str = "digits-domains"
    root: str = ""
    fraction: float = 0.0  # 0: the dataset's default (datasets.default_fraction); 1: the whole train split
    seed: int = 0
    device: str = "auto"
    steps: int = 0  # 0 means: use epochs
    epochs: int = 100
    batch_size: int = 64
    lr: float = 3e-3
    lr_decay: float = 1.0  # ClippedAdam's per-step multiplicative decay
    clip_norm: float = 10.0
    weight_decay: float = 0.0
    num_particles: int = 1
    eval_every: int = 50
    #: Which validated states model selection may keep: "after_warmup" (from the step every
    #: schedule, e.g. the KL warm-up and the temperature, holds its final value: the full
    #: objective), "all", or "last" (no selection: the final state).
    select: str = "after_warmup"
    eval_samples: int = 20
    checkpoint_every: int = 200
    kl_weight: ScheduleValue = 1.0
    quiet: bool = False
    #: Processes per machine (Lightning DDP, :mod:`pyromtl.distributed`); each takes an equal
    #: shard of every global batch of ``batch_size`` rows per task. 1: one process, as always.
    devices: int = 1
    #: Machines of a multi-machine run (each runs the same command with Lightning's ``NODE_RANK``).
    num_nodes: int = 1


@dataclass
class NetworkOptions(Options):
    """A method's network: the backbone, then ``hidden`` layers (with ``activation``) to ``latent_dim``.

    Every built-in method's options extend these (with their own defaults)."""

    MINIMA: ClassVar[dict[str, tuple[float, bool]]] = {"latent_dim": (1, True)}

    latent_dim: int = 64
    hidden: list[int] = field(default_factory=lambda: [256])
    activation: str = "elu"
    #: The network before the ``hidden`` layers: "mlp" (flattened inputs), "cnn" (image inputs
    #: [C, H, W]: one 3x3 conv + activation + 2x2 max-pool block per entry of ``conv_channels``),
    #: or a network registered with pyromtl.networks.register (see pyromtl.backbones).
    backbone: str = "mlp"
    conv_channels: list[int] = field(default_factory=lambda: list(DEFAULT_CONV_CHANNELS))

    @classmethod
    def validate(cls, cfg: Mapping[str, Any]) -> None:
        check_backbone(cfg["backbone"], cfg["conv_channels"])


def _finite(value: int | float) -> bool:
    """Finite and representable as a float (a huge TOML integer is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise ValueError(f"config key {key!r} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"config key {key!r} must be >= 0, got {value}")
    return float(value)


def check_minimum(key: str, value: Any, least: float, inclusive: bool) -> None:
    """Refuse a (checked) numeric or schedule ``value`` of ``key`` below its least value."""
    if isinstance(value, dict):
        from pyromtl.schedules import as_schedule

        low, what = as_schedule(value).minimum(), "stay"
    else:
        low, what = value, "be"
    if low < least or (low == least and not inclusive):
        bound = f">= {least:g}" if inclusive else f"> {least:g}"
        raise ValueError(f"config key {key!r} must {what} {bound}, got {value!r}")


def check(key: str, value: Any, hint: Any) -> Any:
    """``value`` normalised to the field type ``hint``; ``ValueError`` naming ``key`` if it does not fit."""
    if hint is ScheduleValue:
        from pyromtl.schedules import as_schedule

        try:
            lowest = as_schedule(value).minimum()
        except (TypeError, ValueError, OverflowError) as err:  # OverflowError: ints too big for a float
            raise ValueError(f"config key {key!r}: {err}") from None
        if lowest < 0:
            raise ValueError(f"config key {key!r} must stay >= 0, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # TOML writes 1e4 as a float
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key {key!r} must be an integer, got {value!r}")
        if not 0 <= value <= _INT_MAX:
            raise ValueError(f"config key {key!r} must be in [0, 2**63), got {value}")
        return value
    if hint is float:
        return _number(key, value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"config key {key!r} must be a string, got {value!r}")
        return value
    origin = typing.get_origin(hint)
    if origin is list:
        # TOML writes 1e4 as a float
        value = (
            [int(v) if isinstance(v, float) and v.is_integer() else v for v in value]
            if isinstance(value, list)
            else value
        )
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v <= _INT_MAX for v in value
        ):
            raise ValueError(f"config key {key!r} must be a list of positive integers, got {value!r}")
        if any(v > MAX_WIDTH for v in value):
            raise ValueError(f"config key {key!r}: each size must be at most {MAX_WIDTH} (2**20), got {value!r}")
        return list(value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"config key {key!r} must be a table of numbers, got {value!r}")
        return {str(k): _number(f"{key}.{k}", v) for k, v in value.items()}
    raise TypeError(f"option {key!r} has an unsupported type {hint!r}")  # a method declaration bug
