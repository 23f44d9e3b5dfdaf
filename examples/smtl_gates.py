"""Why SMTL's gates did not decide, and whether they decide now.

Safe MTL's gate ``α_t = sigmoid(logit_t)`` (eq. 1; eq. 3-4 for the lite variants' straight-through
draws) is learned with the rest of the network on eq. 2's loss. This script measures what moves
it, on ``digits-mixed`` (``angle`` needs the rotation that ``even`` and ``digit`` must ignore) and
on ``digits-conflict`` at 10% of its training split (``clockwise`` asks for the rotation, the
other three tasks for the digit):

``trajectories``
    α_t over training (the run history's ``alpha/<task>``) for smtl, lsmtl, smtl-c and lsmtl-c on
    both datasets, at the gates' old step size (``gate_lr`` = the trainer's ``lr``, 3e-3: the
    gates were in the trainer's optimiser before) and at the new default.
``gradients``
    The gate-logit gradient against the encoders' (RMS over batches, and the logit's signal to
    noise ratio |mean| / sd over batches, which is what Adam's normalised step follows), at
    initialisation and after 1,000 steps; and the straight-through estimator's spread at
    α = 0.5: many gate draws on one batch, at several τ.
``sweep``
    Final α_t and Δ_I against ``stl`` (same seed) over the gates' learning rate, τ and initial
    value, for smtl and lsmtl on digits-mixed.

    python examples/smtl_gates.py trajectories gradients sweep --out results/smtl_gates

Every part writes its section into ``<out>.json`` (kept across calls) and re-renders ``<out>.md``;
``trajectories`` also draws ``<out>.png``. Runs use one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pyromtl
from pyromtl import metrics
from pyromtl.schedules import as_schedule
from pyromtl.tables import render

VARIANTS = ("smtl", "lsmtl", "smtl-c", "lsmtl-c")
#: name -> (dataset, fraction of its training split; 0: the dataset's default, the whole split)
DATASETS = {"digits-mixed": ("digits-mixed", 0.0), "digits-conflict-10%": ("digits-conflict", 0.1)}
OLD_GATE_LR = 3e-3  # the trainer's lr: the gates' step size when the trainer's optimiser held them
#: The gates as they were before the gates had their own step size: the trainer's step size, every gate at the tie.
OLD = {"gate_lr": OLD_GATE_LR, "gate_init": 0.5}
COMMAND = "python examples/smtl_gates.py"


#: Task results as ``Fit.evaluate()["tasks"]`` holds them: ``{task: {metric: value}}``.
Tasks = dict[str, dict[str, float]]


def primary(tasks: Tasks) -> Tasks:
    """Each task's primary metric only, so Δ_I and η̂ count one metric per task."""
    return {t: {(key := metrics.primary_metric(m)): m[key]} for t, m in tasks.items()}


def relative(run: Tasks, base: Tasks) -> dict[str, float]:
    """Δ_t in percent of the baseline, signed so that positive is better (as in Δ_I)."""
    out = {}
    for t, m in primary(run).items():
        ((key, value),) = m.items()
        sign = 1.0 if metrics.HIGHER_IS_BETTER[key] else -1.0
        out[t] = 100.0 * sign * (value - base[t][key]) / base[t][key]
    return out


def fit(method: str, dataset: str, seed: int, steps: int, **options: Any) -> pyromtl.Fit:
    data, fraction = DATASETS[dataset]
    return pyromtl.fit(method, data, seed=seed, steps=steps, fraction=fraction, device="cpu", quiet=True, **options)


def alphas(fit_: pyromtl.Fit) -> dict[str, list[float]]:
    """``{task: α_t at every logged step}`` and ``steps``, from the run's history."""
    rows = [h for h in fit_.history if any(k.startswith("alpha/") for k in h)]
    out: dict[str, list[float]] = {"steps": [h["step"] for h in rows]}
    for key in rows[0]:
        if key.startswith("alpha/"):
            out[key.removeprefix("alpha/")] = [round(h[key], 4) for h in rows]
    return out


def final_alpha(fit_: pyromtl.Fit) -> list[float]:
    return [round(float(a), 4) for a in fit_.model.alpha().detach()]


