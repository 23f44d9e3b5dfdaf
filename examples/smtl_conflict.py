"""The safety demonstration of Safe MTL on ``digits-conflict``: is hard sharing unsafe, are the gates?

Fits ``stl``, ``bmtl`` (hard sharing, the paper's DMTL) and the four SMTL variants on the same
seeds, then scores every method against the ``stl`` run of its seed on test accuracy:
``Δ_I`` (percent) and ``η̂`` (Safe MTL §4, ``pyromtl.metrics.delta_i`` / ``eta_hat``), and the
learned ``α_t`` (weight of the public encoder). Model selection is on val, as every fit does.

    python examples/smtl_conflict.py --seeds 5 --steps 600 --out results/smtl_conflict

writes ``<out>.json`` (every run's per-task accuracy and gates) and ``<out>.md`` (the tables).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

import pyromtl
from pyromtl import metrics
from pyromtl.tables import render

METHODS = ("stl", "bmtl", "smtl", "lsmtl", "smtl-c", "lsmtl-c")


def run(methods: tuple[str, ...], seeds: int, steps: int) -> dict:
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in range(seeds):
        for name in methods:
            fit = pyromtl.fit(name, "digits-conflict", seed=seed, steps=steps, device="cpu", quiet=True)
            tasks = {t: m["accuracy"] for t, m in fit.evaluate()["tasks"].items()}
            gates = fit.relatedness().get("gates")
            runs[name].append({"seed": seed, "accuracy": tasks, "best_step": fit.train_info["best_step"],
                               "alpha": None if gates is None else np.diag(gates).round(4).tolist()})
            print(f"seed {seed} {name:8s} " + " ".join(f"{t}={a:.4f}" for t, a in tasks.items()), flush=True)
    return runs


def pm(xs: list[float], digits: int = 4) -> str:
    """``mean ± std`` over seeds."""
    spread = f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else ""
    return f"{statistics.mean(xs):.{digits}f}{spread}"


def _acc(run: dict) -> dict[str, dict[str, float]]:
    return {t: {"accuracy": a} for t, a in run["accuracy"].items()}


def tables(runs: dict[str, list[dict]], steps: int) -> str:
    names = list(runs)
    tasks = list(runs["stl"][0]["accuracy"])
    seeds = len(runs["stl"])
    rows = [[t, *[pm([r["accuracy"][t] for r in runs[n]]) for n in names]] for t in tasks]
    header = ["test accuracy", *names]
    out = [f"digits-conflict, {seeds} seeds, {steps} steps each (the val-selected step kept), default network; "
           "mean ± std over seeds.", "", render(header, rows)]

    rows = []
    for n in names:
        if n == "stl":
            continue
        di = [metrics.delta_i(_acc(r), _acc(b), "accuracy") for r, b in zip(runs[n], runs["stl"])]
        eta = [metrics.eta_hat(_acc(r), _acc(b), "accuracy") for r, b in zip(runs[n], runs["stl"])]
        worse = {t: sum(r["accuracy"][t] < b["accuracy"][t] for r, b in zip(runs[n], runs["stl"])) for t in tasks}
        alpha = ("–" if runs[n][0]["alpha"] is None else
                 " ".join(f"{x:.2f}" for x in np.mean([r["alpha"] for r in runs[n]], axis=0)))
        rows.append([n, pm(di, 2), pm(eta, 1), " ".join(f"{worse[t]}/{seeds}" for t in tasks), alpha])
    out += ["", f"Against the stl run of the same seed (accuracy). Seeds worse than stl per task, in the order "
            f"{', '.join(tasks)}; α_t (weight of the public encoder) averaged over seeds, same order.", "",
            render(["method", "Δ_I % ↑", "η̂ ↑", "seeds worse than stl", "α_t"], rows)]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default="results/smtl_conflict")
    args = p.parse_args()
    torch.set_num_threads(1)
    methods = tuple(args.methods.split(","))
    if "stl" not in methods:
        raise SystemExit("--methods must include stl, the baseline of Δ_I and η̂")
    runs = run(methods, args.seeds, args.steps)
    md = tables(runs, args.steps)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"steps": args.steps, "runs": runs}, indent=1))
    out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
