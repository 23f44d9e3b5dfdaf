"""Time one HIB training step against the same step without noise channels, in one run.

The two sides are ``methods.get("hib")`` as configured by default (per-task noise channels
``W_j = Z + N_j`` of eq. 1, the β-weighted analytic KL of eq. 8) and the same method with the
``deterministic`` prior of ``w`` (``W_j = Z``: no sampling, no KL). Each step is what
``pyromtl.train`` runs: the objective's loss and ``backward()``, then ClippedAdam's step, with
Pyro's validation off. The two sides take turns (``--rounds``), so drift in machine load hits
both alike; the ratio is the median over rounds of each round's ratio of median step times.

Data: ``synthetic-clusters`` in the SIMO setting with T tasks (``--tasks``), 64-d inputs and 5
classes (digits-grouped's sizes), 120 shared samples of which 72 train, batch 64; the network is
HIB's default (MLP 32-32, latent 8, linear heads).

    python benchmarks/hib_step.py --threads 1 --json benchmarks/results/hib_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vmtl_step import _iqr, environment, objective_step, time_steps

from pyromtl import datasets, methods
from pyromtl.config import resolve
from pyromtl.runspec import RunSpec
from pyromtl.train import build_training

#: The two sides: their name and the prior of ``w`` (None: HIB's default marginal).
SIDES = {"hib": None, "no_noise": "deterministic"}


def build_step(data, prior, device):
    """One trainer step of ``hib`` with ``prior`` for ``w``, built as ``pyromtl.train`` builds it."""
    method = methods.get("hib")
    cfg = resolve(
        method,
        {"batch_size": 64, "device": str(device), "quiet": True},
        {"w": prior} if prior is not None else None,
        data=data,
    )
    torch.manual_seed(0)
    return objective_step(*build_training(RunSpec.build(method, cfg, data))), cfg


def bench(num_tasks: int, args, device) -> dict:
    data = datasets.load("synthetic-clusters", setting="simo", num_tasks=num_tasks, dim=64, num_classes=5)
    gen = torch.Generator().manual_seed(0)
    rounds = {side: [] for side in SIDES}
    with pyro.settings.context(module_local_params=True), pyro.validation_enabled(False):
        steps = {side: build_step(data, prior, device)[0] for side, prior in SIDES.items()}
        batches = [data.train_batch(64, gen, device) for _ in range(4)]
        per_round = max(1, math.ceil(args.steps / args.rounds))
        for r in range(args.rounds):
            for side, step in steps.items():
                rounds[side].append(time_steps(step, batches, args.warmup if r == 0 else 2, per_round, device))
    out = {"tasks": num_tasks, "batch": batches[0].size, "steps": per_round * args.rounds}
    for side, per in rounds.items():
        ts = [t for r in per for t in r]
        out[f"{side}_ms"] = statistics.median(ts)
        out[f"{side}_ms_iqr"] = _iqr(ts)
    # A ratio per round compares steps timed moments apart; their median resists load that drifts.
    ratios = [statistics.median(a) / statistics.median(b) for a, b in zip(rounds["hib"], rounds["no_noise"])]
    out["ratio"] = statistics.median(ratios)
    out["ratio_iqr"] = _iqr(ratios)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--tasks", default="2,4,8,16,32", help="comma-separated task counts")
    p.add_argument("--steps", type=int, default=300, help="timed steps per side and task count")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=30, help="turns the two sides take")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    print(json.dumps(env))
    out = {
        "environment": env,
        "command": " ".join(["python", "benchmarks/hib_step.py", *(argv or sys.argv[1:])]),
        "results": [],
    }
    for t in args.tasks.split(","):
        r = bench(int(t), args, device)
        out["results"].append(r)
        print(
            f"T={r['tasks']:<3} B={r['batch']}  hib {r['hib_ms']:7.3f} ms  no noise {r['no_noise_ms']:7.3f} ms  "
            f"ratio {r['ratio']:.2f}x (IQR over rounds {r['ratio_iqr'][0]:.2f}-{r['ratio_iqr'][1]:.2f})",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
