"""The markdown report of a run directory: ``pyromtl report RUN_DIR`` writes ``report.md``.

Reads only the run directory's files (``metrics.json``, ``config.toml``, the checkpoint's
history and ``posterior.nc``), so a run sent by someone else reports the same.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from pyromtl import config, methods
from pyromtl.config import TRAIN_DEFAULTS
from pyromtl.method import MethodContext
from pyromtl.plots import plot_run
from pyromtl.rundir import RunDir
from pyromtl.tables import metrics_table, render

#: Trainer options shown in the report; the method's own options are all shown.
TRAIN_HIGHLIGHTS = ("data", "steps", "epochs", "batch_size", "lr", "kl_weight", "eval_samples")


def _read_run(run: RunDir) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, float]], MethodContext | None]:
    """``metrics.json`` (required), ``config.toml``, the checkpoint's training history, and the
    method's context where the method is registered (its config then checked as a run's is)."""
    doc = run.read_metrics()
    cfg = run.read_config() if run.config_path.is_file() else {}
    history = run.read_checkpoint().get("history", []) if run.has_checkpoint() else []
    name = doc.get("method", "")
    if name not in methods.available():
        return doc, cfg, history, None
    method = methods.get(name)
    resolved = config.resolve(method, {k: v for k, v in cfg.items() if k != "method"})
    return doc, cfg, history, MethodContext(method, resolved, history=history, doc=doc)


def md(text: Any) -> str:
    """``text`` from a run (a task name, a key, a value) as literal markdown: its special characters
    escaped and line breaks flattened, so it can neither break a table nor add markup or HTML."""
    flat = " ".join(str(text).split())
    return re.sub(r"([\\`*_\[\]<>|~])", r"\\\1", flat)


def _cell(value: Any) -> str:
    """A config or training value as table text: 4 significant digits for floats, TOML-like else."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return md(value if isinstance(value, str) else json.dumps(value))


def _config_md(cfg: Mapping[str, Any]) -> str:
    """The :data:`TRAIN_HIGHLIGHTS`, every option of the method's own, and each latent site's prior."""
    own = [k for k in cfg if k not in TRAIN_DEFAULTS and k not in ("method", "priors")]
    shown = [k for k in (*TRAIN_HIGHLIGHTS, *own) if k in cfg and not (k == "epochs" and cfg.get("steps"))]  # steps win
    rows = [[md(k), _cell(cfg[k])] for k in shown]
    for site, spec in cfg.get("priors", {}).items():
        spec = dict(spec) if isinstance(spec, Mapping) else {"kind": spec}
        params = ", ".join(f"{md(k)}={_cell(v)}" for k, v in spec.items() if k != "kind")
        rows.append([f"prior of {md(site)}", md(spec.get("kind")) + (f" ({params})" if params else "")])
    return render(["option", "value"], rows)


def _relatedness_md(relatedness: Mapping[str, Any], names: Sequence[str], titles: Mapping[str, str]) -> str:
    """One titled task-by-task table per relatedness matrix."""
    blocks = []
    for key, matrix in relatedness.items():
        rows = [[name, *("nan" if v is None else f"{float(v):.3f}" for v in row)] for name, row in zip(names, matrix)]
        title = titles.get(key, md(key))
        note = "Row: task; column: the task it draws on."
        blocks.append(f"### {title}\n\n{note}\n\n" + render(["task", *names], rows))
    return "\n\n".join(blocks)


def _elpd_md(path: Path) -> str:
    """The split's log pointwise predictive density and, where the draws vary, PSIS-LOO."""
    import arviz as az
    import xarray as xr

    try:
        with xr.open_datatree(path, engine="h5netcdf") as tree:
            tree.load()
        # a group's variable is a DataArray (the stub's DataTree item may also be a subtree)
        loglik = cast(xr.DataArray, tree["log_likelihood"]["y"]).values.reshape(-1, tree["log_likelihood"].sizes["obs"])
    except (OSError, ValueError, KeyError) as err:
        return f"not available: {path.name} cannot be read ({' '.join(str(err).split())})"
    top = loglik.max(0)
    lppd = float((top + np.log(np.exp(loglik - top).mean(0))).sum())
    lines = [f"- lppd = {lppd:.2f} over {loglik.shape[1]} observations and {loglik.shape[0]} draws"]
    if not np.ptp(loglik, axis=0).any():
        lines.append("- PSIS-LOO: not applicable, every draw is the same point estimate")
        return "\n".join(lines)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            res = az.loo(tree)
        except ValueError as err:
            lines.append(f"- PSIS-LOO: not available ({' '.join(str(err).split())})")
            return "\n".join(lines)
    line = f"- elpd_loo = {res.elpd:.2f} (se {res.se:.2f}), p_loo = {res.p:.2f}"
    if res.warning or caught:
        line += "; some Pareto k values are high, so treat it with care"
    return "\n".join([*lines, line])


def _report_md(
    run: RunDir, doc: Mapping[str, Any], cfg: Mapping[str, Any], plots: Sequence[Path], titles: Mapping[str, str]
) -> str:
    """The markdown of :func:`report`."""
    names = [md(n) for n in doc["tasks"]]
    train = doc.get("train", {})
    split = md(doc.get("split", "test"))
    method, dataset = md(doc.get("method", "?")), md(doc.get("dataset", "?"))
    parts = [
        f"# {method} on {dataset}",
        "\n".join(
            [
                f"- method: {method}, dataset: {dataset}, seed {_cell(doc.get('seed'))}, "
                f"device {md(doc.get('device'))}, fraction {_cell(doc.get('fraction') or 'full')}",
                f"- trained {_cell(train.get('steps', '?'))} steps in {_cell(train.get('seconds', math.nan))} s, "
                f"final loss {_cell(train.get('final_loss', math.nan))}, best validation score "
                f"{_cell(train.get('best_val_score', math.nan))} at step {_cell(train.get('best_step', '?'))}",
            ]
        ),
    ]
    if cfg:
        parts += ["## Configuration", _config_md(cfg)]
    tasks = dict(zip(names, doc["tasks"].values()))
    parts += [f"## {split.capitalize()} metrics", metrics_table(tasks, doc.get("average", {}))]
    if doc.get("relatedness"):
        parts += ["## Task relatedness", _relatedness_md(doc["relatedness"], names, titles)]
    if doc.get("extra"):
        parts += ["## Method-specific results", f"```json\n{json.dumps(doc['extra'], indent=2)}\n```"]
    if run.posterior_path.is_file():
        parts += [f"## Predictive fit ({split} split)", _elpd_md(run.posterior_path)]
    if plots:
        parts += ["## Plots", "\n".join(f"- ![{md(p.stem)}](plots/{p.name})" for p in plots)]
    return "\n\n".join(parts) + "\n"


def report(run_dir: str | Path) -> str:
    """Write missing plots and ``report.md`` into a run directory; return the markdown.

    Reads only the run directory's files (``metrics.json``, ``config.toml``, the checkpoint's
    history and ``posterior.nc``). The returned text ends with a line holding the path of the
    written ``report.md``, so a caller that prints it tells the user where it went.
    """
    run = RunDir(run_dir)
    with run.writing():  # it writes plots and report.md: one writer at a time (a folder it made goes if left empty)
        doc, cfg, history, context = _read_run(run)
        plot_run(run, doc=doc, history=history, context=context, only_missing=True)
        plots = sorted(run.plots_dir.glob("*.png"))
        text = _report_md(run, doc, cfg, plots, context.method.relatedness_titles if context is not None else {})
        run.write_report(text)
    return f"{text}\n{run.report_path}"
