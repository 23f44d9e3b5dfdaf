"""ArviZ export, relatedness and training plots, and the markdown report of a run directory.

:func:`to_datatree` builds an ArviZ (>= 1.0) DataTree with one chain of D draws:

* ``posterior``:

  - ``w`` ``(chain, draw, task, class, latent_dim)``: the classifier; NaN where a task lacks
    the class (the head is padded to the largest class count). For ``deterministic`` priors
    every draw is the same point;
  - ``w_weights`` (α, eq. 7) and ``z_weights`` (β, eq. 9) ``(chain, draw, task, other_task)``
    for methods with ``task_mixture`` priors: the sampled mixing weights (zero diagonal);
  - ``noise`` ``(chain, draw, regression_task)``: the regression noise scale on the target's
    original scale, a point estimate repeated over the draws.

  Per-sample representations ``z`` are left out: one per draw and sample is too big to keep.
* ``posterior_predictive``, ``log_likelihood``, ``observed_data``: ``y`` over one ``obs`` dim
  that stacks the valid (task, sample) pairs of the split, task by task, so nothing is padded
  and ``az.loo`` sees a single observation dim. The coordinates ``task`` (its name) and
  ``row`` (its index into the task's arrays) label each obs. Regression targets, draws and
  log-likelihoods are on the original target scale.
* ``relatedness``: ``Fit.relatedness()`` (VMTL's expected α and β, ...) ``(task, other_task)``.

Methods with inner Monte-Carlo plates (VMTL's L x M draws of z and w per outer draw) are
reduced to one value per outer draw d: ``log_likelihood`` is the log of the mean over the L·M
pairs of ``p(y | z, w)`` (the eq. 12 predictive of that draw, so the lppd equals that of
``Fit.evaluate``'s predictive), while ``w`` and ``posterior_predictive`` take the first inner
pair, an exact joint draw. Draws of the mixing weights come from separate traces of the
model, one per outer draw (they are not vectorised over draws).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from pyromtl import config
from pyromtl.base import local_params
from pyromtl.data.core import Batch
from pyromtl.io import atomic_write_bytes, atomic_write_text, read_metrics
from pyromtl.likelihoods import MultiTaskOutput
from pyromtl.predict import draw

#: Deterministic sites holding one ``[T, T]`` matrix of mixing weights per model trace.
TASK_PAIR_SITES = ("w_weights", "z_weights")
#: Default number of draws: PSIS-LOO fits a tail to the top 20% of the draws and needs ≥ 5 there.
MIN_DRAWS = 100
#: Head outputs held by one vectorised pass over draws (64 MiB of float32), which bounds memory.
CHUNK_ELEMENTS = 2**24
#: The groups whose ``y`` runs over the stacked ``obs`` dim.
OBS_GROUPS = ("posterior_predictive", "log_likelihood", "observed_data")
#: Titles of known relatedness matrices.
RELATEDNESS_TITLES = {
    "alpha": "α: classifier-prior mixing weights",
    "beta": "β: representation-prior mixing weights",
}


# ---------------------------------------------------------------------------- draws
@dataclasses.dataclass
class _SplitDraws:
    """Per-outer-draw quantities of a split, padded over samples (numpy)."""

    w: np.ndarray | None  # [D, T, K, d]; None for a method without a classifier site ``w``
    loglik: np.ndarray  # [D, T, N], standardised scale
    y_rep: np.ndarray  # [D, T, N], standardised scale
    y: np.ndarray  # [T, N]
    mask: np.ndarray  # [T, N]
    pairs: dict[str, np.ndarray]  # name -> [D, T, T]
    noise: np.ndarray  # [T], standardised scale


def _draw_chunk(fit, batch: Batch, n: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``w [n, T, K, d]`` (or None), ``loglik [n, T, B]`` and ``y_rep [n, T, B]`` from ``n`` outer draws."""
    d = draw(fit.model, fit.guide, batch, n, fit.method.max_plate_nesting, keep=("w",))
    T, B = batch.y.shape
    inner = d.loglik.shape[0] // n  # draw() folds (outer, L, M) into one dim, outer first
    loglik = torch.logsumexp(d.loglik.reshape(n, inner, T, B), 1) - math.log(inner)
    first = d.outputs.reshape(n, inner, T, B, -1)[:, 0]
    y_rep = MultiTaskOutput(first, fit.model.info, fit.model.noise).sample()
    w = d.sites.get("w")
    if w is not None:
        w = w.reshape(n, -1, T, *w.shape[-2:])[:, 0]  # [n, 1, M, T, 1, K, d] -> first inner draw
    return w, loglik, y_rep