# ---------------------------------------------------------------------------- trajectories
def trajectories(steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dataset in DATASETS:
        for method in VARIANTS:
            for label, options in (("old", OLD), ("new", {})):
                t0 = time.perf_counter()
                f = fit(method, dataset, 0, steps, **options)
                out[f"{dataset}|{method}|{label}"] = alphas(f)
                print(f"trajectory {dataset} {method} {label}: α_T {final_alpha(f)} ({time.perf_counter() - t0:.0f} s)")
    return out


def plot_trajectories(traj: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(DATASETS), len(VARIANTS), figsize=(4 * len(VARIANTS), 3.2 * len(DATASETS)), sharey=True
    )
    for i, dataset in enumerate(DATASETS):
        for j, method in enumerate(VARIANTS):
            ax = axes[i, j]
            for label, style in (("old", ":"), ("new", "-")):
                rec = traj.get(f"{dataset}|{method}|{label}")
                if rec is None:
                    continue
                for k, task in enumerate(t for t in rec if t != "steps"):
                    ax.plot(rec["steps"], rec[task], style, color=f"C{k}", label=f"{task} ({label})")
            ax.axhline(0.5, color="grey", lw=0.5)
            ax.set_title(f"{method} on {dataset}", fontsize=9)
            ax.set_ylim(-0.02, 1.02)
            if i == len(DATASETS) - 1:
                ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("α_t (public weight)")
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"α_t over training: dotted the old gates (gate_lr {OLD_GATE_LR}, α_0 0.5), solid the defaults")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- gradients
def _batches(f: pyromtl.Fit, n: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [f.data.train_batch(f.config["batch_size"], gen, f.device) for _ in range(n)]


def gradient_stats(f: pyromtl.Fit, batches: list) -> dict[str, Any]:
    """Per batch: the gradient of the training loss on the gate logits and on the encoders."""
    obj, model = f.objective, f.model
    obj.train()
    enc = {"public": list(model.public.parameters()), "private": list(model.private.parameters())}
    logit_g, rms = [], {k: [] for k in enc}
    for b in batches:
        params = [model.gate_logit, *enc["public"], *enc["private"]]
        grads = torch.autograd.grad(obj(b), params, allow_unused=True)
        logit_g.append(grads[0].detach())
        rest = grads[1:]
        n_pub = len(enc["public"])
        for key, gs in (("public", rest[:n_pub]), ("private", rest[n_pub:])):
            flat = torch.cat([g.flatten() for g in gs if g is not None])
            rms[key].append(float(flat.pow(2).mean().sqrt()))
    g = torch.stack(logit_g)  # [batches, T]
    mean, sd = g.mean(0), g.std(0)
    return {
        "logit_rms": [round(float(x), 5) for x in g.pow(2).mean(0).sqrt()],
        "logit_mean": [round(float(x), 5) for x in mean],
        "logit_snr": [round(float(x), 3) for x in mean.abs() / sd.clamp_min(1e-12)],
        "public_rms": round(float(np.mean(rms["public"])), 5),
        "private_rms": round(float(np.mean(rms["private"])), 5),
        "alpha": final_alpha(f),
    }


def straight_through_spread(f: pyromtl.Fit, batch, taus: tuple[float, ...], draws: int) -> dict[str, Any]:
    """Gate-logit gradients of ``draws`` straight-through gate draws on one batch, per τ."""
    model, obj = f.model, f.objective
    out = {}
    saved = model.temperature
    try:
        for tau in taus:
            model.temperature = as_schedule(tau)
            g = torch.stack([torch.autograd.grad(obj(batch), [model.gate_logit])[0] for _ in range(draws)])
            tiny = (g.abs() < 1e-3 * g.abs().max()).float().mean(0)
            out[str(tau)] = {
                "mean": [round(float(x), 4) for x in g.mean(0)],
                "sd": [round(float(x), 4) for x in g.std(0)],
                "sd_over_mean": [round(float(s / max(abs(m), 1e-12)), 1) for m, s in zip(g.mean(0), g.std(0))],
                "near_zero_share": [round(float(x), 3) for x in tiny],
            }
    finally:
        model.temperature = saved
    return out


def gradients(steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in ("smtl", "lsmtl"):
        for at in (1, steps):
            f = fit(method, "digits-mixed", 0, at, **OLD)
            stats = gradient_stats(f, _batches(f, 32, 123))
            out[f"{method}|step {at}"] = stats
            print(f"gradients {method} step {at}: {stats}")
    # the straight-through estimator at α = 0.5 (one step in: every logit is still ~0)
    f = fit("lsmtl", "digits-mixed", 0, 1, **OLD)
    soft = fit("smtl", "digits-mixed", 0, 1, **OLD)
    batch = _batches(f, 1, 7)[0]
    out["straight-through at α = 0.5"] = straight_through_spread(f, batch, (0.1, 0.5, 1.0), 256)
    out["soft at α = 0.5"] = {
        "gradient": [round(float(x), 4) for x in torch.autograd.grad(soft.objective(batch), [soft.model.gate_logit])[0]]
    }
    print("straight-through spread:", out["straight-through at α = 0.5"])
    return out


# ---------------------------------------------------------------------------- sweep
SWEEP: tuple[tuple[str, dict[str, Any]], ...] = (
    ("old: gate_lr 3e-3, α_0 0.5", OLD),
    ("gate_lr 1e-2", {**OLD, "gate_lr": 1e-2}),
    ("gate_lr 3e-2", {**OLD, "gate_lr": 3e-2}),
    ("gate_lr 1e-1", {**OLD, "gate_lr": 1e-1}),
    ("gate_lr 3e-3, τ 1.0", {**OLD, "temperature": 1.0}),
    ("gate_lr 3e-3, τ 1.0 → 0.1", {**OLD, "temperature": {"start": 1.0, "end": 0.1, "fraction": 0.5}}),
    ("gate_lr 3e-3, α_0 0.25", {**OLD, "gate_init": 0.25}),
    ("gate_lr 3e-3, α_0 0.75", {**OLD, "gate_init": 0.75}),
    ("defaults (gate_lr 3e-2; α_0 0.5 soft, 0.25 lite)", {}),
)


def sweep(steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = fit("stl", "digits-mixed", 0, steps).evaluate()["tasks"]
    for method in ("smtl", "lsmtl"):
        for label, options in SWEEP:
            if method == "smtl" and ("τ" in label or label.startswith("defaults")):
                continue  # τ is the lite gates' only
            f = fit(method, "digits-mixed", 0, steps, **options)
            tasks = f.evaluate()["tasks"]
            rec = {
                "alpha": final_alpha(f),
                "delta_i": round(metrics.delta_i(primary(tasks), primary(base)), 2),
                "eta_hat": round(metrics.eta_hat(primary(tasks), primary(base)), 1),
                "delta_t": {t: round(v, 2) for t, v in relative(tasks, base).items()},
            }
            out[f"{method}|{label}"] = rec
            print(f"sweep {method} {label}: {rec}")
    return out


# ---------------------------------------------------------------------------- report
def render_gates(doc: dict[str, Any]) -> str:
    out = [
        f"# SMTL's gates\n\nMade by `{doc.get('command', COMMAND)}`, one CPU thread, seed 0, "
        f"{doc.get('steps')} steps.\n"
    ]
    if "trajectories" in doc:
        rows = []
        for key, rec in doc["trajectories"].items():
            dataset, method, label = key.split("|")
            tasks = [t for t in rec if t != "steps"]
            at = {s: i for i, s in enumerate(rec["steps"])}
            marks = [s for s in (100, 250, 500, rec["steps"][-1]) if s in at]
            cells = [" ".join(f"{rec[t][at[s]]:.2f}" for t in tasks) for s in marks]
            rows.append(
                [dataset, method, "old: 3e-3, α_0 0.5" if label == "old" else "default", ", ".join(tasks), *cells]
            )
        out += [
            "## α_t over training\n",
            "α_t per task at steps 100, 250, 500 and the last (`<out>.png` draws every logged step).\n",
            render(["data", "method", "gates", "tasks", "100", "250", "500", "last"], rows),
            "",
        ]
    if "gradients" in doc:
        g = doc["gradients"]
        rows = [
            [
                k,
                " ".join(map(str, v["alpha"])),
                " ".join(map(str, v["logit_rms"])),
                str(v["public_rms"]),
                str(v["private_rms"]),
                " ".join(map(str, v["logit_snr"])),
            ]
            for k, v in g.items()
            if "logit_rms" in v
        ]
        out += [
            "## Gradient sizes (gate_lr 3e-3, digits-mixed; 32 training batches)\n",
            "RMS of the loss's gradient per element; SNR = |mean| / sd of the logit's gradient over the batches.\n",
            render(["run", "α_t", "logit RMS", "public enc RMS", "private enc RMS", "logit SNR"], rows),
            "",
        ]
        st = g.get("straight-through at α = 0.5", {})
        rows = [
            [
                tau,
                " ".join(map(str, v["mean"])),
                " ".join(map(str, v["sd"])),
                " ".join(map(str, v["sd_over_mean"])),
                " ".join(map(str, v["near_zero_share"])),
            ]
            for tau, v in st.items()
        ]
        out += [
            "## Straight-through gate gradient at α = 0.5 (256 draws, one batch)\n",
            f"Soft gate's gradient on the same batch: {g.get('soft at α = 0.5', {}).get('gradient')}.\n",
            render(["τ", "mean", "sd", "sd / |mean|", "share of draws with |g| < 1e-3 max"], rows),
            "",
        ]
    if "sweep" in doc:
        rows = [
            [
                k.split("|")[0],
                k.split("|")[1],
                " ".join(map(str, v["alpha"])),
                f"{v['delta_i']:+.2f}",
                f"{v['eta_hat']:.1f}",
                " ".join(f"{x:+.1f}" for x in v["delta_t"].values()),
            ]
            for k, v in doc["sweep"].items()
        ]
        out += [
            "## Sweep: gates' learning rate, τ, initial value (digits-mixed, seed 0, Δ against stl seed 0)\n",
            render(["method", "setting", "α_t (angle even digit)", "Δ_I %", "η̂", "Δ_t % (angle even digit)"], rows),
            "",
        ]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("parts", nargs="+", choices=["trajectories", "gradients", "sweep", "render"])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)  # small networks: extra threads only contend on a shared machine
    command = f"{COMMAND} {' '.join(sys.argv[1:])}"
    out = Path(args.out or "results/smtl_gates")
    path = out.with_suffix(".json")
    doc = json.loads(path.read_text()) if path.exists() else {}
    if "render" not in args.parts:
        doc.update(command=command, steps=args.steps)
    for part in (p for p in args.parts if p != "render"):  # render: redraw <out>.md and .png only
        doc[part] = {"trajectories": trajectories, "gradients": gradients, "sweep": sweep}[part](args.steps)
        path.write_text(json.dumps(doc, indent=1))
    if "trajectories" in doc:
        plot_trajectories(doc["trajectories"], out.with_suffix(".png"))
    md = render_gates(doc)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
