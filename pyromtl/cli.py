"""The ``pyromtl`` command: list, fit, evaluate, compare and report.

The CLI only parses input and calls the Python API. Every user mistake (unknown name, bad
value, missing or malformed file) ends with exit code 2 and one line on stderr,
``pyromtl: error: <message>``; a training failure (NaN loss) ends with exit code 1.
Unexpected exceptions keep their traceback, since they are bugs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyromtl import __version__
from pyromtl.rundir import RunDir
from pyromtl.tables import metrics_table

if TYPE_CHECKING:
    from pyromtl.method import Method

# ---------------------------------------------------------------------------- list
#: What ``pyromtl list`` lists, in order.
LIST_SECTIONS = ("methods", "datasets", "priors", "networks")
#: Said where a section has no entry.
NONE_HINT = {"networks": ": register one with pyromtl.networks.register in a module passed with --import"}


def _summaries(section: str) -> list[tuple[str, str]]:
    """``(name, one-line summary)`` for every entry of a registry."""
    if section == "methods":
        from pyromtl import methods

        return [(name, methods.get(name).summary) for name in methods.available()]
    if section == "datasets":
        from pyromtl import datasets

        return [(name, _plain(datasets.summary(name))) for name in datasets.available()]
    if section == "networks":
        from pyromtl import networks

        return [(name, "registered by your code") for name in networks.available()]
    from pyromtl import priors

    def params(kind: str) -> str:
        defaults = priors.describe(kind)
        # json writes these scalars as TOML does (true, "text"), the syntax a config file takes
        return ", ".join(f"{k}={json.dumps(v)}" for k, v in defaults.items()) if defaults else "(no parameters)"

    return [(name, params(name)) for name in priors.available()]


def _plain(text: str) -> str:
    """A docstring line without reST markup: ``code`` and :role:`target` become plain words."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "")


def cmd_list(args: argparse.Namespace) -> int:
    sections = [args.section] if args.section else list(LIST_SECTIONS)
    blocks = []
    for section in sections:
        entries = _summaries(section)
        width = max((len(n) for n, _ in entries), default=0)
        lines = [f"  {n.ljust(width)}  {s}".rstrip() for n, s in entries] or [f"  (none{NONE_HINT.get(section, '')})"]
        blocks.append("\n".join([f"{section}:", *lines]))
    print("\n\n".join(blocks))
    return 0


# ---------------------------------------------------------------------------- show
def _toml(value: Any) -> str:
    """A config value as TOML writes it (what ``--set KEY=VALUE`` and a config file take)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _schedule_words(schedule: Any) -> str:
    """A schedule (:class:`pyromtl.schedules.Schedule`) in words: constant, or how it anneals."""
    if schedule.kind == "constant":
        return f"{schedule.start:g}, constant"
    if schedule.is_relative:
        span = f"over the first {schedule.fraction:.0%} of the steps"
    elif schedule.kind == "linear":
        span = f"over the first {schedule.steps} steps"
    else:
        span = f"at rate {schedule.rate:g} per step"
    return f"{schedule.kind} from {schedule.start:g} to {schedule.end:g} {span}"


def _rows(entries: list[tuple[str, str]]) -> list[str]:
    width = max((len(n) for n, _ in entries), default=0)
    return [f"  {n.ljust(width)}  {s}".rstrip() for n, s in entries] or ["  (none)"]


def _method(name: str) -> Method:
    """The method registered as ``name``; the error for an unknown one says how to register one's own."""
    from pyromtl import methods

    try:
        return methods.get(name)
    except ValueError as err:
        raise ValueError(
            f"{err}; for a method of your own, pass --import MODULE (the module or .py file that registers it)"
        ) from None