def _one_row(batch: Batch) -> Batch:
    """The first sample of every task: enough to trace the model's per-call mixing weights."""
    x = batch.x[:1] if batch.simo else batch.x[:, :1]
    return dataclasses.replace(batch, x=x, y=batch.y[:, :1], mask=batch.mask[:, :1], index=batch.index[:, :1])


def _pair_draws(fit, batch: Batch, num_samples: int) -> dict[str, np.ndarray]:
    """``[D, T, T]`` draws of every :data:`TASK_PAIR_SITES` site the model records.

    A trace samples these weights once, whatever the vectorised draws, so each draw is a trace
    of its own, on one row per task to keep it cheap.
    """
    one = _one_row(batch)
    T = batch.num_tasks

    def trace() -> dict[str, torch.Tensor]:
        sites = draw(fit.model, fit.guide, one, 1, fit.method.max_plate_nesting, keep=TASK_PAIR_SITES).sites
        return {k: v.reshape(-1, T, T)[0] for k, v in sites.items()}

    first = trace()
    if not first:
        return {}
    traces = [first, *(trace() for _ in range(num_samples - 1))]
    return {k: torch.stack([t[k] for t in traces]).cpu().numpy() for k in first}


def _chunk_size(fit, batch: Batch) -> int:
    """Outer draws per vectorised pass, so that a pass holds about :data:`CHUNK_ELEMENTS` outputs."""
    inner = int(fit.config.get("mc_z", 1)) * int(fit.config.get("mc_w", 1))
    return max(1, CHUNK_ELEMENTS // (inner * batch.y.numel() * fit.model.info.out_dim))


@local_params
@torch.no_grad()
def _draw_split(fit, split: str, num_samples: int) -> _SplitDraws:
    """All draws of a split, vectorised over outer draws in memory-bounded chunks."""
    batches = list(fit.data.eval_batches(split, fit.device))
    chunk = min(_chunk_size(fit, b) for b in batches)
    device = [fit.device] if fit.device.type == "cuda" else []
    with torch.random.fork_rng(devices=device):
        torch.manual_seed(fit.config["seed"])
        ws, lls, reps = [], [], []
        for start in range(0, num_samples, chunk):
            n = min(chunk, num_samples - start)
            parts = [_draw_chunk(fit, b, n) for b in batches]
            ws.append(parts[0][0])  # w is global: one batch's draws are the draws
            lls.append(torch.cat([p[1] for p in parts], -1))
            reps.append(torch.cat([p[2] for p in parts], -1))
        pairs = _pair_draws(fit, batches[0], num_samples)
    return _SplitDraws(
        w=torch.cat(ws).cpu().numpy() if ws[0] is not None else None,
        loglik=torch.cat(lls).cpu().numpy(),
        y_rep=torch.cat(reps).cpu().numpy(),
        y=torch.cat([b.y for b in batches], 1).cpu().numpy(),
        mask=torch.cat([b.mask for b in batches], 1).cpu().numpy(),
        pairs=pairs,
        noise=fit.model.noise.detach().cpu().numpy(),
    )


# ---------------------------------------------------------------------------- DataTree
def _target_scale(data) -> tuple[np.ndarray, np.ndarray]:
    """Per-task ``(mean, std)`` that map standardised targets back (``(0, 1)`` for labels)."""
    stats = np.asarray(data.target_stats, dtype=np.float64)
    return stats[:, 0], stats[:, 1]


def _posterior(fit, dr: _SplitDraws) -> tuple[dict[str, np.ndarray], dict[str, list[str]], dict[str, Any]]:
    """Posterior variables ``[1, D, ...]``, their dims and the extra coords they need."""
    data = fit.data
    post: dict[str, np.ndarray] = {}
    dims: dict[str, list[str]] = {}
    coords: dict[str, Any] = {}
    if dr.w is not None:
        class_mask = fit.model.info.class_mask.cpu().numpy()  # [T, K]
        post["w"] = np.where(class_mask[None, :, :, None], dr.w, np.nan)[None]
        dims["w"] = ["task", "class", "latent_dim"]
        coords.update({"class": _class_labels(data, dr.w.shape[2]), "latent_dim": np.arange(dr.w.shape[3])})
    for name, values in dr.pairs.items():
        post[name] = values[None]
        dims[name] = ["task", "other_task"]
    reg = [t for t, kind in enumerate(data.task_types) if kind == "regression"]
    if reg:
        _, std = _target_scale(data)
        noise = (dr.noise * std)[reg]
        post["noise"] = np.broadcast_to(noise, (1, dr.loglik.shape[0], len(reg))).copy()
        dims["noise"] = ["regression_task"]
        coords["regression_task"] = [data.task_names[t] for t in reg]
    return post, dims, coords


def _class_labels(data, num_classes: int) -> list:
    """Class names where the dataset has one per head output, else ``0..K-1``."""
    names = data.class_names
    return list(names) if names is not None and len(names) == num_classes else list(range(num_classes))


def _stack_obs(fit, dr: _SplitDraws, split: str) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, np.ndarray]]]:
    """``y`` of the three obs groups on the stacked ``obs`` dim, and the per-obs coordinates."""
    t_idx, n_idx = np.nonzero(dr.mask)  # task-major, in split order within a task
    mean, std = _target_scale(fit.data)
    mean, std = mean[t_idx], std[t_idx]
    groups = {
        "posterior_predictive": (dr.y_rep[:, t_idx, n_idx] * std + mean)[None],
        # a density on the original scale: log p(y) = log p(y_std) - log std
        "log_likelihood": (dr.loglik[:, t_idx, n_idx] - np.log(std))[None],
        "observed_data": dr.y[t_idx, n_idx] * std + mean,
    }
    # valid entries are each task's first N_t positions, so the split's indices line up with them
    rows = np.concatenate([idx.cpu().numpy() for idx in fit.data.splits[split]]).astype(np.int64)
    names = np.array(fit.data.task_names)[t_idx]
    return groups, {"task": ("obs", names), "row": ("obs", rows)}


