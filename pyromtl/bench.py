"""``pyromtl bench``: a grid of methods × datasets × seeds (× option variants), one ordinary run
directory per cell, and the leaderboard read from them.

Each cell is trained with :func:`pyromtl.fit.fit_resolved` into ``OUT/<data>/<cell>``, exactly as
``pyromtl fit`` would train it: a finished cell is reopened and never retrained, an interrupted
one resumes from its checkpoint, so an interrupted bench run again picks up where it stopped.
``jobs > 1`` trains cells in that many worker processes of this machine (a process pool, each
with ``cores // jobs`` torch threads).

The leaderboard (:func:`leaderboard`) compares every method with ``stl`` trained on the same
seeds: per task the primary metric's mean and 95% interval over seeds (Student's t), and per
run Δm% (BayesAgg-MTL's, lower is better), Δ_I% and η̂ (SMTL's, higher is better) against
the ``stl`` run of the same seed, averaged over seeds; ECE and NLL averaged over the
classification tasks; the seconds per training step and the number of trained parameters.
"""

from __future__ import annotations

import csv
import html
import io
import itertools
import math
import os
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from pyromtl import config as config_mod
from pyromtl import methods, metrics
from pyromtl.io import atomic_write_text
from pyromtl.metrics.prediction import primary_metric
from pyromtl.rundir import RunDir

#: The baseline every cell is compared with.
BASELINE = "stl"


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a method on a dataset with a seed and option values."""

    method: str
    data: str
    seed: int
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def variant(self) -> str:
        """The method and its grid options, e.g. ``hib[beta=0.1]``: a leaderboard row."""
        if not self.options:
            return self.method
        return f"{self.method}[{','.join(f'{k}={_word(v)}' for k, v in self.options)}]"

    def directory(self, out: Path) -> Path:
        options = "".join(f"-{k}={_word(v)}" for k, v in self.options)
        return out / self.data / f"{self.method}{options}-s{self.seed}"


def _word(value: Any) -> str:
    return str(value).replace("/", "_").replace(" ", "")


def parse_grid(assignments: Iterable[str]) -> dict[str, list[Any]]:
    """``["beta=0.01,0.1", ...]`` as ``{"beta": [0.01, 0.1]}``; values are read as TOML scalars."""
    grid: dict[str, list[Any]] = {}
    for text in assignments:
        key, sep, values = text.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ValueError(f"--set-grid takes KEY=V1,V2,..., got {text!r}")
        parsed = []
        for value in values.split(","):
            holder: dict[str, Any] = {}
            config_mod.apply_set(holder, f"{key.strip()}={value.strip()}")
            parsed.append(holder[key.strip()])
        grid[key.strip()] = parsed
    return grid


def plan(
    method_names: Sequence[str] | None,
    datasets: Sequence[str] | None,
    seeds: int,
    grid: Mapping[str, Sequence[Any]] | None = None,
) -> list[Cell]:
    """The cells of a grid, checked before anything trains.

    ``method_names`` defaults to every registered method, ``datasets`` to the embedded ones. A
    method is paired only with the datasets it accepts (its setting and task count); named
    explicitly on data it refuses, that is an error naming both. ``stl`` joins every dataset as
    the baseline. Grid options apply to the methods that have them (others run once).
    """
    from pyromtl import datasets as datasets_mod

    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    explicit = method_names is not None
    names = list(method_names) if method_names is not None else methods.available()
    for name in names:
        methods.get(name)  # an unknown method fails here, with the names there are
    if BASELINE not in names:
        names.append(BASELINE)
    cells: list[Cell] = []
    from pyromtl.data.embedded import BUILDERS  # the embedded datasets: no files to fetch

    for data in datasets if datasets is not None else list(BUILDERS):
        loaded = datasets_mod.load(data)
        for name in names:
            method = methods.get(name)
            try:
                method.check_data(loaded)
            except ValueError as err:
                if explicit and name != BASELINE:
                    raise ValueError(f"{name} on {data}: {err}") from None
                continue
            own = {k: v for k, v in (grid or {}).items() if k in _known_keys(method)}
            for values in itertools.product(*own.values()):
                options = tuple(zip(own, values))
                cells += [Cell(name, data, seed, options) for seed in range(seeds)]
    return cells


def _known_keys(method: methods.Method) -> set[str]:
    return set(config_mod.TRAIN_DEFAULTS) | set(method.defaults)


def _run(cell: Cell, out: str, options: Mapping[str, Any], threads: int) -> dict[str, Any]:
    """Train (or reopen) one cell; return its ``metrics.json`` document and whether it trained."""
    import torch

    from pyromtl.fit import fit_resolved

    if threads:
        torch.set_num_threads(threads)
    method = methods.get(cell.method)
    cfg = config_mod.resolve(
        method, {**options, **dict(cell.options), "data": cell.data, "seed": cell.seed, "quiet": True}
    )
    fit = fit_resolved(method, cfg, out=cell.directory(Path(out)))
    return {"metrics": fit.metrics(), "trained": not fit.train_info.get("complete", False)}


@dataclass
class BenchResult:
    """What :func:`bench` did: every cell's directory, and which cells trained in this call."""

    out: Path
    cells: list[Cell]
    trained: list[Cell] = field(default_factory=list)
    seconds: float = 0.0


