"""BayesAgg-MTL against STL and every weighting baseline on ``digits-mixed`` or ``digits-binary``:
per-task test metrics, ECE and Brier of the classification tasks, and Δm% against STL, over seeds.

    python examples/bayesagg_digits.py --data digits-binary --seeds 5 --jobs 2 --out results/
    python examples/bayesagg_digits.py --data digits-mixed --seeds 5 --methods stl ls bayesagg

Every method runs with its defaults (``pyromtl fit``'s) and the same step budget (``--steps``;
BayesAgg's LS pre-training counts inside it); model selection is on the validation split, and
the table states the kept steps. ``ls`` (torchjd's Sum) and ``bmtl`` are linear scalarisation on
the same network. Writes ``bayesagg_<data>.json`` and ``.md`` under ``--out``; runs already in
the JSON with the same method, seed, steps and data are kept, so ``--methods`` adds rows.

``--tune`` instead searches BayesAgg's s (per task type) and prior scale γ on the validation
split: every grid point on seeds 0 … ``--tune-seeds``−1, ranked by validation Δm% against STL
of the same seed; then the best point and the defaults run on seeds 0 … ``--seeds``−1 and
report test Δm% (``bayesagg_tuning_<data>.json`` and ``.md``):

    python examples/bayesagg_digits.py --data digits-binary --tune --jobs 2
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vmtl_tables import mean_ci

METHODS = [
    "stl",
    "bmtl",
    "ls",
    "uw",
    "dwa",
    "rlw",
    "si",
    "mgda",
    "pcgrad",
    "cagrad",
    "imtl-g",
    "nash-mtl",
    "aligned-mtl",
    "upgrad",
    "bayesagg",
]
ARROW = {"nmse": "↓", "accuracy": "↑"}


def _run(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    import pyromtl

    point = job.get("point") or {}
    options = {k: v for k, v in point.items() if k != "scale"}
    priors = {"w": {"kind": "full_data", "scale": point["scale"]}} if "scale" in point else None
    fit = pyromtl.fit(
        job["method"],
        job["data"],
        seed=job["seed"],
        steps=job["steps"],
        device="cpu",
        quiet=True,
        priors=priors,
        **options,
    )
    return {
        **job,
        "tasks": fit.evaluate()["tasks"],
        "val": fit.evaluate("val")["tasks"],
        "best_step": fit.train_info["best_step"],
        "seconds": fit.train_info["seconds"],
    }


#: The search space of --tune: s per task type (eq. 7; the paper's ranges and beyond) and γ.
GRID_S_CLASSIFICATION = [5e-3, 5e-2, 0.5]
GRID_S_REGRESSION = [0.5, 0.9]
GRID_SCALE = [0.3, 1.0, 3.0]


def grid(
    has_regression: bool, s_classification: list[float], s_regression: list[float], scale: list[float]
) -> list[dict]:
    s_reg = s_regression if has_regression else [None]
    return [
        {"s_classification": c, **({"s_regression": r} if r is not None else {}), "scale": g}
        for c in s_classification
        for r in s_reg
        for g in scale
    ]


def _pool_runs(jobs: list[dict], workers: int) -> list[dict]:
    with ProcessPoolExecutor(workers) as pool:
        return [f.result() for f in as_completed([pool.submit(_run, job) for job in jobs])]


def tune(data: str, steps: int, tune_seeds: int, seeds: int, workers: int, out: Path, axes: dict) -> str:
    """Rank the grid on validation Δm% (seeds < ``tune_seeds``), then test the best point and the defaults."""
    from pyromtl import datasets
    from pyromtl.metrics import delta_m

    has_regression = "regression" in datasets.load(data).task_types
    base = {"data": data, "steps": steps}
    points = grid(has_regression, **axes)
    runs = _pool_runs(
        [{**base, "method": "stl", "seed": s} for s in range(seeds)]
        + [{**base, "method": "bayesagg", "seed": s, "point": p} for s in range(tune_seeds) for p in points],
        workers,
    )
    stl = {r["seed"]: r for r in runs if r["method"] == "stl"}

    def score(point: dict | None, split: str, below: int = seeds) -> list[float]:
        mine = [r for r in runs if r["method"] == "bayesagg" and r.get("point") == point and r["seed"] < below]
        return [delta_m(r[split], stl[r["seed"]][split]) for r in sorted(mine, key=lambda r: r["seed"])]

    ranked = sorted(points, key=lambda p: np.mean(score(p, "val", tune_seeds)))
    best = ranked[0]
    runs += _pool_runs(
        [
            {**base, "method": "bayesagg", "seed": s, "point": p}
            for s in range(seeds)
            for p in (best, None)
            if not (p is best and s < tune_seeds)
        ],
        workers,
    )
    (out / f"bayesagg_tuning_{data.replace('-', '_')}.json").write_text(json.dumps(runs, indent=1))

    def label(point: dict | None) -> str:
        return "defaults" if point is None else ", ".join(f"{k} = {v:g}" for k, v in point.items())

    lines = [
        f"BayesAgg's grid on {data}, ranked by validation Δm% vs STL (seeds 0–{tune_seeds - 1}, {steps} steps):",
        "",
        "| s and γ | validation Δm% ↓ | test Δm% ↓ |",
        "|---|---|---|",
    ]
    lines += [
        f"| {label(p)} | {mean_ci(score(p, 'val', tune_seeds), digits=2)} | "
        f"{mean_ci(score(p, 'tasks', tune_seeds), digits=2)} |"
        for p in ranked
    ]
    lines += [
        "",
        f"The best point and the defaults on seeds 0–{seeds - 1}:",
        "",
        "| s and γ | validation Δm% ↓ | test Δm% ↓ | kept steps |",
        "|---|---|---|---|",
    ]
    for p in (best, None):
        kept = ", ".join(
            str(r["best_step"])
            for r in sorted(
                (r for r in runs if r["method"] == "bayesagg" and r.get("point") == p), key=lambda r: r["seed"]
            )
        )
        lines.append(
            f"| {label(p)} | {mean_ci(score(p, 'val'), digits=2)} | {mean_ci(score(p, 'tasks'), digits=2)} | {kept} |"
        )
    return "\n".join(lines) + "\n\nMean ± 95% Student-t interval over seeds."


def _key(run: dict) -> tuple:
    return run["method"], run["seed"], run["steps"], run["data"]


def table(runs: list[dict], steps: int) -> str:
    """Each task's headline metric, the classification tasks' mean ECE and Brier, Δm% against STL of
    the same seed (mean ± 95% CI over seeds), and the kept steps."""
    from pyromtl.metrics import delta_m, primary_metric

    stl = {r["seed"]: r["tasks"] for r in runs if r["method"] == "stl"}
    columns = {task: primary_metric(result) for task, result in runs[0]["tasks"].items()}
    classified = [task for task, metric in columns.items() if metric == "accuracy"]
    many = len(columns) > 4  # ten binary tasks: their mean accuracy, not one column each
    head = ["mean accuracy ↑"] if many else [f"{task} {metric} {ARROW[metric]}" for task, metric in columns.items()]
    lines = [
        f"| method | seeds | {' | '.join(head)} | ECE ↓ | Brier ↓ | Δm% vs STL ↓ | kept steps (of {steps}) |",
        "|---" * (len(head) + 6) + "|",
    ]
    for method in [m for m in METHODS if any(r["method"] == m for r in runs)]:
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        if many:
            cells = [mean_ci([np.mean([r["tasks"][t]["accuracy"] for t in classified]) for r in mine])]
        else:
            cells = [mean_ci([r["tasks"][task][metric] for r in mine]) for task, metric in columns.items()]
        for metric in ("ece", "brier"):
            cells.append(mean_ci([np.mean([r["tasks"][t][metric] for t in classified]) for r in mine]))
        dm = mean_ci([delta_m(r["tasks"], stl[r["seed"]]) for r in mine if r["seed"] in stl], digits=2)
        kept = ", ".join(str(r["best_step"]) for r in mine)
        lines.append(f"| {method} | {len(mine)} | {' | '.join(cells)} | {dm} | {kept} |")
    return "\n".join(lines) + (
        "\n\nMean ± 95% Student-t interval over the seeds (0, 1, …) of each row; ECE and Brier "
        "averaged over the classification tasks."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--data", default="digits-mixed")
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--out", default="results")
    parser.add_argument("--tune", action="store_true", help="search s and γ on validation instead")
    parser.add_argument("--tune-seeds", type=int, default=2)
    parser.add_argument("--s-classification", type=float, nargs="+", default=GRID_S_CLASSIFICATION)
    parser.add_argument("--s-regression", type=float, nargs="+", default=GRID_S_REGRESSION)
    parser.add_argument("--scale", type=float, nargs="+", default=GRID_SCALE, help="γ values of --tune")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tune:
        axes = {"s_classification": args.s_classification, "s_regression": args.s_regression, "scale": args.scale}
        text = tune(args.data, args.steps, args.tune_seeds, args.seeds, args.jobs, out, axes)
        (out / f"bayesagg_tuning_{args.data.replace('-', '_')}.md").write_text(text + "\n")
        print(text)
        return
    path = out / f"bayesagg_{args.data.replace('-', '_')}.json"
    jobs = [
        {"method": m, "seed": s, "steps": args.steps, "data": args.data}
        for s in range(args.seeds)
        for m in args.methods
    ]
    redo = {_key(j) for j in jobs}
    runs = [r for r in json.loads(path.read_text()) if _key(r) not in redo] if path.exists() else []
    with ProcessPoolExecutor(args.jobs) as pool:
        for future in as_completed([pool.submit(_run, job) for job in jobs]):
            runs.append(future.result())
            path.write_text(json.dumps(runs, indent=1))  # every finished run is kept, even if the rest is stopped
    text = table(runs, args.steps)
    path.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