def to_datatree(fit, num_samples: int | None = None, split: str = "test"):
    """Export ``fit`` to an ArviZ DataTree (layout in the module docstring).

    ``num_samples`` outer draws (default ``max(eval_samples, MIN_DRAWS)``, enough for PSIS-LOO)
    of the posterior and of the predictive on ``split``.
    """
    import arviz as az
    import xarray as xr

    D = num_samples or max(int(fit.config["eval_samples"]), MIN_DRAWS)
    dr = _draw_split(fit, split, D)
    post, dims, coords = _posterior(fit, dr)
    obs, obs_coords = _stack_obs(fit, dr, split)
    names = list(fit.data.task_names)
    tree = az.from_dict(
        {"posterior": post, **{g: {"y": v} for g, v in obs.items()}},
        dims={**dims, "y": ["obs"]},
        coords={"task": names, "other_task": names, **coords},
        attrs={"/": {"method": fit.method.name, "dataset": fit.data.name, "split": split, "outer_draws": D}},
    )
    for group in OBS_GROUPS:
        tree[group] = tree[group].to_dataset().assign_coords(obs_coords)
    rel = fit.relatedness()
    if rel:
        tree["relatedness"] = xr.Dataset({k: (("task", "other_task"), np.asarray(v)) for k, v in rel.items()},
                                         coords={"task": names, "other_task": names})
    return tree


# ---------------------------------------------------------------------------- plots
def _save_png(fig, path: Path) -> Path:
    """Render ``fig`` and replace ``path`` atomically (a reader never sees half a PNG)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _figure(width: float, height: float):
    # A bare Figure renders with Agg and never enters pyplot's registry, so there is
    # nothing to close and no GUI backend is touched.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_training(history: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Training loss and, when recorded, the validation score against the step (stacked panels)."""
    scored = [h for h in history if "val_score" in h]
    fig = _figure(6.0, 5.0 if scored else 3.0)
    axes = fig.subplots(2 if scored else 1, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].plot([h["step"] for h in history], [h["loss"] for h in history], marker=".")
    axes[0].set_ylabel("training loss")
    axes[0].set_title("training")
    if scored:
        axes[1].plot([h["step"] for h in scored], [h["val_score"] for h in scored], marker=".", color="tab:orange")
        axes[1].set_ylabel("validation score\n(higher is better)")
    axes[-1].set_xlabel("step")
    return _save_png(fig, path)


def _primary(metrics: Mapping[str, float]) -> str:
    """The headline metric of one task's results: accuracy, else NMSE, else the first key."""
    return next((k for k in ("accuracy", "nmse") if k in metrics), next(iter(metrics)))


