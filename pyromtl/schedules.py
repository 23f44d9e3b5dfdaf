"""Annealing schedules over training steps: Gumbel-Softmax temperature and KL weight.

VMTL (§4, "Implementation details") anneals the temperature of its Gumbel-Softmax priors
(eq. 7) "from a high temperature to a small but non-zero value" as in Jang et al. (2017), and
the weight of the KL terms of its objective (eq. 11) as in Bowman et al. (2016). Both are plain
functions of the step, written in configuration files as a number or a small table:

* ``1.0`` — constant;
* ``{start = 5.0, end = 0.5, rate = 1e-3}`` — exponential decay to a floor,
  ``max(end, start * exp(-rate * step))`` (Jang et al.'s temperature annealing);
* ``{start = 0.0, end = 1.0, steps = 2000}`` — linear warm-up from ``start`` to ``end`` over
  ``steps`` steps, then constant (Bowman et al.'s KL annealing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any, Literal, Mapping

__all__ = ["Schedule", "as_schedule"]

_EXPONENTIAL_KEYS = frozenset({"start", "end", "rate"})
_LINEAR_KEYS = frozenset({"start", "end", "steps"})


@dataclass(frozen=True)
class Schedule:
    """A value as a function of the training step; call it: ``schedule(step) -> float``.

    Build one with :func:`as_schedule` (which validates) or the class methods below.
    ``rate`` is used by ``"exponential"`` only and ``steps`` by ``"linear"`` only.
    """

    kind: Literal["constant", "exponential", "linear"]
    start: float
    end: float
    rate: float = 0.0
    steps: int = 0

    @classmethod
    def constant(cls, value: float) -> "Schedule":
        return cls("constant", float(value), float(value))

    @classmethod
    def exponential(cls, start: float, end: float, rate: float) -> "Schedule":
        return cls("exponential", float(start), float(end), rate=float(rate))

    @classmethod
    def linear(cls, start: float, end: float, steps: int) -> "Schedule":
        return cls("linear", float(start), float(end), steps=int(steps))

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"schedule step must be >= 0, got {step}")
        if self.kind == "constant":
            return self.start
        if self.kind == "exponential":
            return max(self.end, self.start * math.exp(-self.rate * step))
        frac = min(step / self.steps, 1.0)
        return self.start + (self.end - self.start) * frac

    def to_config(self) -> float | dict[str, float | int]:
        """The number or table that :func:`as_schedule` turns back into this schedule (TOML-ready)."""
        if self.kind == "constant":
            return self.start
        if self.kind == "exponential":
            return {"start": self.start, "end": self.end, "rate": self.rate}
        return {"start": self.start, "end": self.end, "steps": self.steps}

    def minimum(self) -> float:
        """The smallest value the schedule ever takes (for checks such as "temperature > 0")."""
        return min(self.start, self.end)


def _number(key: str, value: Any) -> float:
    # bool is a subclass of int; `true` in a TOML schedule is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"schedule key {key!r} must be a finite number, got {value!r}")
    return float(value)


def as_schedule(value: Schedule | float | int | Mapping[str, Any]) -> Schedule:
    """Turn a number, a ``{start, end, rate}`` / ``{start, end, steps}`` table or a Schedule into a Schedule.

    Raises ``ValueError`` naming the offending key for unknown or missing keys and for
    non-finite, negative (``rate``) or non-positive (``steps``) values.
    """
    if isinstance(value, Schedule):
        return value
    if isinstance(value, Mapping):
        keys = frozenset(value)
        if keys == _EXPONENTIAL_KEYS:
            start, end, rate = (_number(k, value[k]) for k in ("start", "end", "rate"))
            if rate < 0:
                raise ValueError(f"schedule key 'rate' must be >= 0, got {rate}")
            if end > start:
                raise ValueError(f"schedule key 'end' ({end}) must be <= 'start' ({start}) for an exponential decay")
            return Schedule.exponential(start, end, rate)
        if keys == _LINEAR_KEYS:
            start, end = _number("start", value["start"]), _number("end", value["end"])
            steps = _number("steps", value["steps"])
            if steps <= 0 or not steps.is_integer():
                raise ValueError(f"schedule key 'steps' must be a positive integer, got {value['steps']!r}")
            return Schedule.linear(start, end, int(steps))
        unknown = sorted(keys - _EXPONENTIAL_KEYS - _LINEAR_KEYS)
        if unknown:
            raise ValueError(
                f"unknown schedule key(s) {unknown}; a schedule table has keys "
                "{start, end, rate} (exponential decay) or {start, end, steps} (linear warm-up)"
            )
        if {"rate", "steps"} <= keys:
            raise ValueError("schedule keys 'rate' and 'steps' exclude each other: give 'rate' (decay) or 'steps' (warm-up)")
        missing = sorted(min((_EXPONENTIAL_KEYS - keys, _LINEAR_KEYS - keys), key=len))
        raise ValueError(
            f"schedule table {dict(value)!r} is missing key(s) {missing}; it needs "
            "{start, end, rate} (exponential decay) or {start, end, steps} (linear warm-up)"
        )
    return Schedule.constant(_number("value", value))