def show_text(name: str) -> str:
    """What ``pyromtl show METHOD`` prints: the method's resolved defaults, section by section."""
    from pyromtl import config
    from pyromtl.options import TrainOptions

    method = _method(name)
    cfg = config.resolve(method)
    train_keys = list(TrainOptions.defaults())
    own_defaults = method.options.defaults()
    plain = {**config.TRAIN_DEFAULTS, **own_defaults}

    def option_rows(keys: list[str]) -> list[str]:
        entries = []
        for key in keys:
            text = _toml(cfg[key])
            base = config.TRAIN_DEFAULTS[key] if key in config.TRAIN_DEFAULTS else own_defaults[key]
            if key in method.overrides and method.overrides[key] != base:
                where = "TrainOptions" if key in config.TRAIN_DEFAULTS else method.options.__name__
                text += f"  ({method.name}'s value; {where} has {_toml(base)})"
            elif key == "fraction" and not plain[key]:
                text += f"  (0, resolved to the default fraction of {cfg['data']})"
            elif cfg[key] != plain[key]:
                text += f"  (resolved from {_toml(plain[key])})"
            entries.append((key, text))
        return _rows(entries)

    own_keys = [k for k in own_defaults if k not in config.TRAIN_DEFAULTS]
    steps = cfg["steps"]
    length = f"{steps} steps" if steps else f"{cfg['epochs']} epochs (steps = 0: epochs × the batches of an epoch)"
    optimiser = ", ".join(f"{k} = {_toml(cfg[k])}" for k in ("lr", "clip_norm", "lr_decay", "weight_decay"))
    schedules = [(path, _schedule_words(s)) for path, s in config.schedules(method, cfg).items()]
    if isinstance(cfg.get("kl_weights"), dict):
        per_site = ", ".join(f"{site} = {w:g}" for site, w in cfg["kl_weights"].items())
        schedules.append(("kl_weights", f"{per_site} (each site's KL weight is kl_weight times its own)"))
    prior_rows = [
        (
            site,
            f"{spec['kind']}: "
            + (", ".join(f"{k}={_toml(v)}" for k, v in spec.items() if k != "kind") or "(no parameters)"),
        )
        for site, spec in cfg["priors"].items()
    ] or [("(none: the method has no latent sites)", "")]
    blocks = [
        "\n".join(
            [
                f"{method.name}: {method.summary}",
                f"paper: {method.paper}",
                f"data: {' or '.join(s.upper() for s in method.settings)}, at least {method.min_tasks} "
                + ("task" if method.min_tasks == 1 else "tasks"),
            ]
        ),
        "\n".join(["training options (TrainOptions):", *option_rows(train_keys)]),
        "\n".join([f"method options ({method.options.__name__}):", *option_rows(own_keys)]),
        "\n".join(["priors (one per latent site; [priors.<site>] in a config file):", *_rows(prior_rows)]),
        "\n".join(["optimiser:", f"  ClippedAdam: {optimiser}"]),
        "\n".join(["length:", f"  {length}, batch_size = {cfg['batch_size']}"]),
        "\n".join(["schedules (the KL weight and any other annealed value):", *_rows(schedules)]),
        "change any of these with --set KEY=VALUE or --config FILE.toml (see `pyromtl fit --help`)",
    ]
    return "\n\n".join(blocks)


def cmd_show(args: argparse.Namespace) -> int:
    print(show_text(args.method))
    return 0


