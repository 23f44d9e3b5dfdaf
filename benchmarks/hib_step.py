"""Time one HIB training step against the authors'-style plain-PyTorch step and against the same
step without noise channels, in one run.

The sides:

* ``hib``: ``methods.get("hib")`` as configured by default (per-task noise channels
  ``W_j = Z + N_j`` of eq. 1, the β-weighted analytic KL of eq. 8), its step what
  ``pyromtl.train`` runs: the objective's loss and ``backward()``, then ClippedAdam's step, with
  Pyro's validation off;
* ``authors``: the same objective written in plain PyTorch as the authors' code is organised
  (``plain_hib.py``: a Python loop over the tasks for the noise, head, KL and loss), with
  ``torch.optim.Adam`` as they train;
* ``no_noise``: ``hib`` with the ``deterministic`` prior of ``w`` (``W_j = Z``: no sampling, no KL).

The sides take turns (``--rounds``), so drift in machine load hits them alike; a ratio is the
median over rounds of each round's ratio of median step times.

Shapes (``--shape``): ``multimnist`` (the default), MultiMNIST's: 36 x 36 inputs, binary tasks
("is digit k present"), batch 128, the paper's MLP 32-32 and latent 4; ``grouped``,
digits-grouped's sizes: 64-d inputs, 5 classes, batch 64, HIB's default latent 8. The data are
``synthetic-clusters`` in the SIMO setting with T tasks (``--tasks``).

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
from plain_hib import PlainHIB, plain_step
from vmtl_step import _iqr, environment, objective_step, time_steps

from pyromtl import datasets, methods
from pyromtl.config import resolve
from pyromtl.runspec import RunSpec
from pyromtl.train import build_training

#: The Pyro sides: their name and the prior of ``w`` (None: HIB's default marginal).
SIDES = {"hib": None, "no_noise": "deterministic"}
#: ``--shape``: input size, classes per task, batch size, latent size.
SHAPES = {"multimnist": (36 * 36, 2, 128, 4), "grouped": (64, 5, 64, 8)}


def build_step(data, prior, device, batch: int = 64, latent: int | None = None):
    """One trainer step of ``hib`` with ``prior`` for ``w``, built as ``pyromtl.train`` builds it."""
    method = methods.get("hib")
    options = {"batch_size": batch, "device": str(device), "quiet": True}
    if latent is not None:
        options["latent_dim"] = latent
    cfg = resolve(method, options, {"w": prior} if prior is not None else None, data=data)
    torch.manual_seed(0)
    return objective_step(*build_training(RunSpec.build(method, cfg, data))), cfg


def build_authors(data, cfg, device):
    """The authors'-style step on the same network, with Adam at the paper's lr 1e-4."""
    torch.manual_seed(0)
    model = PlainHIB(
        data.num_tasks, data.info.input_dim, cfg["hidden"], cfg["latent_dim"], data.info.out_dim, cfg["beta"]
    ).to(device)
    return plain_step(model, torch.optim.Adam(model.parameters(), lr=1e-4))


def bench(num_tasks: int, args, device) -> dict:
    dim, classes, batch, latent = SHAPES[args.shape]
    sizes = {"num_tasks": num_tasks, "dim": dim, "num_classes": classes, "samples_per_task": 4 * batch}
    data = datasets.load("synthetic-clusters", setting="simo", **sizes)
    gen = torch.Generator().manual_seed(0)
    rounds: dict[str, list[list[float]]] = {side: [] for side in (*SIDES, "authors")}
    with pyro.settings.context(module_local_params=True), pyro.validation_enabled(False):
        steps, cfg = {}, None
        for side, prior in SIDES.items():
            steps[side], side_cfg = build_step(data, prior, device, batch, latent)
            cfg = cfg or side_cfg
        steps["authors"] = build_authors(data, cfg, device)
        batches = [data.train_batch(batch, gen, device) for _ in range(4)]
        inputs = {side: batches for side in SIDES}
        inputs["authors"] = [(b.x.reshape(b.size, -1), b.y.long()) for b in batches]
        per_round = max(1, math.ceil(args.steps / args.rounds))
        for r in range(args.rounds):
            for side, step in steps.items():
                rounds[side].append(time_steps(step, inputs[side], args.warmup if r == 0 else 2, per_round, device))
    out = {"tasks": num_tasks, "shape": args.shape, "batch": batch, "steps": per_round * args.rounds}
    for side, per in rounds.items():
        ts = [t for r in per for t in r]
        out[f"{side}_ms"] = statistics.median(ts)
        out[f"{side}_ms_iqr"] = _iqr(ts)
    # A ratio per round compares steps timed moments apart; their median resists load that drifts.
    for name, base in (("ratio", "no_noise"), ("ratio_authors", "authors")):
        ratios = [statistics.median(a) / statistics.median(b) for a, b in zip(rounds["hib"], rounds[base])]
        out[name] = statistics.median(ratios)
        out[f"{name}_iqr"] = _iqr(ratios)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--tasks", default="2,4,8,16,32", help="comma-separated task counts")
    p.add_argument("--shape", default="multimnist", choices=sorted(SHAPES), help="input and network sizes")
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
            f"T={r['tasks']:<3} B={r['batch']}  hib {r['hib_ms']:7.3f} ms  authors {r['authors_ms']:7.3f} ms  "
            f"no noise {r['no_noise_ms']:7.3f} ms  hib/authors {r['ratio_authors']:.2f}x "
            f"(IQR over rounds {r['ratio_authors_iqr'][0]:.2f}-{r['ratio_authors_iqr'][1]:.2f})  "
            f"hib/no noise {r['ratio']:.2f}x",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
