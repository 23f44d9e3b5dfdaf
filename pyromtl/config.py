"""Run configuration: defaults, TOML files, ``--set KEY=VALUE`` overrides and validation.

A resolved configuration is one flat dict of options plus a ``priors`` table (site -> spec).
Every key is checked against :class:`~pyromtl.options.TrainOptions` and the method's options
dataclass before training starts, and every value against its field's type, so a typo fails
fast with a message that names it.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyromtl import datasets
from pyromtl.data.core import MultiTaskData
from pyromtl.method import Method
from pyromtl.options import ScheduleValue, TrainOptions, check, check_minimum
from pyromtl.priors import parse_spec
from pyromtl.schedules import Schedule, find_schedules

#: Options every method understands (the trainer's and the run's), with their defaults.
TRAIN_DEFAULTS: dict[str, Any] = TrainOptions.defaults()
#: Upper bounds on the options that multiply a model pass, so a planted config cannot ask for
#: an allocation no machine holds.
DRAW_LIMITS = {"eval_samples": 100_000, "num_particles": 100_000}
#: Values of ``select``: which validated states model selection may keep.
SELECT_MODES = ("after_warmup", "all", "last")


def resolve(
    method: Method,
    options: Mapping[str, Any] | None = None,
    priors: Mapping[str, Any] | None = None,
    data: MultiTaskData | str | None = None,
) -> dict[str, Any]:
    """The final config of a run: defaults, the method's defaults and ``options``, every key and
    value validated, and what depends on the data resolved (DESIGN: two configs are the same run
    when they agree after this).

    ``priors`` maps latent sites to prior specs (objects, dicts or kind names); it may also come
    as ``options["priors"]``. ``data`` (a dataset name or a :class:`MultiTaskData`) sets the
    ``data`` key to its name. ``fraction = 0`` becomes the dataset's default fraction (1 for a
    dataset without one) and ``root`` an absolute path.
    """
    defaults = {**TRAIN_DEFAULTS, **method.defaults}
    hints = {**TrainOptions.hints(), **method.options.hints()}
    minima = {**TrainOptions.minima(), **method.options.minima()}
    cfg: dict[str, Any] = dict(defaults)
    options = dict(options or {})
    if isinstance(data, (str, MultiTaskData)):
        options["data"] = data if isinstance(data, str) else data.name
    elif data is not None:
        raise ValueError(f"data must be a dataset name or a MultiTaskData, got {type(data).__name__}")
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
        value = check(key, value, hints[key])
        if key in minima:
            check_minimum(key, value, *minima[key])
        if key == "kl_weights":
            value = _kl_weights(method, defaults[key], value)
        cfg[key] = value
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", cfg["device"]):
        raise ValueError(f"config key 'device' must be auto, cpu, cuda or cuda:N, got {cfg['device']!r}")
    if not 0.0 <= cfg["fraction"] <= 1.0:
        raise ValueError(f"config key 'fraction' must be in [0, 1] (0: the dataset's default), got {cfg['fraction']}")
    if cfg["lr"] <= 0:
        raise ValueError(f"config key 'lr' must be > 0 (0 would train nothing), got {cfg['lr']}")
    for key in ("batch_size", "num_particles", "eval_every", "eval_samples", "checkpoint_every"):
        if cfg[key] < 1:
            raise ValueError(f"config key {key!r} must be at least 1, got {cfg[key]}")
    for key, most in DRAW_LIMITS.items():
        if cfg[key] > most:
            raise ValueError(
                f"config key {key!r} must be at most {most} (each draw is a pass of the model), got {cfg[key]}"
            )
    if cfg["select"] not in SELECT_MODES:
        raise ValueError(f"config key 'select' must be one of {list(SELECT_MODES)}, got {cfg['select']!r}")
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
            f"unknown prior site(s) {sorted(prior_opts)} for method {method.name!r}; its latent sites are "
            f"{sorted(method.priors)}"
        )
    cfg["priors"] = resolved_priors
    method.options.validate(cfg)
    if cfg["root"]:
        cfg["root"] = str(Path(cfg["root"]).expanduser().resolve())
    if not cfg["fraction"]:
        cfg["fraction"] = datasets.default_fraction(cfg["data"]) or 1.0
    return cfg


def schedules(method: Method, cfg: Mapping[str, Any]) -> dict[str, Schedule]:
    """The schedules of a resolved config by dotted path: its options typed as schedules and
    every schedule table in it (such as a prior's temperature)."""
    hints = {**TrainOptions.hints(), **method.options.hints()}
    return find_schedules(cfg, [key for key, hint in hints.items() if hint is ScheduleValue])


def _kl_weights(method: Method, default: Mapping[str, float], given: Mapping[str, float]) -> dict[str, float]:
    """A partial ``kl_weights`` table tunes the defaults; every key must be a latent site."""
    if unknown := sorted(set(given) - set(method.priors)):
        raise ValueError(
            f"config key 'kl_weights' names unknown site(s) {unknown} of method {method.name!r}; "
            f"its latent sites are {sorted(method.priors)}"
        )
    return {**default, **given}


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
        raise ValueError(f'cannot read value {text!r}: use TOML syntax, e.g. 3, 0.5, true, "text", [1, 2]')
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
        return (
            '"'
            + "".join(
                "\\" + c if c in '"\\' else c if c == "\t" or (c >= " " and c != "\x7f") else f"\\u{ord(c):04x}"
                for c in v
            )
            + '"'
        )

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

    # `priors` is a table of tables; every other table (schedules, kl_weights) is written inline
    lines = [f"{key(k)} = {value(v)}" for k, v in cfg.items() if k != "priors"]
    for k, v in cfg.items():
        if k == "priors":
            for site, spec in v.items():
                lines.append(f"\n[{key(k)}.{key(site)}]")
                lines += [f"{key(kk)} = {value(vv)}" for kk, vv in spec.items()]
    return "\n".join(lines) + "\n"
