"""Run configuration: defaults, TOML files, ``--set KEY=VALUE`` overrides and validation.

A resolved configuration is one flat dict of options plus a ``priors`` table (site -> spec).
Every key is checked against the method's known keys before training starts, and values
against the type of their default, so a typo fails fast with a message that names it.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping

from pyromtl.priors import parse_spec

#: Options every method understands (the trainer's and the run's).
TRAIN_DEFAULTS: dict[str, Any] = {
    "data": "digits-domains",
    "root": "",
    "fraction": 0.0,  # 0: the dataset's default (datasets.default_fraction); 1: the whole train split
    "seed": 0,
    "device": "auto",
    "steps": 0,  # 0 means: use epochs
    "epochs": 100,
    "batch_size": 64,
    "lr": 3e-3,
    "lr_decay": 1.0,  # ClippedAdam's per-step multiplicative decay
    "clip_norm": 10.0,
    "weight_decay": 0.0,
    "num_particles": 1,
    "eval_every": 50,
    "eval_samples": 20,
    "checkpoint_every": 200,
    "kl_weight": 1.0,
    "quiet": False,
}

#: Keys whose value may be a number or a schedule table ({start, end, rate|steps}).
SCHEDULE_KEYS = {"kl_weight"}

#: Integer options must fit an int64: torch (seeds, sizes) overflows beyond it.
_INT_MAX = 2**63 - 1


def _type_name(v: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(type(v), type(v).__name__)


def _finite(value: int | float) -> bool:
    """Finite and representable as a float (a huge TOML integer is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_value(key: str, value: Any, default: Any, method: str) -> Any:
    if key in SCHEDULE_KEYS:
        from pyromtl.schedules import as_schedule

        try:
            lowest = as_schedule(value).minimum()
        except (TypeError, ValueError, OverflowError) as err:  # OverflowError: ints too big for a float
            raise ValueError(f"config key {key!r}: {err}") from None
        if lowest < 0:
            raise ValueError(f"config key {key!r} must stay >= 0, got {value!r}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # TOML writes 1e4 as a float
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key {key!r} must be an integer, got {value!r}")
        if not 0 <= value <= _INT_MAX:
            raise ValueError(f"config key {key!r} must be in [0, 2**63), got {value}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise ValueError(f"config key {key!r} must be a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"config key {key!r} must be >= 0, got {value}")
        return float(value)
    if isinstance(default, list):
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v <= _INT_MAX for v in value
        ):
            raise ValueError(f"config key {key!r} must be a list of positive integers, got {value!r}")
        return value
    if not isinstance(value, type(default)):
        raise ValueError(f"config key {key!r} must be {_type_name(default)}, got {value!r}")
    return value


def resolve(method, options: Mapping[str, Any] | None = None, priors: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge defaults, the method's defaults and ``options``; validate every key and value.

    ``method`` is a :class:`pyromtl.methods.Method`. ``priors`` maps latent sites to prior specs
    (objects, dicts or kind names); it may also come as ``options["priors"]``.
    """
    defaults = {**TRAIN_DEFAULTS, **method.defaults}
    cfg: dict[str, Any] = {k: (list(v) if isinstance(v, list) else v) for k, v in defaults.items()}
    options = dict(options or {})
    prior_opts: dict[str, Any] = {}
    for table in (options.pop("priors", None), priors):
        if table is not None and not isinstance(table, Mapping):
            raise ValueError(f"'priors' must be a table of site = prior spec, got {table!r}")
        prior_opts.update(table or {})
    cfg["method"] = method.name
    options.pop("method", None)
    for key, value in options.items():
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            raise ValueError(f"unknown config key {key!r} for method {method.name!r}; known keys: {known}")
        cfg[key] = _check_value(key, value, defaults[key], method.name)
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", cfg["device"]):
        raise ValueError(f"config key 'device' must be auto, cpu, cuda or cuda:N, got {cfg['device']!r}")
    if not 0.0 <= cfg["fraction"] <= 1.0:
        raise ValueError(f"config key 'fraction' must be in [0, 1] (0: the dataset's default), got {cfg['fraction']}")
    for key in ("batch_size", "num_particles", "eval_every", "eval_samples", "checkpoint_every"):
        if cfg[key] < 1:
            raise ValueError(f"config key {key!r} must be at least 1, got {cfg[key]}")
    if cfg["steps"] == 0 and cfg["epochs"] == 0:
        raise ValueError("set either 'steps' or 'epochs' to a positive number")
    resolved_priors: dict[str, Any] = {}
    for site, default in method.priors.items():
        spec = prior_opts.pop(site, default)
        if isinstance(spec, Mapping) and "kind" not in spec:
            # A table without a kind tunes the method's own prior (`--set priors.w.weights=uniform`).
            spec = {**parse_spec(default).to_dict(), **spec}
        try:
            resolved_priors[site] = parse_spec(spec).to_dict()
        except (TypeError, ValueError, OverflowError) as err:  # OverflowError: ints too big for a float
            raise ValueError(f"prior of site {site!r}: {err}") from None
    if prior_opts:
        raise ValueError(
            f"unknown prior site(s) {sorted(prior_opts)} for method {method.name!r}; its latent sites are {sorted(method.priors)}"
        )
    cfg["priors"] = resolved_priors
    return cfg


# ---------------------------------------------------------------------------- TOML and --set
def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a config file; a missing file or bad TOML raises ``ValueError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read config file {path}: {err}") from None
    try:
        return tomllib.loads(text)
    except ValueError as err:  # TOMLDecodeError, or an integer literal too long to convert
        raise ValueError(f"{path}: invalid TOML ({err})") from None
    except RecursionError:
        raise ValueError(f"{path}: invalid TOML (arrays or tables nested too deeply)") from None


def parse_value(text: str) -> Any:
    """Read a ``--set`` value as a TOML value (``3``, ``1e-3``, ``true``, ``[64, 64]``, ``{start=5}``).

    A bare word that is not valid TOML (``uniform``) is taken as a string.
    """
    try:
        doc = tomllib.loads(f"v = {text}")
    except (ValueError, RecursionError):  # TOMLDecodeError, a too-long integer, too-deep nesting
        doc = None
    if doc is not None and len(doc) == 1:
        return doc["v"]
    # Not one TOML value (a bare word, or text that smuggles in more keys after a newline).
    if doc is not None or not text or any(c in text for c in "[]{}=\"'#") or not text.isprintable():
        raise ValueError(f"cannot read value {text!r}: use TOML syntax, e.g. 3, 0.5, true, \"text\", [1, 2]")
    return text


def apply_set(cfg: dict[str, Any], assignment: str) -> None:
    """Apply one ``KEY=VALUE`` (dotted keys reach into tables: ``priors.w.weights=uniform``)."""
    if "=" not in assignment:
        raise ValueError(f"--set expects KEY=VALUE, got {assignment!r}")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(p and p.replace("_", "").replace("-", "").isalnum() for p in parts):
        raise ValueError(f"--set: invalid key {key!r}")
    node = cfg
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set: {'.'.join(parts[:-1])!r} is not a table")
        node = child
    node[parts[-1]] = parse_value(text.strip())


def to_toml(cfg: Mapping[str, Any]) -> str:
    """Write a resolved config as TOML (scalars first, then tables), readable by :func:`load_toml`."""

    def string(v: str) -> str:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"cannot write {v!r} to TOML: it is not valid Unicode") from None
        # TOML basic strings must escape quote, backslash and control characters other than tab.
        return '"' + "".join(
            "\\" + c if c in '"\\' else c if c == "\t" or (c >= " " and c != "\x7f") else f"\\u{ord(c):04x}" for c in v
        ) + '"'

    def key(k: str) -> str:
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else string(k)

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return string(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, Mapping):
            return "{ " + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + " }"
        raise ValueError(f"cannot write {v!r} to TOML")

    lines = [f"{key(k)} = {value(v)}" for k, v in cfg.items() if not isinstance(v, Mapping) or k in SCHEDULE_KEYS]
    for k, v in cfg.items():
        if isinstance(v, Mapping) and k not in SCHEDULE_KEYS:
            for site, spec in v.items():
                lines.append(f"\n[{key(k)}.{key(site)}]")
                lines += [f"{key(kk)} = {value(vv)}" for kk, vv in spec.items()]
    return "\n".join(lines) + "\n"