# ---------------------------------------------------------------------------- fit
def fit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``fit``: ``--config`` file, then each ``--set`` in order, then explicit flags.

    Method defaults come last, from :func:`pyromtl.config.resolve`, under all of these.
    """
    from pyromtl import config

    cfg: dict[str, Any] = config.load_toml(args.config) if args.config else {}
    for assignment in args.set:
        config.apply_set(cfg, assignment)
    keys = ("data", "root", "fraction", "seed", "device", "devices", "num_nodes", "epochs", "steps", "quiet")
    flags = {k: getattr(args, k) for k in keys}
    if flags["epochs"] is not None and flags["steps"] is None:
        flags["steps"] = 0  # an explicit --epochs wins over a `steps` from the file or --set
    cfg.update({k: v for k, v in flags.items() if v is not None})
    if cfg.setdefault("method", args.method) != args.method:
        raise ValueError(f"the config is for method {cfg['method']!r} but the command fits {args.method!r}")
    return cfg


def cmd_fit(args: argparse.Namespace) -> int:
    from pyromtl import config
    from pyromtl.fit import fit_resolved

    method = _method(args.method)
    cfg = config.resolve(method, fit_options(args))  # fail on bad options before any work
    if args.out is not None and not args.out.strip():
        raise ValueError("--out must name a run directory, got an empty string")
    out = Path(args.out or f"runs/{args.method}-{cfg['data']}-s{cfg['seed']}")
    t0 = time.perf_counter()
    fit = fit_resolved(method, cfg, out=out)
    wall = time.perf_counter() - t0
    doc = fit.metrics()
    train = doc["train"]
    print(
        f"{doc['method']} on {doc['dataset']} (seed {doc['seed']}, {doc['device']}), {doc.get('split', 'test')} split:"
    )
    print(metrics_table(doc["tasks"], doc["average"]))
    if fit.train_info.get("complete"):
        print(f"{out} already holds this run, complete at {train['steps']} steps; nothing was trained or written")
    elif fit.train_info.get("finished_save"):
        print(
            f"{out} held this run trained to step {train['steps']} without all its files: wrote them, trained nothing"
        )
    else:
        print(f"trained {train['steps']} steps in {train['seconds']:.1f} s; wall time {wall:.1f} s")
    if train.get("best_step", -1) > 0:
        at = ", ".join(f"{k} {_short(v)}" for k, v in (train.get("selected") or {}).items() if k != "step")
        print(
            f"kept step {train['best_step']} (best validation score {train['best_val_score']:.4f})"
            + (f" at {at}" if at else "")
        )
    print(f"run dir: {out}")
    return 0


def _short(value: Any) -> str:
    """A schedule value (or a table of them) in few characters."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_short(v)}" for k, v in value.items()) + "}"
    return f"{value:.3g}"


# ---------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    import pyromtl

    f = pyromtl.load(args.run_dir)
    scores = f.evaluate(args.split)
    print(f"{f.method.name} on {f.data.name}, {args.split} split:")
    print(metrics_table(scores["tasks"], scores["average"]))
    return 0


# ---------------------------------------------------------------------------- compare
def run_labels(dirs: Sequence[Path]) -> list[str]:
    """Column names: the directory names, or the paths as given where two names clash."""
    names = [d.name or str(d) for d in dirs]
    labels = [n if names.count(n) == 1 else str(d) for n, d in zip(names, dirs)]
    return [lab if labels.count(lab) == 1 else f"{lab}#{labels[: i + 1].count(lab)}" for i, lab in enumerate(labels)]


def _read_metrics(run: RunDir) -> dict[str, Any]:
    """A run's ``metrics.json``, refused while another process writes the run."""
    with run.reading():
        return run.read_metrics()


def cmd_compare(args: argparse.Namespace) -> int:
    from pyromtl import metrics

    dirs = [Path(d) for d in args.run_dirs]
    base_index = None
    if args.baseline is not None:
        base = Path(args.baseline)
        same = [i for i, d in enumerate(dirs) if d.resolve() == base.resolve()]
        if same:
            base_index = same[0]
        else:
            dirs.append(base)
            base_index = len(dirs) - 1
    docs = [_read_metrics(RunDir(d)) for d in dirs]
    datasets = {doc["dataset"] for doc in docs}
    if len(datasets) > 1:
        found = ", ".join(f"{d}: {doc['dataset']}" for d, doc in zip(dirs, docs))
        raise ValueError(f"runs on different datasets cannot be compared ({found})")
    labels = run_labels(dirs)
    runs = {lab: doc["tasks"] for lab, doc in zip(labels, docs)}
    baseline = labels[base_index] if base_index is not None else None
    for key in ("fraction", "seed"):
        values = {d: doc.get(key) for d, doc in zip(labels, docs)}
        if len(set(values.values())) > 1:
            found = ", ".join(f"{d}: {v}" for d, v in values.items())
            print(
                f"pyromtl: warning: the runs differ in {key} ({found}); they are not a like-for-like comparison",
                file=sys.stderr,
            )
    # several metrics per task (SMTL's m_t > 1); checked before the table says anything
    chosen = None if args.metrics is None else metrics.check_metric_names(args.metrics.split(","))
    table = metrics.compare_table(runs, baseline, chosen)
    print(f"dataset: {datasets.pop()}")
    print(table)
    if baseline is not None:
        print(COMPARE_LEGEND if chosen is None else COMPARE_LEGEND_METRICS.format(", ".join(chosen)))
    return 0


