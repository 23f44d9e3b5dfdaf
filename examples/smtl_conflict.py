"""The safety demonstration of Safe MTL on a conflicting task: is hard sharing unsafe, are the gates?

Fits ``stl``, ``bmtl`` (hard sharing, the paper's DMTL) and the four SMTL variants on the same
seeds of ``--data``, every method at its defaults, then scores each against the ``stl`` run of
its seed on every task's primary test metric (accuracy, or NMSE for regression): the per-task
relative difference Δ_t, ``Δ_I`` (percent) and ``η̂`` (Safe MTL §4, ``pyromtl.metrics.delta_i``
/ ``eta_hat``), and the learned ``α_t`` (weight of the public encoder). Model selection is on
val, as every fit does; the kept steps are reported.

The default data is ``digits-mixed``: two digit tasks (``even``, ``digit``) that must ignore
each image's rotation, and ``angle``, which asks for exactly that rotation. There hard sharing
is worse than single-task learning on ``angle`` and ``even`` on every seed (docs/methods/smtl.md, "As
implemented"); ``digits-conflict``'s one-bit ``clockwise`` conflict is too easy to show it.

    python examples/smtl_conflict.py --seeds 5 --steps 1000 --out results/smtl_conflict

writes ``<out>.json`` (every run's test metrics, kept step and gates) and ``<out>.md`` (the tables).
Runs already in ``<out>.json`` for the same data, steps and seeds are kept, so ``--methods``
adds rows (``stl``, the baseline, must be among them or already there).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import pyromtl
from pyromtl import metrics
from pyromtl.tables import render

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vmtl_tables import mean_ci

METHODS = ("stl", "bmtl", "cross-stitch", "smtl", "lsmtl", "smtl-c", "lsmtl-c")
ARROW = {"accuracy": "↑", "nmse": "↓"}

#: Task results as ``Fit.evaluate()["tasks"]`` holds them: ``{task: {metric: value}}``.
Tasks = dict[str, dict[str, float]]


def run(data: str, methods: tuple[str, ...], seeds: int, steps: int) -> dict[str, list[dict]]:
    """Every method on seeds ``0..seeds-1``, one after another: ``{method: [run per seed]}``."""
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in range(seeds):
        for name in methods:
            fit = pyromtl.fit(name, data, seed=seed, steps=steps, device="cpu", quiet=True)
            tasks = fit.evaluate()["tasks"]
            gates = fit.relatedness().get("gates")
            runs[name].append(
                {
                    "seed": seed,
                    "tasks": tasks,
                    "best_step": fit.train_info["best_step"],
                    "alpha": None if gates is None else np.diag(gates).round(4).tolist(),
                }
            )
            shown = " ".join(f"{t}={v:.4f}" for t, v in headline(tasks).items())
            print(f"seed {seed} {name:8s} {shown}", flush=True)
    return runs


def primary(tasks: Tasks) -> Tasks:
    """Each task's primary metric only, so Δ_I and η̂ count one metric per task."""
    return {t: {(key := metrics.primary_metric(m)): m[key]} for t, m in tasks.items()}


def headline(tasks: Tasks) -> dict[str, float]:
    return {t: next(iter(m.values())) for t, m in primary(tasks).items()}


def relative(run: Tasks, base: Tasks) -> dict[str, float]:
    """Δ_t in percent of the baseline, signed so that positive is better (as in Δ_I)."""
    out = {}
    for t, m in primary(run).items():
        ((key, value),) = m.items()
        sign = 1.0 if metrics.HIGHER_IS_BETTER[key] else -1.0
        out[t] = 100.0 * sign * (value - base[t][key]) / base[t][key]
    return out


def tables(runs: dict[str, list[dict]], data: str, steps: int) -> str:
    """The markdown report: test metrics, per-task Δ_t, then Δ_I, η̂, α_t and kept steps."""
    names = list(runs)
    stl = runs["stl"]
    keys = {t: next(iter(m)) for t, m in primary(stl[0]["tasks"]).items()}
    tasks, seeds = list(keys), len(stl)
    ci = "mean ± 95% Student-t interval over seeds"
    out = [
        f"{data}, {seeds} seeds, {steps} steps each (the val-selected step kept), every method at its defaults; {ci}.",
        "",
    ]
    rows = [
        [f"{t} {keys[t]} {ARROW[keys[t]]}", *[mean_ci([headline(r["tasks"])[t] for r in runs[n]], 4) for n in names]]
        for t in tasks
    ]
    out += [render(["test", *names], rows), ""]

    deltas = {n: [relative(r["tasks"], b["tasks"]) for r, b in zip(runs[n], stl)] for n in names if n != "stl"}
    rows = [[n, *[mean_ci([d[t] for d in deltas[n]], 2) for t in tasks]] for n in deltas]
    out += [
        f"Δ_t against the stl run of the same seed, percent of stl's value, positive is better ({ci}; an "
        "interval that excludes 0 is a significant difference).",
        "",
        render(["method", *[f"Δ {t} %" for t in tasks]], rows),
        "",
    ]

    rows = []
    for n in deltas:
        pairs = list(zip(runs[n], stl))
        di = [metrics.delta_i(primary(r["tasks"]), primary(b["tasks"])) for r, b in pairs]
        eta = [metrics.eta_hat(primary(r["tasks"]), primary(b["tasks"])) for r, b in pairs]
        worse = [sum(d[t] < 0 for d in deltas[n]) for t in tasks]
        alpha = (
            "–"
            if runs[n][0]["alpha"] is None
            else " ".join(f"{x:.2f}" for x in np.mean([r["alpha"] for r in runs[n]], axis=0))
        )
        kept = ", ".join(str(r["best_step"]) for r in runs[n])
        rows.append([n, mean_ci(di, 2), mean_ci(eta, 1), " ".join(f"{w}/{seeds}" for w in worse), alpha, kept])
    out += [
        f"Δ_I and η̂ against the stl run of the same seed ({ci}). Seeds worse than stl per task and α_t "
        f"(weight of the public encoder, averaged over seeds) in the task order {', '.join(tasks)}. stl kept "
        f"steps {', '.join(str(r['best_step']) for r in stl)}.",
        "",
        render(["method", "Δ_I % ↑", "η̂ ↑", "seeds worse than stl", "α_t", "kept steps"], rows),
    ]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="digits-mixed")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default="results/smtl_conflict")
    args = p.parse_args()
    torch.set_num_threads(1)  # small networks: extra threads only contend on a shared machine
    methods = tuple(args.methods.split(","))
    out = Path(args.out)
    path = out.with_suffix(".json")
    old = json.loads(path.read_text()) if path.exists() else {}
    same = (old.get("data"), old.get("steps")) == (args.data, args.steps)
    kept = {m: r for m, r in old.get("runs", {}).items() if same and m not in methods and len(r) == args.seeds}
    if "stl" not in methods and "stl" not in kept:
        raise SystemExit("--methods must include stl, the baseline of Δ_I and η̂")
    fresh = run(args.data, methods, args.seeds, args.steps)
    runs = {m: (fresh if m in fresh else kept)[m] for m in (*METHODS, *methods) if m in fresh or m in kept}
    md = tables(runs, args.data, args.steps)
    print(md)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"data": args.data, "steps": args.steps, "runs": runs}, indent=1))
    out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