def bench(
    method_names: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    *,
    seeds: int = 3,
    out: str | Path = "bench",
    jobs: int = 1,
    grid: Mapping[str, Sequence[Any]] | None = None,
    options: Mapping[str, Any] | None = None,
    quiet: bool = False,
) -> BenchResult:
    """Train every cell of the grid (see :func:`plan`) into ``out`` and write the leaderboard there.

    ``options`` are config keys every cell gets (e.g. ``steps``); ``grid`` maps a key to the
    values to try. Every option is checked against every method before the first cell trains.
    """
    from tqdm.auto import tqdm

    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    options = dict(options or {})
    cells = plan(method_names, datasets, seeds, grid)
    for cell in {(c.method, c.data, c.options): c for c in cells}.values():  # bad keys fail before any training
        config_mod.resolve(methods.get(cell.method), {**options, **dict(cell.options), "data": cell.data})
    out = Path(out)
    result = BenchResult(out=out, cells=cells)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    start = time.perf_counter()
    bar = tqdm(total=len(cells), disable=quiet, desc="bench", unit="cell", dynamic_ncols=True)
    try:
        if jobs == 1:
            for cell in cells:
                bar.set_postfix_str(cell.directory(Path()).as_posix())
                if _run(cell, str(out), options, 0)["trained"]:
                    result.trained.append(cell)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
                pending: dict[Future, Cell] = {pool.submit(_run, c, str(out), options, threads): c for c in cells}
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        cell = pending.pop(future)
                        if future.result()["trained"]:
                            result.trained.append(cell)
                        bar.set_postfix_str(cell.directory(Path()).as_posix())
                        bar.update()
    finally:
        bar.close()
    result.seconds = time.perf_counter() - start
    write_leaderboard(out)
    return result


# ---------------------------------------------------------------------------- the leaderboard
def interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for one value)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def _cells(out: Path) -> list[dict[str, Any]]:
    """Every finished cell under ``out``: its name and metrics document."""
    return [
        {"name": path.parent.name, "doc": RunDir(path.parent).read_metrics()}
        for path in sorted(out.glob("*/*/complete.json"))
    ]


def _variant(name: str, seed: int) -> str:
    """A cell directory's name less its seed: the leaderboard row."""
    suffix = f"-s{seed}"
    return name[: -len(suffix)] if name.endswith(suffix) else name


