"""Time the SMTL family against hard sharing (``bmtl``, the paper's DMTL), training and inference.

For every shape one run times, interleaved in rounds:

* **train**: one step as ``pyromtl.train`` takes it (the method's objective ``backward`` on a
  training batch, then ``ClippedAdam.step``), for ``bmtl``, ``stl`` and each of ``smtl``,
  ``lsmtl``, ``smtl-c``, ``lsmtl-c``; ratios against ``bmtl``. An SMTL step runs a public
  encoder and T private ones, the work of a ``bmtl`` and an ``stl`` step together, so the row
  ``stl + bmtl`` (the sum of their medians) is its compute floor;
* **inference** (plain torch, no Pyro, ``no_grad``) of a test batch under hard gates, half the
  tasks public and half private:
  ``dmtl`` (bmtl's encoder and heads), ``gated`` (the lite model with every encoder, as the
  authors' code runs it), ``pruned`` (``export_pruned``: only the chosen encoders and their
  decoders) and ``chosen`` (the chosen encoders alone, no decoder: the floor of ``pruned``).

Shapes: ``conflict`` is ``digits-conflict`` (T=4, 64-d inputs, batch 64) with the default
network (hidden [256], latent 64); ``wide`` is random SIMO data, T=8 binary tasks, 1024-d
inputs, hidden [1024], latent 256, batch 256.

    python benchmarks/smtl_step.py --threads 1 --json benchmarks/results/smtl_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from vmtl_step import objective_step  # noqa: E402

from pyromtl import datasets, methods  # noqa: E402
from pyromtl.base import TrainState  # noqa: E402
from pyromtl.config import resolve  # noqa: E402
from pyromtl.train import build_training  # noqa: E402
from pyromtl.data.core import MultiTaskData  # noqa: E402
from pyromtl.models.smtl import prune  # noqa: E402

VARIANTS = ("smtl", "lsmtl", "smtl-c", "lsmtl-c")


def wide_data(num_tasks: int = 8, dim: int = 1024, n: int = 1200, seed: int = 0) -> MultiTaskData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = {f"t{t}": (x[:, t] > 0).astype(int) for t in range(num_tasks)}
    return MultiTaskData.from_arrays(x, y, "binary", name="wide")


SHAPES = {
    "conflict": (lambda: datasets.load("digits-conflict"), {"batch_size": 64}),
    "wide": (wide_data, {"batch_size": 256, "hidden": [1024], "latent_dim": 256}),
}


def build(name: str, data: MultiTaskData, opts: dict, device: torch.device):
    """Objective and optimiser of ``name``, built as ``pyromtl.train`` builds them."""
    m = methods.get(name)
    cfg = resolve(m, {**opts, "device": str(device), "quiet": True})
    objective, optim = build_training(m, data, cfg, TrainState(), device)
    return objective, objective_step(objective, optim)


def timed(fn, arg, n: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn(arg)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bench_shape(shape: str, args, device: torch.device) -> dict:
    make, opts = SHAPES[shape]
    data = make()
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    gen = torch.Generator().manual_seed(0)
    batches = [data.train_batch(opts["batch_size"], gen, device) for _ in range(4)]
    x = next(data.eval_batches("test", device, batch_size=opts["batch_size"])).x
    T = data.num_tasks
    half = torch.tensor([1.0 if t % 2 == 0 else -1.0 for t in range(T)], device=device)  # even tasks public

    train_steps, infer, params = {}, {}, {}
    with pyro.settings.context(module_local_params=True):
        dmtl, train_steps["bmtl"] = build("bmtl", data, opts, device)
        _, train_steps["stl"] = build("stl", data, opts, device)
        net, w, bias = dmtl.model.encoder.net, dmtl.guide.w_post.loc.squeeze(1), dmtl.model.bias
        d = dmtl.model.latent_dim
        infer["dmtl"] = lambda x: torch.matmul(net(x.flatten(1))[:, :d], w.transpose(-1, -2)) + bias
        params["dmtl"] = count(net) + w.numel() + bias.numel()
        for name in VARIANTS:
            objective, train_steps[name] = build(name, data, opts, device)
            model = objective.model
            if name.startswith("l"):
                with torch.no_grad():
                    model.gate_logit.copy_(half)
                gate = (half > 0).float()
                pruned = prune(model)
                infer[f"{name} gated"] = lambda x, m=model, g=gate: m.outputs(x, g)
                infer[f"{name} pruned"] = pruned
                infer[f"{name} chosen"] = lambda x, p=pruned: (p.public(x.flatten(1)), p.private(x.flatten(1)))
                params[f"{name} gated"] = count(model) - model.gate_logit.numel() - model.noise.numel()
                params[f"{name} pruned"] = count(pruned)
                params[f"{name} chosen"] = count(pruned.public) + count(pruned.private)

    train_ms = {k: [] for k in train_steps}
    infer_ms = {k: [] for k in infer}
    with pyro.settings.context(module_local_params=True), pyro.validation_enabled(False):
        for r in range(args.rounds):  # rounds interleave, so drift in machine load hits every row alike
            for key, step in train_steps.items():
                for i in range(args.warmup if r == 0 else 1):
                    step(batches[i % len(batches)])
                for i in range(args.steps):
                    train_ms[key] += timed(step, batches[i % len(batches)], 1, device)
            with torch.no_grad():
                for key, fn in infer.items():
                    timed(fn, x, args.warmup, device)
                    infer_ms[key] += timed(fn, x, args.steps, device)
    med = {k: statistics.median(v) for k, v in train_ms.items()}
    med["stl + bmtl"] = med["stl"] + med["bmtl"]
    imed = {k: statistics.median(v) for k, v in infer_ms.items()}
    return {
        "shape": shape, "tasks": T, "batch": opts["batch_size"], "device": device.type,
        "train_ms": med, "train_ratio_vs_dmtl": {k: v / med["bmtl"] for k, v in med.items()},
        "infer_ms": imed, "infer_ratio_vs_dmtl": {k: v / imed["dmtl"] for k, v in imed.items()},
        "params": params, "timed_steps": args.steps * args.rounds,
    }


def table(res: dict) -> str:
    lines = [f"### {res['shape']} (T={res['tasks']}, batch {res['batch']}, {res['device']}, "
             f"{res['timed_steps']} timed steps per row)", "",
             "| train step | ms | × dmtl |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.3f} | {res['train_ratio_vs_dmtl'][k]:.2f} |" for k, v in res["train_ms"].items()]
    lines += ["", "| inference | ms | × dmtl | parameters |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v:.3f} | {res['infer_ratio_vs_dmtl'][k]:.2f} | {res['params'].get(k, '')} |"
              for k, v in res["infer_ms"].items()]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", default="conflict,wide")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    results = [bench_shape(s, args, device) for s in args.shapes.split(",")]
    for res in results:
        print(table(res) + "\n")
    if args.json:
        doc = {"torch": torch.__version__, "pyro": pyro.__version__, "machine": platform.machine(),
               "threads": torch.get_num_threads(), "results": results}
        Path(args.json).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
