"""Time of one BayesAgg-MTL training step against linear scalarisation (LS), in the same run.

Both sides are the same ``bayesagg`` model (extractor and linear heads) and the same Adam step;
LS back-propagates the plain sum of the task losses (the method's pre-training branch), BayesAgg
the aggregated gradient (Algorithm 1: the heads' batch posteriors, the gradient moments, eq. 7)
under the full-data prior of a finished epoch. They take turns in rounds so machine load hits
both alike; the table gives the median step times over rounds, and the ratio is the median over
rounds of each round's ratio (with its interquartile range); the ratio of the summed times
keeps what only some steps pay. Shapes:

* ``cifar-mtl``: 3×32×32 inputs through the library's small CNN (``backbone = "cnn"``) standing
  in for the paper's ResNet-18 (three 3×3 conv + ReLU + max-pool blocks, 32/64/64 channels, then
  a linear map to d = 160: ``hidden = []``, ``activation = "relu"``),
  b = 128, 20 binary tasks; classification moments by quadrature (the default) and by Monte
  Carlo with J = 1024 (eq. 11);
* ``regression``: an MLP standing in for the paper's QM9 network (128 inputs, hidden
  256-256, d = 64), b = 120, 11 regression targets; ``regression-wide`` the same with 512
  inputs and hidden 1024-1024, whose step costs more like a message-passing network's;
* ``digits-mixed``: the default MLP on 8×8 digits (d = 64), b = 64, one task of each type
  (regression, binary, 10 classes), for reference.

It also times the per-epoch prior (``end_epoch``) on N = 45,000 synthetic samples for the
first two shapes: one pass of the extractor over the training split, then the streamed
regression posterior, or the Laplace posterior of 20 binary heads around the current heads.

    python benchmarks/bayesagg_step.py --json benchmarks/results/bayesagg_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vmtl_step import _iqr

from pyromtl import config, methods
from pyromtl.data.core import MultiTaskData
from pyromtl.objective import TrainContext
from pyromtl.runspec import RunSpec


@dataclass(frozen=True)
class Shape:
    name: str
    input_shape: tuple[int, ...]
    task_types: tuple[str, ...]
    batch: int
    latent_dim: int
    hidden: tuple[int, ...] = (256,)
    options: tuple[tuple[str, Any], ...] = ()


def synthetic(shape: Shape, n: int, seed: int = 0) -> MultiTaskData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape.input_shape)).astype(np.float32)
    y = {}
    for t, kind in enumerate(shape.task_types):
        y[f"t{t}"] = (
            rng.normal(size=n) if kind == "regression" else rng.integers(0, 10 if kind == "classification" else 2, n)
        )
    return MultiTaskData.from_arrays(x, y, list(shape.task_types), name=shape.name)


def setup(shape: Shape, options: dict[str, Any], device: str | torch.device = "cpu", n: int = 0):
    device = torch.device(device)
    data = synthetic(shape, n=n or max(4 * shape.batch, 512))
    method = methods.get("bayesagg")
    cfg = config.resolve(
        method,
        {
            "device": str(device),
            "latent_dim": shape.latent_dim,
            "hidden": list(shape.hidden),
            "pretrain_steps": 0,
            **dict(shape.options),
            **options,
        },
        data=data,
    )
    ctx = RunSpec.build(method, cfg, data).context()
    model, guide = method.build(ctx)
    objective = method.objective(ctx.replace(model=model, guide=guide))
    gen = torch.Generator().manual_seed(0)
    batches = [data.train_batch(shape.batch, gen, device) for _ in range(8)]
    # one finished epoch, so the steps run under the full-data prior as in training
    objective.end_epoch(TrainContext(data, cfg, device, gen))
    optim = torch.optim.Adam(objective.parameters(), lr=1e-3, foreach=True)
    return data, cfg, model, objective, optim, batches


def timed_steps(objective, optim, batches, steps: int, aggregated: bool) -> float:
    """Seconds per step (forward, backward, Adam): BayesAgg's ``backward``, or LS's ``loss.backward()``.

    On CUDA the clock reads after the device has finished the queued work."""
    cuda = batches[0].y.is_cuda
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        batch = batches[i % len(batches)]
        optim.zero_grad(set_to_none=True)
        if aggregated:
            objective.backward(batch)
        else:
            objective(batch).backward()
        optim.step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def step_ratio(
    shape: Shape, options: dict[str, Any], steps: int, warmup: int, rounds: int, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """LS and BayesAgg steps of ``shape`` in turns (on ``device``: ``benchmarks/gpu.py`` passes CUDA)."""
    _, _, _, objective, optim, batches = setup(shape, options, device)
    times: dict[str, list[float]] = {"ls": [], "bayesagg": []}
    for aggregated in (False, True):
        timed_steps(objective, optim, batches, warmup, aggregated)
    for _ in range(rounds):
        times["ls"].append(timed_steps(objective, optim, batches, steps, False))
        times["bayesagg"].append(timed_steps(objective, optim, batches, steps, True))
    # a ratio per round compares steps timed moments apart; their median resists load that drifts
    ratios = [ba / ls for ls, ba in zip(times["ls"], times["bayesagg"])]
    # the median leaves out the rare rounds with a periodic cost (e.g. summing waiting statistics);
    # the ratio of the summed times keeps them
    return {
        "ls_ms": 1e3 * statistics.median(times["ls"]),
        "bayesagg_ms": 1e3 * statistics.median(times["bayesagg"]),
        "ratio": statistics.median(ratios),
        "ratio_iqr": _iqr(ratios),
        "ratio_of_totals": sum(times["bayesagg"]) / sum(times["ls"]),
    }


def epoch_prior(shape: Shape, n: int) -> float:
    """Seconds of ``end_epoch`` on ``n`` synthetic samples (its pass covers their training split)."""
    data, cfg, _model, objective, _, _ = setup(shape, {}, n=n)
    gen = torch.Generator().manual_seed(1)
    begin = time.perf_counter()
    objective.end_epoch(TrainContext(data, cfg, torch.device("cpu"), gen))
    return time.perf_counter() - begin


SHAPES = {
    # the CNN earlier versions of this script wrote by hand: conv blocks 32/64/64, then Linear to d and ReLU
    "cifar-mtl": Shape(
        "cifar-mtl",
        (3, 32, 32),
        ("binary",) * 20,
        128,
        160,
        hidden=(),
        options=(("backbone", "cnn"), ("conv_channels", [32, 64, 64]), ("activation", "relu")),
    ),
    "regression": Shape("regression", (128,), ("regression",) * 11, 120, 64, hidden=(256, 256)),
    "regression-wide": Shape("regression-wide", (512,), ("regression",) * 11, 120, 64, hidden=(1024, 1024)),
    "digits-mixed": Shape("digits-mixed", (64,), ("regression", "binary", "classification"), 64, 64),
}
ROWS = [
    ("cifar-mtl", {}),
    ("cifar-mtl", {"moments": "monte_carlo", "num_samples": 1024}),
    ("regression", {}),
    ("regression-wide", {}),
    ("digits-mixed", {}),
]


def variant(options: dict[str, Any]) -> str:
    """The row's label: the classification moments and J."""
    label = options.get("moments", "quadrature")
    if "num_samples" in options:
        label += f", J = {options['num_samples']}"
    return label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epoch-n", type=int, default=45_000)
    parser.add_argument(
        "--shapes",
        nargs="+",
        choices=list(SHAPES),
        default=list(SHAPES),
        help="time only these shapes (the per-epoch prior runs with cifar-mtl and regression)",
    )
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pyro.settings.set(module_local_params=True)
    rows = [(name, options) for name, options in ROWS if name in args.shapes]
    results: dict[str, Any] = {
        "threads": args.threads,
        "torch": torch.__version__,
        "steps": args.steps,
        "rounds": args.rounds,
        "step": [],
        "epoch_prior": [],
    }
    print(
        "| shape | variant | LS ms | BayesAgg ms | ratio | IQR over rounds | ratio of totals |\n"
        "|---|---|---|---|---|---|---|"
    )
    for name, options in rows:
        r = step_ratio(SHAPES[name], options, args.steps, args.warmup, args.rounds)
        label = variant(options)
        results["step"].append({"shape": name, "variant": label, **r})
        print(
            f"| {name} | {label} | {r['ls_ms']:.1f} | {r['bayesagg_ms']:.1f} | {r['ratio']:.2f} | "
            f"{r['ratio_iqr'][0]:.2f}–{r['ratio_iqr'][1]:.2f} | {r['ratio_of_totals']:.2f} |",
            flush=True,
        )
    print("\n| shape | N | end_epoch s |\n|---|---|---|")
    for name in ("cifar-mtl", "regression"):
        if name not in args.shapes:
            continue
        seconds = epoch_prior(SHAPES[name], args.epoch_n)
        results["epoch_prior"].append({"shape": name, "n": args.epoch_n, "seconds": seconds})
        print(f"| {name} | {args.epoch_n} | {seconds:.3f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
