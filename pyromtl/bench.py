"""``pyromtl bench``: a grid of methods × datasets × seeds (× option variants), one ordinary run
directory per cell, and the leaderboard read from them.

Each cell is trained with :func:`pyromtl.fit.fit_resolved` into ``OUT/<data>/<cell>``, exactly as
``pyromtl fit`` would train it: a finished cell is reopened and never retrained, an interrupted
one resumes from its checkpoint, so an interrupted bench run again picks up where it stopped.
``jobs > 1`` trains cells in that many worker processes of this machine (a process pool, each
with ``cores // jobs`` torch threads).

The leaderboard (:func:`write_leaderboard`) compares every method with ``stl`` trained on the same
seeds: per task the primary metric's mean and 95% interval over seeds (Student's t), and per
run Δm% (BayesAgg-MTL's, lower is better), Δ_I% and η̂ (SMTL's, higher is better) against
the ``stl`` run of the same seed, averaged over seeds; ECE and NLL averaged over the
classification tasks; the seconds per training step and the number of trained parameters.
"""

from __future__ import annotations

import copy
import itertools
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from pyromtl import config as config_mod
from pyromtl import methods
from pyromtl.leaderboard import BASELINE, write_leaderboard


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
        """The cell's run directory under ``out``: ``out/<data>/<method>[-key=value...]-s<seed>``.

        Args:
            out: the bench's output folder.

        Returns:
            The path (not created).
        """
        options = "".join(f"-{k}={_word(v)}" for k, v in self.options)
        return out / self.data / f"{self.method}{options}-s{self.seed}"

    def config(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` (every cell's) with this cell's grid values set; a dotted key reaches into
        a table (``priors.w.kind``) without changing ``options``' own tables.

        Args:
            options: the options every cell gets.

        Returns:
            A new dict of options.

        Raises:
            ValueError: a dotted key runs through an option that is not a table.
        """
        merged = copy.deepcopy(dict(options))
        for key, value in self.options:
            *path, last = key.split(".")
            node = merged
            for part in path:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ValueError(f"--set-grid {key}: {part!r} is not a table here, it is {node!r}")
            node[last] = copy.deepcopy(value)
        return merged


def _word(value: Any) -> str:
    return str(value).replace("/", "_").replace(" ", "")


def parse_grid(assignments: Iterable[str]) -> dict[str, list[Any]]:
    """``["beta=0.01,0.1", ...]`` as ``{"beta": [0.01, 0.1]}``; values are read as TOML scalars.
    A dotted key reaches into a table, e.g. ``priors.w.kind=deterministic,learned_normal``.

    Args:
        assignments: ``KEY=V1,V2,...`` strings (``--set-grid``).

    Returns:
        ``{key: [value, ...]}``.

    Raises:
        ValueError: an assignment without a key or values, an invalid key, or a value that is
            not one TOML value (bare words are read as strings).
    """
    grid: dict[str, list[Any]] = {}
    for text in assignments:
        key, sep, values = text.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ValueError(f"--set-grid takes KEY=V1,V2,..., got {text!r}")
        key, parsed = key.strip(), []
        for value in values.split(","):
            holder: dict[str, Any] = {}
            config_mod.apply_set(holder, f"{key}={value.strip()}")
            for part in key.split("."):
                holder = holder[part]
            parsed.append(holder)
        grid[key] = parsed
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

    Args:
        method_names: registered method names; None: all of them.
        datasets: registered dataset names; None: the embedded ones.
        seeds: seeds per cell, ``0 .. seeds - 1``.
        grid: ``{config key: [value, ...]}`` to try, as a product.

    Returns:
        The cells, dataset by dataset.

    Raises:
        ValueError: ``seeds`` below 1, an unknown method or dataset, or an explicitly named
            method on data it refuses.
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
            own = {k: v for k, v in (grid or {}).items() if _known(method, k)}
            for values in itertools.product(*own.values()):
                options = tuple(zip(own, values))
                cells += [Cell(name, data, seed, options) for seed in range(seeds)]
    return cells


def _known(method: methods.Method, key: str) -> bool:
    """Whether ``method`` has the option ``key``; ``priors.<site>...`` where it has that site."""
    root, *rest = key.split(".")
    if root == "priors":
        return bool(rest) and rest[0] in method.priors
    return root in config_mod.TRAIN_DEFAULTS or root in method.defaults


def _run(cell: Cell, out: str, options: Mapping[str, Any], plugins: Sequence[str], threads: int) -> dict[str, Any]:
    """Train (or reopen) one cell, in whatever process runs it; return whether it trained and
    how long it took. ``plugins`` are the ``--import`` modules: a worker process imports those it
    has not imported yet (it runs many cells), since they may define the method or the data."""
    import torch

    from pyromtl.fit import fit_resolved
    from pyromtl.plugins import IMPORTED, import_plugins

    import_plugins([p for p in plugins if p not in IMPORTED])
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    method = methods.get(cell.method)
    cfg = config_mod.resolve(method, {**cell.config(options), "data": cell.data, "seed": cell.seed, "quiet": True})
    fit = fit_resolved(method, cfg, out=cell.directory(Path(out)))
    return {"trained": not fit.train_info.get("complete", False), "seconds": time.perf_counter() - start}


#: Where cells run: this machine (``jobs`` processes), or a Ray cluster.
EXECUTORS = ("local", "ray")
#: The default grid's length: every cell trains its dataset's default length (``epochs`` passes),
#: capped at this many steps, so that every method on every embedded dataset, 3 seeds, trains in
#: under 30 minutes on 2 cores with ``jobs = 2`` (the cap shortens the 1,700-step datasets).
#: It applies when neither methods nor datasets are named and ``steps``/``epochs`` are not set.
DEFAULT_GRID_STEPS = 700
LENGTH_KEYS = ("steps", "epochs")


def default_grid_lengths(
    method_names: Sequence[str] | None,
    datasets: Sequence[str] | None,
    options: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The options the default grid adds per dataset: ``steps = DEFAULT_GRID_STEPS`` where the
    dataset's default length is longer; nothing for a grid that names methods or datasets, or
    whose options or grid set ``steps`` or ``epochs``.

    Args:
        method_names: the methods named, or None.
        datasets: the datasets named, or None.
        options: the options every cell gets.
        grid: the options tried as a product.

    Returns:
        ``{dataset: {"steps": DEFAULT_GRID_STEPS}}`` for each capped dataset.
    """
    from pyromtl import datasets as datasets_mod
    from pyromtl.data.embedded import BUILDERS
    from pyromtl.runspec import steps_per_epoch

    if method_names is not None or datasets is not None or any(k in options or k in (grid or {}) for k in LENGTH_KEYS):
        return {}
    capped = {}
    cfg = {**config_mod.TRAIN_DEFAULTS, **options}
    for name in BUILDERS:
        length = int(cfg["epochs"]) * steps_per_epoch(cfg, datasets_mod.load(name))
        if length > DEFAULT_GRID_STEPS:
            capped[name] = {"steps": DEFAULT_GRID_STEPS}
    return capped


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
    executor: str = "local",
    grid: Mapping[str, Sequence[Any]] | None = None,
    options: Mapping[str, Any] | None = None,
    quiet: bool = False,
) -> BenchResult:
    """Train every cell of the grid (see :func:`plan`) into ``out`` and write the leaderboard there.

    ``options`` are config keys every cell gets (e.g. ``steps``); ``grid`` maps a key to the
    values to try. Every option is checked against every method before the first cell trains.
    The default grid (no methods and no datasets named) caps each dataset's default length at
    :data:`DEFAULT_GRID_STEPS` steps unless the options set ``steps`` or ``epochs``
    (:func:`default_grid_lengths`).

    ``executor="local"`` trains ``jobs`` cells at once in processes of this machine, each with
    ``cores // jobs`` torch threads. ``executor="ray"`` hands each cell to Ray as a task of one
    CPU and one torch thread: on the cluster ``RAY_ADDRESS`` names (``ray start --head`` on one
    machine, ``ray start --address=...`` on the others), or on a local instance started here
    without it. ``out`` must then be a folder every machine of the cluster sees.

    Args:
        method_names: registered method names; None: all of them.
        datasets: registered dataset names; None: the embedded ones.
        seeds: seeds per cell.
        out: the folder the runs and the leaderboard go to.
        jobs: cells trained at once by the local executor.
        executor: ``"local"`` or ``"ray"``.
        grid: ``{config key: [value, ...]}`` to try.
        options: config keys every cell gets.
        quiet: hide the progress bar.

    Returns:
        The cells, their directories' root and which of them trained in this call.

    Raises:
        ValueError: an unknown ``executor``, ``jobs`` below 1 (or not 1 with Ray), or anything
            :func:`plan` or the config refuses, all before any training.
        ~pyromtl.errors.TrainingError: a cell's loss became NaN or infinite.
    """
    from tqdm.auto import tqdm

    from pyromtl.plugins import IMPORTED

    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if executor == "ray" and jobs != 1:
        raise ValueError("jobs sets the local executor's processes; Ray runs a cell on every CPU of its cluster")
    options = dict(options or {})
    lengths = default_grid_lengths(method_names, datasets, options, grid)
    cells = plan(method_names, datasets, seeds, grid)

    def cell_options(cell: Cell) -> dict[str, Any]:
        return {**options, **lengths.get(cell.data, {})}

    for cell in {(c.method, c.data, c.options): c for c in cells}.values():  # bad keys fail before any training
        config_mod.resolve(methods.get(cell.method), {**cell.config(cell_options(cell)), "data": cell.data})
    out = Path(out)
    result = BenchResult(out=out, cells=cells)
    start = time.perf_counter()
    bar = tqdm(total=len(cells), disable=quiet, desc="bench", unit="cell", dynamic_ncols=True)

    def finished(cell: Cell, outcome: Mapping[str, Any]) -> None:
        if outcome["trained"]:
            result.trained.append(cell)
        bar.set_postfix_str(f"{cell.directory(Path()).as_posix()} {outcome['seconds']:.0f} s")
        bar.update()

    try:
        if executor == "ray":
            _on_ray(cells, str(out), cell_options, list(IMPORTED), finished=finished)
        elif jobs == 1:
            for cell in cells:
                bar.set_postfix_str(f"{cell.directory(Path()).as_posix()} ...")
                finished(cell, _run(cell, str(out), cell_options(cell), list(IMPORTED), 0))
        else:
            threads = max(1, (os.cpu_count() or 1) // jobs)
            with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
                pending: dict[Future, Cell] = {
                    pool.submit(_run, c, str(out), cell_options(c), list(IMPORTED), threads): c for c in cells
                }
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        finished(pending.pop(future), future.result())
    finally:
        bar.close()
    result.seconds = time.perf_counter() - start
    write_leaderboard(out)
    return result


def _on_ray(
    cells: Sequence[Cell],
    out: str,
    options: Callable[[Cell], Mapping[str, Any]],
    plugins: Sequence[str],
    *,
    finished: Callable[[Cell, Mapping[str, Any]], None],
) -> None:
    """Run the cells as Ray tasks (one CPU each), reporting each as it finishes. A Ray instance
    this call started is shut down at the end; one that was running is left as it was."""
    try:
        import ray
    except ImportError:
        raise ValueError("executor 'ray' needs Ray, which is not installed: pip install 'pyromtl[ray]'") from None
    started = not ray.is_initialized()
    if started:  # RAY_ADDRESS, if set, names the cluster to join; without it Ray starts one here
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=1)(_run)
        pending = {task.remote(cell, out, options(cell), plugins, 1): cell for cell in cells}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                finished(pending.pop(ref), ray.get(ref))
    finally:
        if started:
            ray.shutdown()
