"""Input validation for :meth:`MultiTaskData.from_arrays`.

Every check raises ``ValueError`` naming the task and the problem, so a malformed input
never reaches torch or Pyro.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from pyromtl.data.constants import TASK_TYPES

_F32_MAX = float(np.finfo(np.float32).max)
#: The most classes one classification task may have.
MAX_CLASSES = 100_000
#: Inputs larger than this in magnitude get a warning: networks train poorly on unscaled inputs,
#: and float32 products of values past ~1e19 overflow (a NaN loss at the first step).
LARGE_INPUT = 1e6


def check_int(what: str, value, low: int) -> None:
    """Refuse ``value`` unless it is an integer (not a bool) of at least ``low``.

    Args:
        what: the value's name, for the message.
        value: the value.
        low: the least value allowed.

    Raises:
        ValueError: naming ``what`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")


def as_real_array(a, what: str) -> np.ndarray:
    """``a`` as a finite float64 array that fits float32, or ``ValueError``."""
    if isinstance(a, torch.Tensor):
        if a.is_complex():
            raise ValueError(f"{what}: expected real numbers, got dtype {a.dtype}")
        # via float64: numpy has no bfloat16, so ``.numpy()`` alone can raise TypeError
        a = a.detach().cpu().to(torch.float64).numpy()
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"{what}: cannot be read as an array ({err})") from None
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating) or arr.dtype == bool):
        raise ValueError(f"{what}: expected real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        bad = "NaN" if np.isnan(arr).any() else "inf"
        raise ValueError(f"{what}: contains {bad} values")
    if arr.size and np.abs(arr).max() > _F32_MAX:
        # stored as float32: larger values would silently become inf
        raise ValueError(f"{what}: values beyond the float32 range (|v| > {_F32_MAX:.3g})")
    return arr


def _warn_if_unscaled(x: np.ndarray, what: str) -> None:
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak > LARGE_INPUT:
        warnings.warn(
            f"{what}: inputs reach {peak:.3g} in magnitude; networks train poorly on unscaled inputs, "
            "and float32 arithmetic overflows past about 1e19: standardise them (e.g. each feature to "
            "mean 0, sd 1)",
            UserWarning,
            stacklevel=4,
        )


def as_names(task_names, what: str = "task_names") -> list[str]:
    """A sequence of names as strings; a bare string or a non-iterable raises ``ValueError``."""
    if isinstance(task_names, (str, bytes)) or not isinstance(task_names, Iterable):
        raise ValueError(f"{what}: expected a sequence of names, got {task_names!r}")
    return [str(n) for n in task_names]


def _task_types(task_types, names: list[str]) -> list[str]:
    T = len(names)
    if isinstance(task_types, str):
        types = [task_types] * T
    else:
        try:
            types = list(task_types)
        except TypeError:  # not iterable
            raise ValueError(f"task_types: expected a string or a sequence of strings, got {task_types!r}") from None
        if len(types) != T:
            raise ValueError(f"task_types: expected {T} entries (one per task), got {len(types)}")
    for t, kind in enumerate(types):
        if not isinstance(kind, str) or kind not in TASK_TYPES:
            raise ValueError(f"task {names[t]!r}: unknown task type {kind!r}; use one of {TASK_TYPES}")
    return [str(k) for k in types]


def _labels(y: np.ndarray, kind: str, name: str, ncls: int | None) -> int:
    """Check one task's targets and return its class count (2 for binary, 0 for regression)."""
    if kind == "regression":
        return 0
    if not np.all(y == np.round(y)):
        raise ValueError(f"task {name!r}: {kind} labels must be integers")
    if y.min() < 0:
        raise ValueError(f"task {name!r}: label {int(y.min())} out of range (labels must be >= 0)")
    if kind == "binary":
        if y.max() > 1:
            raise ValueError(f"task {name!r}: binary labels must be 0 or 1, found {int(y.max())}")
        return 2
    if ncls is None:
        c = int(y.max()) + 1
    elif isinstance(ncls, (int, np.integer)) and not isinstance(ncls, bool):
        c = int(ncls)
    else:
        raise ValueError(f"task {name!r}: num_classes must be an integer, got {ncls!r}")
    if c < 2:
        raise ValueError(f"task {name!r}: classification needs at least 2 classes, got {c}")
    if c > MAX_CLASSES:
        # every head is [T, classes] wide: a huge label is almost surely a continuous target
        raise ValueError(f"task {name!r}: {c} classes is more than {MAX_CLASSES}; is this a regression target?")
    if y.max() >= c:
        raise ValueError(f"task {name!r}: label {int(y.max())} out of range for {c} classes")
    return c


def validate_arrays(x, y, task_types, task_names, num_classes):
    """Return ``(xs, ys, names, types, num_classes, simo)`` as float32 tensors, or raise ``ValueError``."""
    simo = not isinstance(x, (list, tuple))
    if simo:
        if not isinstance(y, Mapping):
            raise ValueError("SIMO input (x one array) needs y as a dict {task_name: targets}")
        if len(y) == 0:
            raise ValueError("y: no tasks given")
        names = [str(k) for k in y.keys()]
        if task_names is not None and as_names(task_names) != names:
            raise ValueError(f"task_names {list(task_names)} do not match the keys of y {names}")
        xa = as_real_array(x, "x")
        if xa.ndim < 2:
            raise ValueError(f"x: expected shape [N, features...], got {xa.shape}")
        if xa.shape[0] == 0:
            raise ValueError("x: no samples")
        raw_y = list(y.values())
        xs_np = [xa] * len(names)
    else:
        if isinstance(y, Mapping) or not isinstance(y, (list, tuple)):
            raise ValueError("MIMO input (x a list of arrays) needs y as a list with one array per task")
        if len(x) == 0:
            raise ValueError("x: no tasks given")
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} tasks but y has {len(y)}")
        names = [f"task{t}" for t in range(len(x))] if task_names is None else as_names(task_names)
        if len(names) != len(x):
            raise ValueError(f"task_names: expected {len(x)} names, got {len(names)}")
        xs_np = [as_real_array(xt, f"task {names[t]!r}: x") for t, xt in enumerate(x)]
        raw_y = list(y)
    if len(set(names)) != len(names):
        raise ValueError(f"task_names must be unique, got {names}")
    T = len(names)
    types = _task_types(task_types, names)
    if num_classes is None or isinstance(num_classes, (int, np.integer)):
        ncls_in: Sequence[int | None] = [num_classes] * T
    else:
        if isinstance(num_classes, str) or not isinstance(num_classes, Iterable):
            raise ValueError(f"num_classes: expected an integer or one per task, got {num_classes!r}")
        ncls_in = list(num_classes)
        if len(ncls_in) != T:
            raise ValueError(f"num_classes: expected {T} entries, got {len(ncls_in)}")
    shape0 = xs_np[0].shape[1:]
    xs, ys, ncls = [], [], []
    for t in range(T):
        xt = xs_np[t]
        if xt.ndim < 2:
            raise ValueError(f"task {names[t]!r}: x must have shape [N, features...], got {xt.shape}")
        if xt.shape[0] == 0:
            raise ValueError(f"task {names[t]!r}: empty task (no samples)")
        if xt[0].size == 0:
            raise ValueError(f"task {names[t]!r}: x has no features (shape {xt.shape})")
        if xt.shape[1:] != shape0:
            raise ValueError(f"task {names[t]!r}: input shape {xt.shape[1:]} differs from task {names[0]!r}'s {shape0}")
        yt = as_real_array(raw_y[t], f"task {names[t]!r}: y")
        if yt.ndim != 1:
            raise ValueError(f"task {names[t]!r}: y must be 1-d, got shape {yt.shape}")
        if yt.shape[0] != xt.shape[0]:
            raise ValueError(f"task {names[t]!r}: x has {xt.shape[0]} samples but y has {yt.shape[0]}")
        ncls.append(_labels(yt, types[t], names[t], ncls_in[t]))
        ys.append(torch.as_tensor(yt, dtype=torch.float32))
        xs.append(torch.as_tensor(xt, dtype=torch.float32) if not (simo and t) else xs[0])
    if not simo:
        # MIMO tasks share one label space: a task missing the top labels still has them.
        top = max((c for c, k in zip(ncls, types) if k == "classification"), default=0)
        ncls = [top if k == "classification" else c for c, k in zip(ncls, types)]
    for t, xt in enumerate(xs_np[:1] if simo else xs_np):  # valid data only: a warning, then no error
        _warn_if_unscaled(xt, "x" if simo else f"task {names[t]!r}: x")
    return xs, ys, names, types, ncls, simo
