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

Every row also gets its FLOPs (``torch.utils.flop_counter.FlopCounterMode`` over one step or
one inference call: convolutions and matrix products, forward and backward; element-wise work
is not counted) and their ratio against dmtl, so that a time ratio can be read against the
work each variant must do.

Shapes: ``conflict`` is ``digits-conflict`` (T=4, 64-d inputs, batch 64) with the default
network (hidden [256], latent 64); ``wide`` is random SIMO data, T=8 binary tasks, 1024-d
inputs, hidden [1024], latent 256, batch 256. ``cityscapes`` is the paper's dense setting
(T=2: 7-class segmentation and depth, random images 3×128×256, batch 4) with plain-torch
models built from the library's SMTL parts and a conv stand-in for Deeplab-ResNet-50, whose
encoder/decoder split of FLOPs it matches (``smtl_dense_parts.py``); there the baseline row is
``dmtl``, the training steps use ``torch.optim.Adam``, ``pruned`` is built from the chosen
parts (``Fit.export_pruned`` takes a fitted vector model), ``stl (loop)`` and ``smtl (loop)`` run
the private encoders in a Python loop instead of ``torch.vmap``, and the result also holds the FLOP
model of the real Deeplab-ResNet-50 at that shape (``flop_model``).

    python benchmarks/smtl_step.py --threads 1 --shapes conflict,wide,cityscapes --json benchmarks/results/smtl_cpu.json
"""

from __future__ import annotations

import argparse
import copy
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
import smtl_dense_parts as dense
from vmtl_step import objective_step

from pyromtl import datasets, methods
from pyromtl.config import resolve
from pyromtl.data.core import MultiTaskData
from pyromtl.models.smtl import prune
from pyromtl.runspec import RunSpec
from pyromtl.train import build_training

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
    cfg = resolve(m, {**opts, "device": str(device), "quiet": True}, data=data)
    objective, optim = build_training(RunSpec.build(m, cfg, data))
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


def gflop(fn, arg) -> float:
    return dense.flops(fn, arg) / 1e9


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bench_shape(shape: str, args, device: torch.device) -> dict:
    if shape == "cityscapes":
        return bench_dense(shape, args, device)
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
        train_gf = {k: gflop(step, batches[0]) for k, step in train_steps.items()}
        with torch.no_grad():
            infer_gf = {k: gflop(fn, x) for k, fn in infer.items()}
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
    return summary(
        shape,
        T,
        opts["batch_size"],
        device,
        "bmtl",
        train_ms,
        infer_ms,
        train_gf,
        infer_gf,
        params,
        args.steps * args.rounds,
    )


def summary(
    shape: str,
    T: int,
    batch: int,
    device: torch.device,
    base: str,
    train_ms: dict,
    infer_ms: dict,
    train_gf: dict,
    infer_gf: dict,
    params: dict,
    timed_steps: int,
) -> dict:
    """Medians, ratios against ``base`` (time and FLOPs) and the row ``stl + base`` (the compute floor of SMTL)."""
    med = {k: statistics.median(v) for k, v in train_ms.items()}
    floor = f"stl + {base}"
    med[floor] = med["stl"] + med[base]
    train_gf = {**train_gf, floor: train_gf["stl"] + train_gf[base]}
    imed = {k: statistics.median(v) for k, v in infer_ms.items()}
    return {
        "shape": shape,
        "tasks": T,
        "batch": batch,
        "device": device.type,
        "train_ms": med,
        "train_ratio_vs_dmtl": {k: v / med[base] for k, v in med.items()},
        "train_gflop": train_gf,
        "train_flop_ratio_vs_dmtl": {k: v / train_gf[base] for k, v in train_gf.items()},
        "infer_ms": imed,
        "infer_ratio_vs_dmtl": {k: v / imed["dmtl"] for k, v in imed.items()},
        "infer_gflop": infer_gf,
        "infer_flop_ratio_vs_dmtl": {k: v / infer_gf["dmtl"] for k, v in infer_gf.items()},
        "params": params,
        "timed_steps": timed_steps,
    }


def bench_dense(shape: str, args, device: torch.device) -> dict:
    """The ``cityscapes`` shape: :mod:`smtl_dense_parts`' plain-torch variants, timed as the vector shapes are."""
    batch_size = args.dense_batch
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    batches = [
        tuple(
            t.to(device) if torch.is_tensor(t) else [u.to(device) for u in t]
            for t in dense.random_batch(batch_size, gen)
        )
        for _ in range(2)
    ]
    x = dense.random_batch(batch_size, gen)[0].to(device)
    T = len(dense.TASKS)
    gate_logit = torch.tensor([1.0 if t % 2 == 0 else -1.0 for t in range(T)], device=device)  # even tasks public

    train_steps, infer, params = {}, {}, {}
    for name in dense.DENSE_VARIANTS:
        model = dense.DenseVariant(name).to(device)
        train_steps[name] = dense.train_step(model, torch.optim.Adam(model.parameters(), lr=1e-3))
        if name == "dmtl":
            infer["dmtl"] = model
            params["dmtl"] = count(model)
        if model.lite:
            with torch.no_grad():
                model.gate_logit.copy_(gate_logit)
            gated = copy.deepcopy(model).eval()
            pruned = dense.PrunedDense(gated, (gate_logit > 0).float()).eval()
            with torch.no_grad():  # the pruned network gives the gated one's outputs
                for a, b in zip(gated(x), pruned(x)):
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            infer[f"{name} gated"], infer[f"{name} pruned"], infer[f"{name} chosen"] = gated, pruned, pruned.encoders
            params[f"{name} gated"] = count(gated) - T
            params[f"{name} pruned"] = count(pruned)
            params[f"{name} chosen"] = count(pruned) - sum(count(h) for h in (*pruned.heads, *pruned.public_heads))

    for name in ("stl", "smtl"):  # the private encoders as separate modules in a Python loop instead of vmap
        model = dense.DenseVariant(name, loop=True).to(device)
        train_steps[f"{name} (loop)"] = dense.train_step(model, torch.optim.Adam(model.parameters(), lr=1e-3))

    train_gf = {k: gflop(step, batches[0]) for k, step in train_steps.items()}
    with torch.no_grad():
        infer_gf = {k: gflop(fn, x) for k, fn in infer.items()}
    steps = args.dense_steps
    train_ms = {k: [] for k in train_steps}
    infer_ms = {k: [] for k in infer}
    for r in range(args.rounds):  # interleaved, as for the vector shapes
        for key, step in train_steps.items():
            for i in range(args.warmup if r == 0 else 1):
                step(batches[i % len(batches)])
            for i in range(steps):
                train_ms[key] += timed(step, batches[i % len(batches)], 1, device)
        with torch.no_grad():
            for key, fn in infer.items():
                timed(fn, x, 1, device)
                infer_ms[key] += timed(fn, x, steps, device)
    res = summary(
        shape, T, batch_size, device, "dmtl", train_ms, infer_ms, train_gf, infer_gf, params, steps * args.rounds
    )
    res["flop_model"] = dense.paper_flops(batch_size)
    return res