def tables(out: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The leaderboard's rows per dataset, read from the cells under ``out`` (see the module doc)."""
    by_data: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for cell in _cells(Path(out)):
        doc = cell["doc"]
        by_data.setdefault(doc["dataset"], {}).setdefault(_variant(cell["name"], doc["seed"]), []).append(cell)
    result: dict[str, list[dict[str, Any]]] = {}
    for data, variants in sorted(by_data.items()):
        baseline = {c["doc"]["seed"]: c["doc"]["tasks"] for c in variants.get(BASELINE, [])}
        rows = []
        for variant, runs in sorted(variants.items()):
            tasks = runs[0]["doc"]["tasks"]
            row: dict[str, Any] = {"method": variant, "seeds": sorted(r["doc"]["seed"] for r in runs)}
            for task, scores in tasks.items():
                key = primary_metric(scores)
                if key is not None:
                    row[f"{task}:{key}"] = interval([r["doc"]["tasks"][task][key] for r in runs])
            paired = [r for r in runs if r["doc"]["seed"] in baseline]
            for label, fn in (("Δm%", metrics.delta_m), ("Δ_I%", metrics.delta_i), ("η̂", metrics.eta_hat)):
                values = [fn(r["doc"]["tasks"], baseline[r["doc"]["seed"]]) for r in paired]
                row[label] = interval(values) if values else None
            for key in ("ece", "nll"):
                per_run = [
                    statistics.fmean(s[key] for s in r["doc"]["tasks"].values() if key in s)
                    for r in runs
                    if any(key in s for s in r["doc"]["tasks"].values())
                ]
                row[key] = interval(per_run) if per_run else None
            train = [r["doc"]["train"] for r in runs]
            row["ms/step"] = statistics.median(1e3 * t["seconds"] / t["steps"] for t in train)
            row["parameters"] = train[0].get("parameters")  # absent from runs made before it was recorded
            rows.append(row)
        result[data] = rows
    return result


def _text(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, tuple):
        mean, half = value
        return f"{mean:.4g} ± {half:.2g}"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def write_leaderboard(out: str | Path) -> dict[str, Path]:
    """Write ``leaderboard.md``, ``leaderboard.csv`` and ``leaderboard.html`` into ``out``."""
    out = Path(out)
    boards = tables(out)
    md, rows_csv, parts = [], [], []
    for data, rows in boards.items():
        columns = list(dict.fromkeys(k for row in rows for k in row))
        md += [f"## {data}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        md += ["| " + " | ".join(_text(row.get(c)) for c in columns) + " |" for row in rows]
        md.append("")
        parts.append(
            f"<h2>{html.escape(data)}</h2><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        )
        for row in rows:
            cells = "".join(f"<td>{html.escape(_text(row.get(c)))}</td>" for c in columns)
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</table>")
        for row in rows:
            for column, value in row.items():
                if column in ("method", "seeds"):
                    continue
                mean, half = value if isinstance(value, tuple) else (value, None)
                rows_csv.append(
                    {"dataset": data, "method": row["method"], "column": column, "mean": mean, "ci95": half}
                )
    legend = (
        "Mean ± half-width of the 95% interval over seeds. Δm% (lower is better), Δ_I% and η̂ "
        f"(higher is better) against {BASELINE} on the same seed; ece and nll averaged over the "
        "classification tasks; parameters: the numbers the optimiser trains."
    )
    paths = {"md": out / "leaderboard.md", "csv": out / "leaderboard.csv", "html": out / "leaderboard.html"}
    atomic_write_text(paths["md"], "# Leaderboard\n\n" + legend + "\n\n" + "\n".join(md))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["dataset", "method", "column", "mean", "ci95"])
    writer.writeheader()
    writer.writerows(rows_csv)
    atomic_write_text(paths["csv"], buffer.getvalue())
    page = f"<!doctype html><meta charset='utf-8'><title>pyromtl leaderboard</title><p>{html.escape(legend)}</p>"
    atomic_write_text(paths["html"], page + "".join(parts))
    return paths
