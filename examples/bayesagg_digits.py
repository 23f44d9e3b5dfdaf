"""BayesAgg-MTL against STL and every weighting baseline on ``digits-mixed`` or ``digits-binary``:
per-task test metrics, ECE and Brier of the classification tasks, and Δm% against STL, over seeds.

    python examples/bayesagg_digits.py --data digits-binary --seeds 5 --jobs 2 --out results/
    python examples/bayesagg_digits.py --data digits-mixed --seeds 5 --methods stl ls bayesagg

Every method runs with its defaults (``pyromtl fit``'s) and the same step budget (``--steps``;
BayesAgg's LS pre-training counts inside it); model selection is on the validation split, and
the table states the kept steps. ``ls`` (torchjd's Sum) and ``bmtl`` are linear scalarisation on
the same network. Writes ``bayesagg_<data>.json`` and ``.md`` under ``--out``; runs already in
the JSON with the same method, seed, steps and data are kept, so ``--methods`` adds rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vmtl_tables import mean_ci  # noqa: E402

METHODS = ["stl", "bmtl", "ls", "uw", "dwa", "rlw", "si", "mgda", "pcgrad", "cagrad", "imtl-g", "nash-mtl",
           "aligned-mtl", "upgrad", "bayesagg"]
ARROW = {"nmse": "↓", "accuracy": "↑"}


def _run(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    import pyromtl

    fit = pyromtl.fit(job["method"], job["data"], seed=job["seed"], steps=job["steps"], device="cpu", quiet=True)
    return {**job, "tasks": fit.evaluate()["tasks"], "best_step": fit.train_info["best_step"],
            "seconds": fit.train_info["seconds"]}


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
    lines = [f"| method | seeds | {' | '.join(head)} | ECE ↓ | Brier ↓ | Δm% vs STL ↓ | kept steps (of {steps}) |",
             "|---" * (len(head) + 6) + "|"]
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
    return "\n".join(lines) + ("\n\nMean ± 95% Student-t interval over the seeds (0, 1, …) of each row; ECE and Brier "
                               "averaged over the classification tasks.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--data", default="digits-mixed")
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bayesagg_{args.data.replace('-', '_')}.json"
    jobs = [{"method": m, "seed": s, "steps": args.steps, "data": args.data} for s in range(args.seeds) for m in args.methods]
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
