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

Both annealing shapes can also be written relative to the run's length, so that a schedule
ends at the same point of a short run and of a long one:

* ``{start = 0.0, end = 1.0, fraction = 0.25}`` — linear over the first quarter of the run;
* ``{start = 5.0, end = 0.5, decay_fraction = 0.25}`` — exponential decay that reaches its
  floor a quarter of the way through the run (the rate is ``ln(start / end) / steps``).

A relative schedule needs the run's total steps: ``schedule(step, total_steps)``.
:meth:`Schedule.settled` gives the step from which a schedule holds its final value; the
trainer selects models only from there on (the method's full objective).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any, Literal

__all__ = ["Schedule", "as_schedule", "find_schedules", "is_schedule_table"]

_EXPONENTIAL_KEYS = frozenset({"start", "end", "rate"})
_LINEAR_KEYS = frozenset({"start", "end", "steps"})
_RELATIVE_LINEAR_KEYS = frozenset({"start", "end", "fraction"})
_RELATIVE_EXPONENTIAL_KEYS = frozenset({"start", "end", "decay_fraction"})
_KEY_SETS = (_EXPONENTIAL_KEYS, _LINEAR_KEYS, _RELATIVE_LINEAR_KEYS, _RELATIVE_EXPONENTIAL_KEYS)
_ALL_KEYS = frozenset().union(*_KEY_SETS)


@dataclass(frozen=True)
class Schedule:
    """A value as a function of the training step; call it: ``schedule(step) -> float``.

    Build one with :func:`as_schedule` (which validates) or the class methods below.
    ``rate`` is used by ``"exponential"`` only and ``steps`` by ``"linear"`` only; a
    ``fraction`` > 0 replaces either by the fraction of the run over which the schedule anneals.
    """

    kind: Literal["constant", "exponential", "linear"]
    start: float
    end: float
    rate: float = 0.0
    steps: int = 0
    fraction: float = 0.0

    @classmethod
    def constant(cls, value: float) -> Schedule:
        """``value`` at every step (no validation: see :func:`as_schedule`).

        Args:
            value: the value.

        Returns:
            The schedule.
        """
        return cls("constant", float(value), float(value))

    @classmethod
    def exponential(cls, start: float, end: float, rate: float) -> Schedule:
        """``max(end, start · exp(−rate · step))`` (no validation: see :func:`as_schedule`).

        Args:
            start: the value at step 0.
            end: the floor it decays to.
            rate: the decay rate per step.

        Returns:
            The schedule.
        """
        return cls("exponential", float(start), float(end), rate=float(rate))

    @classmethod
    def linear(cls, start: float, end: float, steps: int) -> Schedule:
        """From ``start`` to ``end`` linearly over ``steps`` steps, then ``end`` (no validation).

        Args:
            start: the value at step 0.
            end: the value from step ``steps`` on.
            steps: the length of the ramp, at least 1.

        Returns:
            The schedule.
        """
        return cls("linear", float(start), float(end), steps=int(steps))

    @classmethod
    def relative(cls, kind: Literal["exponential", "linear"], start: float, end: float, fraction: float) -> Schedule:
        """A schedule that anneals over ``fraction`` of the run, whatever its length.

        Args:
            kind: ``"exponential"`` or ``"linear"``.
            start: the value at step 0.
            end: the final value.
            fraction: the fraction of the run it anneals over, in (0, 1].

        Returns:
            The schedule; :meth:`over` turns it into absolute steps.
        """
        return cls(kind, float(start), float(end), fraction=float(fraction))

    @property
    def is_relative(self) -> bool:
        """Whether the schedule is written as a fraction of the run."""
        return self.fraction > 0

    def over(self, total_steps: int | None) -> Schedule:
        """This schedule in absolute steps for a run of ``total_steps`` (itself if not relative).

        Args:
            total_steps: the run's length, or None where it is unknown.

        Returns:
            The absolute schedule.

        Raises:
            ValueError: a relative schedule and an unknown ``total_steps``.
        """
        if not self.is_relative:
            return self
        if total_steps is None:
            raise ValueError(f"the schedule {self.to_config()} is relative to the run's length, which is unknown here")
        steps = max(1, round(self.fraction * total_steps))
        if self.kind == "linear":
            return Schedule.linear(self.start, self.end, steps)
        return Schedule.exponential(self.start, self.end, math.log(self.start / self.end) / steps)

    def __call__(self, step: int, total_steps: int | None = None) -> float:
        if step < 0:
            raise ValueError(f"schedule step must be >= 0, got {step}")
        if self.is_relative:
            return self.over(total_steps)(step)
        if self.kind == "constant":
            return self.start
        if self.kind == "exponential":
            return max(self.end, self.start * math.exp(-self.rate * step))
        frac = min(step / self.steps, 1.0)
        return self.start + (self.end - self.start) * frac

    def settled(self, total_steps: int | None = None) -> float:
        """The first step at which the schedule holds its final value (``inf`` if it never does).

        Args:
            total_steps: the run's length (needed by a relative schedule).

        Returns:
            The step, or ``inf``.

        Raises:
            ValueError: a relative schedule and an unknown ``total_steps``.
        """
        s = self.over(total_steps)
        if s.kind == "constant" or s.start == s.end:
            return 0
        if s.kind == "linear":
            return s.steps
        if s.rate == 0 or s.end <= 0:  # no decay, or a floor of 0 that exp never reaches
            return math.inf
        # the first integer step with start * exp(-rate * step) <= end, guarded against rounding
        step = max(0, math.ceil(math.log(s.start / s.end) / s.rate - 1e-9))
        return step if s(step) == s.end else step + 1

    def to_config(self) -> float | dict[str, float | int]:
        """The number or table that :func:`as_schedule` turns back into this schedule (TOML-ready).

        Returns:
            A number for a constant schedule, else a table.
        """
        if self.kind == "constant":
            return self.start
        if self.is_relative:
            key = "fraction" if self.kind == "linear" else "decay_fraction"
            return {"start": self.start, "end": self.end, key: self.fraction}
        if self.kind == "exponential":
            return {"start": self.start, "end": self.end, "rate": self.rate}
        return {"start": self.start, "end": self.end, "steps": self.steps}

    def minimum(self) -> float:
        """The smallest value the schedule ever takes (for checks such as "temperature > 0").

        Returns:
            ``min(start, end)``.
        """
        return min(self.start, self.end)


def _number(key: str, value: Any) -> float:
    # bool is a subclass of int; `true` in a TOML schedule is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"schedule key {key!r} must be a finite number, got {value!r}")
    return float(value)


def _fraction(key: str, value: Any) -> float:
    fraction = _number(key, value)
    if not 0 < fraction <= 1:
        raise ValueError(f"schedule key {key!r} is a fraction of the run and must be in (0, 1], got {value!r}")
    return fraction


def is_schedule_table(value: Any) -> bool:
    """Whether ``value`` is written as an annealing table (any of the four key sets).

    Args:
        value: a config value.

    Returns:
        True for a mapping whose keys are exactly one of the key sets.
    """
    return isinstance(value, Mapping) and frozenset(value) in _KEY_SETS


def find_schedules(cfg: Mapping[str, Any], scheduled_keys: Iterable[str] = ()) -> dict[str, Schedule]:
    """Every schedule of a resolved config, by dotted path (``"kl_weight"``, ``"priors.w.temperature"``).

    That is each schedule table at any depth, and each top-level key of ``scheduled_keys``
    (options typed as schedules), where a plain number is a constant schedule.

    Args:
        cfg: a resolved config.
        scheduled_keys: top-level keys that are schedules even as plain numbers.

    Returns:
        ``{dotted path: Schedule}``.

    Raises:
        ValueError: a value :func:`as_schedule` refuses.
    """
    found = {key: as_schedule(cfg[key]) for key in scheduled_keys if key in cfg}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if is_schedule_table(value):
                found[path] = as_schedule(value)
            elif isinstance(value, Mapping):
                walk(value, path + ".")

    walk(cfg, "")
    return found


def as_schedule(value: Schedule | float | int | Mapping[str, Any]) -> Schedule:
    """Turn a number, a schedule table (see the module docstring) or a Schedule into a Schedule.

    Args:
        value: a number, a schedule table or a :class:`Schedule`.

    Returns:
        The schedule (``value`` itself if it is one).

    Raises:
        ValueError: naming the offending key, for unknown or missing keys, non-finite, negative
            (``rate``), non-positive (``steps``) or out-of-range (fractions) values, and an
            exponential decay whose ``end`` exceeds its ``start``.
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
        if keys == _RELATIVE_LINEAR_KEYS:
            start, end = _number("start", value["start"]), _number("end", value["end"])
            return Schedule.relative("linear", start, end, _fraction("fraction", value["fraction"]))
        if keys == _RELATIVE_EXPONENTIAL_KEYS:
            start, end = _number("start", value["start"]), _number("end", value["end"])
            fraction = _fraction("decay_fraction", value["decay_fraction"])
            if not 0 < end <= start:
                raise ValueError(f"schedule with 'decay_fraction' needs 0 < end <= start, got start={start}, end={end}")
            return Schedule.relative("exponential", start, end, fraction)
        hint = (
            "{start, end, rate} (exponential decay), {start, end, steps} (linear warm-up), or the same "
            "relative to the run: {start, end, decay_fraction}, {start, end, fraction}"
        )
        unknown = sorted(keys - _ALL_KEYS)
        if unknown:
            raise ValueError(f"unknown schedule key(s) {unknown}; a schedule table has keys {hint}")
        extra = sorted(keys - {"start", "end"})
        if len(extra) > 1:
            raise ValueError(f"schedule keys {extra} exclude each other; a schedule table has keys {hint}")
        closest = min((k - keys for k in _KEY_SETS), key=len)
        missing = sorted(closest)
        raise ValueError(f"schedule table {dict(value)!r} is missing key(s) {missing}; it needs {hint}")
    return Schedule.constant(_number("value", value))


@dataclass
class TrainState:
    """Mutable training progress, shared by a model and its guide (the trainer sets both fields).

    ``total_steps`` is the run's length, which schedules written relative to it need.
    """

    step: int = 0
    total_steps: int | None = None

    def value(self, schedule: Schedule) -> float:
        """``schedule`` at the current step of this run.

        Args:
            schedule: the schedule.

        Returns:
            Its value.

        Raises:
            ValueError: a relative schedule and no ``total_steps`` set.
        """
        return schedule(self.step, self.total_steps)