def plot_task_metrics(tasks: Mapping[str, Mapping[str, float]], path: Path, split: str = "test") -> Path:
    """One bar per task: its headline metric (accuracy, or NMSE for regression tasks)."""
    names = list(tasks)
    keys = [_primary(tasks[n]) for n in names]
    values = [float(tasks[n][k]) for n, k in zip(names, keys)]
    fig = _figure(max(4.0, 0.7 * len(names) + 2.0), 3.5)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(names)), values, color=["tab:blue" if k == "accuracy" else "tab:green" for k in keys])
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(range(len(names)), [f"{n}\n{k}" for n, k in zip(names, keys)], fontsize=8)
    ax.set_ylabel("metric")
    ax.set_title(f"{split} metric per task")
    return _save_png(fig, path)


def plot_relatedness(matrix: np.ndarray, task_names: Sequence[str], path: Path, title: str) -> Path:
    """Heatmap of a task-by-task matrix with task names on both axes and each value written in."""
    matrix = np.asarray(matrix, dtype=np.float64)
    T = len(task_names)
    fig = _figure(1.0 + 0.6 * T + 1.5, 1.0 + 0.6 * T)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=max(1.0, float(np.nanmax(matrix))))
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(T), task_names, rotation=45, ha="right")
    ax.set_yticks(range(T), task_names)
    ax.set_xlabel("other task (mixture component)")
    ax.set_ylabel("task")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="black" if value > 0.6 else "white")
    ax.set_title(title)
    return _save_png(fig, path)


def write_plots(plots_dir: str | Path, *, history: Sequence[Mapping[str, float]],
                tasks: Mapping[str, Mapping[str, float]], relatedness: Mapping[str, np.ndarray],
                split: str = "test", only_missing: bool = False) -> list[Path]:
    """Write ``training.png``, ``task_metrics.png`` and one ``relatedness_<name>.png`` per matrix.

    Returns the paths written; with ``only_missing`` existing files are kept as they are.
    """
    plots_dir = Path(plots_dir)
    names = list(tasks)
    jobs = {"task_metrics.png": lambda p: plot_task_metrics(tasks, p, split)}
    if history:
        jobs["training.png"] = lambda p: plot_training(history, p)
    for key, matrix in relatedness.items():
        title = RELATEDNESS_TITLES.get(key, key)
        jobs[f"relatedness_{key}.png"] = lambda p, m=matrix, t=title: plot_relatedness(m, names, p, t)
    return [make(plots_dir / name) for name, make in jobs.items()
            if not (only_missing and (plots_dir / name).exists())]


def plot_run(fit, plots_dir: str | Path, tree=None) -> list[Path]:
    """All plots of a fit; ``tree`` (its :func:`to_datatree`) supplies the relatedness when given."""
    if tree is not None and "relatedness" in tree.children:
        relatedness = {k: v.values for k, v in tree["relatedness"].data_vars.items()}
    else:
        relatedness = fit.relatedness()
    tasks = fit.evaluate()["tasks"]
    return write_plots(plots_dir, history=fit.history, tasks=tasks, relatedness=relatedness)


# ---------------------------------------------------------------------------- report
#: Config keys shown in the report, when the run has them.
CONFIG_HIGHLIGHTS = ("data", "steps", "epochs", "batch_size", "lr", "latent_dim", "hidden", "mc_z", "mc_w",
                     "kl_weight", "eval_samples")


def _read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, float]]]:
    """``metrics.json`` (required), ``config.toml`` and the checkpoint's training history."""
    doc = read_metrics(run_dir)
    cfg: dict[str, Any] = {}
    if (run_dir / "config.toml").is_file():
        cfg = config.load_toml(run_dir / "config.toml")
    history: list[dict[str, float]] = []
    if (run_dir / "checkpoint.pt").is_file():
        try:
            saved = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
            raise ValueError(f"{run_dir / 'checkpoint.pt'} cannot be read ({err})") from None
        history = saved.get("history", [])
    return doc, cfg, history


def _cell(value: Any) -> str:
    """A config or training value as table text: 4 significant digits for floats, TOML-like else."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table, first column left-aligned and the others right-aligned."""
    align = ["---", *["---:"] * (len(header) - 1)]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)


def _metrics_md(tasks: Mapping[str, Mapping[str, float]], average: Mapping[str, float]) -> str:
    """Tasks as rows, metric keys (in first-seen order) as columns, then the average."""
    keys: list[str] = []
    for m in [*tasks.values(), average]:
        keys += [k for k in m if k not in keys]

    def cells(m: Mapping[str, float]) -> list[str]:
        return [f"{float(m[k]):.4f}" if k in m else "-" for k in keys]

    rows = [[name, *cells(m)] for name, m in tasks.items()]
    rows.append(["**average**", *cells(average)])
    return _md_table(["task", *keys], rows)


