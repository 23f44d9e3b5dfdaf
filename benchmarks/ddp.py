"""One process against W processes (``devices = W``, Lightning DDP) per method: the step time, the
all-reduce's share of it, and the test metrics of both runs.

Each process runs one torch thread (``OMP_NUM_THREADS=1`` is set for the workers), so on a
machine with at least W cores the W processes do not compete for one. Per method:

* ``step 1p`` / ``step Wp``: the training loop's seconds per step (``train_info["seconds"]``,
  which excludes starting the processes, loading data and writing the run), and their ratio;
* ``all-reduce``: the median seconds of one :meth:`pyromtl.collective.Group.mean_gradients`
  on the method's parameters among W processes, timed on its own (``--rounds`` calls), and its
  share of the W-process step;
* the test accuracy (or NMSE) of both runs over ``--seeds`` seeds, mean ± sd, which should
  agree within the seeds' spread (exactly, up to float rounding, for a deterministic method
  such as bmtl). Step times are medians over the seeds.

    python benchmarks/ddp.py                        # bmtl, vmtl, bayesagg, lsmtl, hib on 2 CPU processes
    python benchmarks/ddp.py --devices 4 --device cuda --methods vmtl   # on a machine with 4 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

import pyromtl
from pyromtl import config, methods
from pyromtl.collective import Group
from pyromtl.distributed import make_fabric
from pyromtl.params import local_params
from pyromtl.runspec import RunSpec
from pyromtl.train import build_training

#: label: (method, data, options). The defaults' batches are a few rows per task, where a step's
#: fixed cost dominates; ``bmtl-large`` (every training row, batches of 256, two 1,024-unit
#: layers) is a step that computing dominates.
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bmtl": ("bmtl", "digits-domains", {}),
    "vmtl": ("vmtl", "digits-domains", {}),
    "bayesagg": ("bayesagg", "digits-mixed", {}),
    "lsmtl": ("lsmtl", "digits-mixed", {}),
    "hib": ("hib", "digits-grouped", {}),
    "bmtl-large": ("bmtl", "digits-domains", {"fraction": 1.0, "batch_size": 256, "hidden": [1024, 1024]}),
}


@local_params
def _time_all_reduce(fabric, spec: RunSpec, rounds: int, out: str) -> None:
    """Median seconds of one all-reduce of the method's gradients among the launched processes."""
    objective, _ = build_training(spec)
    params = objective.trainable_parameters()
    for p in params:
        p.grad = torch.randn_like(p)
    group = Group(rank=fabric.global_rank, world_size=fabric.world_size)
    loss = torch.zeros((), device=fabric.device)
    times = []
    for _ in range(rounds + 3):
        if fabric.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        group.mean_gradients(params, loss)
        if fabric.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if group.leader:
        Path(out).write_text(
            json.dumps({"seconds": statistics.median(times[3:]), "numbers": sum(p.numel() for p in params)})
        )


def all_reduce_seconds(spec: RunSpec, devices: int, rounds: int, tmp: Path) -> dict[str, float]:
    fabric = make_fabric(devices, cuda=spec.device.type == "cuda")
    out = tmp / f"{spec.method.name}.json"
    fabric.launch(partial(_time_all_reduce, spec=spec, rounds=rounds, out=str(out)))
    return json.loads(out.read_text())


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(CASES), help="comma-separated cases, from: " + ", ".join(CASES))
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 of both runs (the test metric's spread)")
    parser.add_argument("--rounds", type=int, default=200, help="all-reduce calls timed per method")
    parser.add_argument("--json", type=Path, help="write the table here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the workers' threads; this process's below
    torch.set_num_threads(1)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"pyromtl-ddp-bench-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    W, rows = args.devices, []
    for label in args.methods.split(","):
        name, data, options = CASES[label]
        runs: dict[int, list[tuple[float, float]]] = {1: [], W: []}  # (seconds per step, test metric)
        score = ""
        for seed in range(args.seeds):
            common = {"steps": args.steps, "seed": seed, "device": args.device, "quiet": True, **options}
            for devices in (1, W):
                fit = pyromtl.fit(name, data, devices=devices, **common)
                average = fit.metrics()["average"]
                score = "accuracy" if "accuracy" in average else "nmse"
                runs[devices].append((fit.train_info["seconds"] / args.steps, average[score]))
        m = methods.get(name)
        spec = RunSpec.build(
            m, config.resolve(m, {"steps": args.steps, "device": args.device, "data": data, **options})
        )
        reduce = all_reduce_seconds(spec, W, args.rounds, tmp)
        step_1 = statistics.median(t for t, _ in runs[1])
        step_w = statistics.median(t for t, _ in runs[W])
        rows.append(
            {
                "method": label,
                "data": data,
                "step_1p_ms": 1e3 * step_1,
                f"step_{W}p_ms": 1e3 * step_w,
                "ratio": step_w / step_1,
                "all_reduce_ms": 1e3 * reduce["seconds"],
                "all_reduce_share": reduce["seconds"] / step_w,
                "numbers_reduced": reduce["numbers"],
                "metric": score,
                "test_1p": [v for _, v in runs[1]],
                f"test_{W}p": [v for _, v in runs[W]],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n| method | data | step, 1 process | step, {W} processes | ratio | all-reduce | its share "
        f"| test, 1 process | test, {W} processes |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['data']} | {r['step_1p_ms']:.2f} ms | {r[f'step_{W}p_ms']:.2f} ms | "
            f"{r['ratio']:.2f}× | {r['all_reduce_ms']:.2f} ms | {100 * r['all_reduce_share']:.0f}% | "
            f"{r['metric']} {_mean_sd(r['test_1p'])} | {_mean_sd(r[f'test_{W}p'])} |"
        )
    if args.json:
        document = {"device": args.device, "devices": W, "steps": args.steps, "seeds": args.seeds, "rows": rows}
        args.json.write_text(json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