#: What the rows under the table mean (each uses every task's primary metric).
COMPARE_LEGEND = """\
Δm%  mean relative change against the baseline, signed so that lower is better (BayesAgg-MTL's Δm)
Δ_I% mean relative improvement over the baseline, averaged per task first; higher is better (SMTL)
η̂    percentage of tasks on which the run is no worse than the baseline; 100 means no negative sharing (SMTL)"""

#: The same under ``--metrics`` (SMTL §4's Δ_I and η̂ with m_t metrics for task t).
COMPARE_LEGEND_METRICS = """\
metrics: {} (each task uses those of its kind; lower-is-better ones count with the sign flipped)
Δm%  mean relative change over every (task, metric) pair, signed so that lower is better (BayesAgg-MTL's Δm)
Δ_I% relative improvement averaged over a task's metrics, then over tasks; higher is better (SMTL)
η̂    share of a task's metrics on which the run is no worse, averaged over tasks, in percent (SMTL)"""


# ---------------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> int:
    from pyromtl.report import report

    print(report(args.run_dir))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pyromtl import bench, config

    options: dict[str, Any] = {}
    for assignment in args.set:
        config.apply_set(options, assignment)
    grid = bench.parse_grid(args.set_grid)
    if not (args.methods or args.data) and (capped := bench.default_grid_lengths(None, None, options, grid)):
        print(
            f"the default grid: every method on every embedded dataset at its default length, capped at "
            f"{bench.DEFAULT_GRID_STEPS} steps ({', '.join(capped)}); --set epochs=100 trains the full length"
        )
    result = bench.bench(
        args.methods.split(",") if args.methods else None,
        args.data.split(",") if args.data else None,
        seeds=args.seeds,
        out=args.out,
        jobs=args.jobs,
        executor=args.executor,
        grid=grid,
        options=options,
        quiet=args.quiet,
    )
    print(
        f"{len(result.cells)} cells ({len(result.trained)} trained now, the rest already done) in "
        f"{result.seconds:.1f} s; leaderboard: {result.out / 'leaderboard.md'}"
    )
    return 0