def _config_md(cfg: Mapping[str, Any]) -> str:
    """The :data:`CONFIG_HIGHLIGHTS` the run has, and each latent site's prior."""
    shown = [k for k in CONFIG_HIGHLIGHTS if k in cfg and not (k == "epochs" and cfg.get("steps"))]  # steps win
    rows = [[f"`{k}`", _cell(cfg[k])] for k in shown]
    for site, spec in cfg.get("priors", {}).items():
        spec = dict(spec) if isinstance(spec, Mapping) else {"kind": spec}
        params = ", ".join(f"{k}={_cell(v)}" for k, v in spec.items() if k != "kind")
        rows.append([f"prior of `{site}`", f"{spec.get('kind')}" + (f" ({params})" if params else "")])
    return _md_table(["option", "value"], rows)


def _relatedness_md(relatedness: Mapping[str, Any], names: Sequence[str]) -> str:
    """One titled task-by-task table per relatedness matrix."""
    blocks = []
    for key, matrix in relatedness.items():
        rows = [[name, *(f"{float(v):.3f}" for v in row)] for name, row in zip(names, matrix)]
        title = RELATEDNESS_TITLES.get(key, key)
        note = "Row: task; column: the task it draws on."
        blocks.append(f"### {title}\n\n{note}\n\n" + _md_table(["task", *names], rows))
    return "\n\n".join(blocks)


def _elpd_md(path: Path) -> str:
    """The split's log pointwise predictive density and, where the draws vary, PSIS-LOO."""
    import arviz as az
    import xarray as xr

    try:
        with xr.open_datatree(path, engine="h5netcdf") as tree:
            tree.load()
        loglik = tree["log_likelihood"]["y"].values.reshape(-1, tree["log_likelihood"].sizes["obs"])
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


def _report_md(run_dir: Path, doc: Mapping[str, Any], cfg: Mapping[str, Any], plots: Sequence[Path]) -> str:
    """The markdown of :func:`report`."""
    names = list(doc["tasks"])
    train = doc.get("train", {})
    split = doc.get("split", "test")
    parts = [
        f"# {doc.get('method', '?')} on {doc.get('dataset', '?')}",
        "\n".join([
            f"- method: `{doc.get('method')}`, dataset: `{doc.get('dataset')}`, seed {doc.get('seed')}, "
            f"device {doc.get('device')}, fraction {doc.get('fraction') or 'full'}",
            f"- trained {train.get('steps', '?')} steps in {_cell(train.get('seconds', math.nan))} s, "
            f"final loss {_cell(train.get('final_loss', math.nan))}, best validation score "
            f"{_cell(train.get('best_val_score', math.nan))} at step {train.get('best_step', '?')}",
        ]),
    ]
    if cfg:
        parts += ["## Configuration", _config_md(cfg)]
    parts += [f"## {split.capitalize()} metrics", _metrics_md(doc["tasks"], doc.get("average", {}))]
    if doc.get("relatedness"):
        parts += ["## Task relatedness", _relatedness_md(doc["relatedness"], names)]
    if (run_dir / "posterior.nc").is_file():
        parts += [f"## Predictive fit ({split} split)", _elpd_md(run_dir / "posterior.nc")]
    if plots:
        parts += ["## Plots", "\n".join(f"- ![{p.stem}](plots/{p.name})" for p in plots)]
    return "\n\n".join(parts) + "\n"


def report(run_dir: str | Path) -> str:
    """Write missing plots and ``report.md`` into a run directory; return the markdown.

    Reads only the run directory's files (``metrics.json``, ``config.toml``, the checkpoint's
    history and ``posterior.nc``). The returned text ends with a line holding the path of the
    written ``report.md``, so a caller that prints it tells the user where it went.
    """
    run_dir = Path(run_dir)
    doc, cfg, history = _read_run(run_dir)
    relatedness = {k: np.asarray(v, dtype=np.float64) for k, v in (doc.get("relatedness") or {}).items()}
    write_plots(run_dir / "plots", history=history, tasks=doc["tasks"], relatedness=relatedness,
                split=doc.get("split", "test"), only_missing=True)
    plots = sorted((run_dir / "plots").glob("*.png"))
    text = _report_md(run_dir, doc, cfg, plots)
    out = run_dir / "report.md"
    atomic_write_text(out, text)
    return f"{text}\n{out}"