def table(res: dict) -> str:
    lines = [
        f"### {res['shape']} (T={res['tasks']}, batch {res['batch']}, {res['device']}, "
        f"{res['timed_steps']} timed steps per row)",
        "",
        "| train step | ms | × dmtl | GFLOP | FLOPs × dmtl |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {k} | {v:.3f} | {res['train_ratio_vs_dmtl'][k]:.2f} | {res['train_gflop'][k]:.4g} | "
        f"{res['train_flop_ratio_vs_dmtl'][k]:.2f} |"
        for k, v in res["train_ms"].items()
    ]
    lines += ["", "| inference | ms | × dmtl | GFLOP | FLOPs × dmtl | parameters |", "|---|---:|---:|---:|---:|---:|"]
    lines += [
        f"| {k} | {v:.3f} | {res['infer_ratio_vs_dmtl'][k]:.2f} | {res['infer_gflop'][k]:.4g} | "
        f"{res['infer_flop_ratio_vs_dmtl'][k]:.2f} | {res['params'].get(k, '')} |"
        for k, v in res["infer_ms"].items()
    ]
    for arch, m in res.get("flop_model", {}).items():
        lines += [
            "",
            f"FLOP model of {arch} (encoder {m['encoder_share_of_dmtl_forward']:.0%} of dmtl's forward): "
            + ", ".join(
                f"{k} {v:.2f}×"
                for k, v in {**m["train_ratio_vs_dmtl"], **m["infer_ratio_vs_dmtl"]}.items()
                if k != "dmtl"
            ),
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", default="conflict,wide")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dense-steps", type=int, default=5, help="timed steps per round at the cityscapes shape")
    p.add_argument("--dense-batch", type=int, default=4, help="batch size at the cityscapes shape")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    results = [bench_shape(s, args, device) for s in args.shapes.split(",")]
    for res in results:
        print(table(res) + "\n")
    if args.json:
        doc = {
            "torch": torch.__version__,
            "pyro": pyro.__version__,
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "results": results,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