# ---------------------------------------------------------------------------- parser and main
def build_parser() -> argparse.ArgumentParser:
    """The ``pyromtl`` command's parser, with every subcommand and option.

    Returns:
        The parser.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module or .py file first (it registers your own methods, priors or datasets); repeatable",
    )
    p = argparse.ArgumentParser(prog="pyromtl", description="Probabilistic multi-task learning with Pyro.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("list", parents=[common], help="list methods, datasets, prior kinds and networks")
    sp.add_argument("section", nargs="?", choices=list(LIST_SECTIONS))
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser(
        "show",
        parents=[common],
        help="print a method's defaults: every option, its priors, optimiser, length and schedules",
    )
    sp.add_argument("method", metavar="METHOD")
    sp.set_defaults(func=cmd_show)

    sp = sub.add_parser(
        "fit",
        parents=[common],
        help="train a method and write a run directory",
        description="Train METHOD. Precedence: method defaults < --config < --set (in order) < explicit flags.",
    )
    sp.add_argument("method", metavar="METHOD")
    sp.add_argument("--data", metavar="NAME", help="dataset name (see `pyromtl list datasets`)")
    sp.add_argument("--root", metavar="PATH", help="folder holding a benchmark's files")
    sp.add_argument("--fraction", type=float, metavar="F", help="few-shot fraction of each task's training split")
    sp.add_argument("--config", metavar="FILE.toml", help="TOML file of options and [priors.<site>] tables")
    sp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one option (TOML value; dotted keys reach into tables); repeatable",
    )
    sp.add_argument("--device", metavar="auto|cpu|cuda")
    sp.add_argument("--seed", type=int, metavar="N")
    sp.add_argument("--devices", type=int, metavar="N", help="train on N processes per machine (Lightning DDP)")
    sp.add_argument("--num-nodes", type=int, metavar="N", help="machines of a multi-machine run (Lightning DDP)")
    sp.add_argument("--epochs", type=int, metavar="N", help="train for N epochs (overrides a configured `steps`)")
    sp.add_argument("--steps", type=int, metavar="N", help="train for N optimiser steps")
    sp.add_argument("--out", metavar="DIR", help="run directory (default runs/<method>-<data>-s<seed>)")
    sp.add_argument("--quiet", action="store_true", default=None, help="no progress bar")
    sp.set_defaults(func=cmd_fit)

    sp = sub.add_parser("evaluate", parents=[common], help="print a saved run's per-task metrics (writes nothing)")
    sp.add_argument("run_dir", metavar="RUN_DIR")
    sp.add_argument("--split", choices=["test", "val", "train"], default="test")
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser(
        "compare", parents=[common], help="compare runs task by task, with Δm, Δ_I and η̂ against a baseline"
    )
    sp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    sp.add_argument("--baseline", metavar="RUN_DIR", help="run to compare against (e.g. an STL run)")
    sp.add_argument(
        "--metrics",
        metavar="M1,M2,...",
        help="score each task on these metrics (those of its kind, e.g. accuracy,nll,nmse) instead of its "
        "primary one; Δ_I and η̂ average over a task's metrics first (SMTL)",
    )
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser("report", parents=[common], help="write plots and report.md into a run directory")
    sp.add_argument("run_dir", metavar="RUN_DIR")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser(
        "bench",
        parents=[common],
        help="train methods × datasets × seeds into run directories and write the leaderboard",
    )
    sp.add_argument("--methods", metavar="M1,M2", help="methods (default: every registered one that accepts the data)")
    sp.add_argument("--data", "--datasets", metavar="D1,D2", help="datasets (default: the embedded ones)")
    sp.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds 0..N-1 (default 3)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an option of every cell")
    sp.add_argument(
        "--set-grid", action="append", default=[], metavar="KEY=V1,V2", help="try each value (methods with KEY)"
    )
    sp.add_argument("--jobs", type=int, default=1, metavar="N", help="cells trained at once, in N processes")
    sp.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="where cells run: this machine (--jobs processes), or Ray (the cluster RAY_ADDRESS names, else a "
        "local instance; pip install 'pyromtl[ray]')",
    )
    sp.add_argument("--out", default="bench", metavar="DIR", help="where the cells and the leaderboard go")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_bench)
    return p


def _error(message: str, code: int) -> int:
    # One line, whatever the exception text holds (TOML errors, for one, span lines).
    print(f"pyromtl: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return the exit code.

    Args:
        argv: the arguments, without the program name.

    Returns:
        The exit code: the subcommand's (0 on success), 2 for a usage error or refused input
        (errors are printed as one line, not raised), 1 when training fails, 130 on Ctrl-C.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) and argparse's usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    from pyromtl.train import TrainingError, TrainingInterrupted

    try:
        from pyromtl.plugins import import_plugins

        import_plugins(args.imports)
        return args.func(args)
    except (ValueError, OSError) as err:  # OSError: a path that is missing, unreadable or not writable
        return _error(str(err), 2)
    except KeyError as err:  # str(KeyError) quotes its message
        return _error(str(err.args[0]) if err.args else "missing key", 2)
    except TrainingError as err:
        return _error(str(err), 1)
    except TrainingInterrupted as err:
        return _error(str(err), 130)
    except KeyboardInterrupt:
        return _error("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
