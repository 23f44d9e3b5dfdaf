"""Time one training step of every gradient-weighting baseline against ``ls``, in one run.

A step is what ``pyromtl.train`` does: the method's ``Objective.backward`` on a fresh batch
(per-task losses from the model trace, then torchjd's scalarisation or ``mtl_backward`` and
aggregation) and a ClippedAdam step, with Pyro's validation off and module-local parameters.
Every method gets the same network (the methods' defaults: latent 64, hidden [256]), the same
data and batch size. Methods are timed in interleaved rounds so drifting machine load hits
them alike; the table gives each one's median step time and its ratio to ``ls``.

    python benchmarks/weighting_step.py --data digits-mixed,digits-binary --threads 1 --json cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import pyro
import torch

from pyromtl import config, datasets, methods
from pyromtl.params import local_params
from pyromtl.runspec import RunSpec, resolve_device
from pyromtl.train import build_training

METHODS = ["ls", "si", "rlw", "dwa", "uw", "mgda", "pcgrad", "cagrad", "imtl-g", "nash-mtl", "aligned-mtl", "upgrad"]


@local_params
def _stepper(name: str, data, batch_size: int, device: torch.device):
    """A closure running one training step of ``name``, built as the trainer builds it."""
    m = methods.get(name)
    cfg = config.resolve(m, {"batch_size": batch_size, "device": str(device)}, data=data)
    pyro.set_rng_seed(0)
    objective, optim = build_training(RunSpec.build(m, cfg, data))
    gen = torch.Generator().manual_seed(0)

    @local_params
    def step() -> None:
        batch = data.train_batch(batch_size, gen, device)
        optim.zero_grad(set_to_none=True)
        with pyro.validation_enabled(False):
            objective.backward(batch)
        optim.step()

    return step


def _time(step, n: int, device: torch.device) -> float:
    """Seconds per step, averaged over ``n`` steps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def bench_data(
    data, names: list[str], batch_size: int, steps: int, warmup: int, rounds: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """``{method: {"ms": median ms per step, "vs_ls": its ratio to ls}}`` on ``data`` (``names`` holds ``ls``)."""
    steppers = {name: _stepper(name, data, batch_size, device) for name in names}
    for step in steppers.values():
        _time(step, warmup, device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name, step in steppers.items():
            times[name].append(_time(step, steps, device))
    median = {name: statistics.median(t) for name, t in times.items()}
    return {name: {"ms": 1e3 * median[name], "vs_ls": median[name] / median["ls"]} for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits-mixed", help="comma-separated SIMO dataset names")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    names = args.methods.split(",")
    if "ls" not in names:
        names.insert(0, "ls")
    results = {
        "device": device.type,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "shapes": {},
    }
    for dataset in args.data.split(","):
        data = datasets.load(dataset)
        rows = bench_data(data, names, args.batch_size, args.steps, args.warmup, args.rounds, device)
        results["shapes"][dataset] = {"tasks": data.num_tasks, "methods": rows}
        print(f"\n{dataset} ({data.num_tasks} tasks), {device.type}, batch {args.batch_size}")
        print(f"{'method':<12} {'ms/step':>8} {'× ls':>6}")
        for name, row in rows.items():
            print(f"{name:<12} {row['ms']:8.2f} {row['vs_ls']:6.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
