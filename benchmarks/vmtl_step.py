"""Time one VMTL training step (forward + backward + optimiser step of the SVI loss).

Shapes (``--shapes``, comma-separated):

* ``clusters-T``: ``synthetic-clusters`` with T MIMO tasks (16-d inputs, 4 classes, 72 training
  samples per task), the method's default network (latent 64, hidden [256]) and batch 64;
* ``office-home``: Office-Home's shape with random features: T=4 tasks, C=65 classes, 4096-d
  inputs, latent d=512, 4 samples per class per task (260 per task, full batch).

For every shape the same run times pyromtl's step (``methods.get("vmtl")``, its ELBO module
under ``module_local_params``, validation off, as ``pyromtl.train`` runs it) and the hand-written
PyTorch loss of ``plain_vmtl.py`` with identical sizes and optimiser, and reports the median step
time of each and their ratio. The same model and guide under Pyro's stock
``TraceMeanField_ELBO`` are timed as a third row, against the method's ``MeanFieldELBO``.
L x M = 10 x 10 Monte-Carlo draws unless ``--mc`` says otherwise, and the method's
``z_components`` (k other tasks' z-prior components per sample, all T-1 when k >= T-1) unless
``--z-components`` says otherwise; the plain loss uses the same k and the same estimator.
``--check`` first verifies that both implementations give the same loss and gradients, on the
exact z prior (T=4) and on the sampled one (T=16).

    python benchmarks/vmtl_step.py --device cpu --threads 1 --check --steps 6 --rounds 6
    python benchmarks/vmtl_step.py --device cuda --check --json cuda.json

See benchmarks/README.md for results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_vmtl import PlainVMTL, precompute_attention
from pyro.infer import TraceMeanField_ELBO

from pyromtl import datasets, methods
from pyromtl.config import resolve
from pyromtl.data.core import MultiTaskData
from pyromtl.runspec import RunSpec
from pyromtl.schedules import (
    TrainState,
    as_schedule,
)

#: The step timed, and the run's length: the KL weight is 1 and the temperature at its floor.
STEP = 100_000


# ------------------------------------------------------------------------------------ shapes
def office_home_data(num_tasks=4, num_classes=65, dim=4096, per_class=4, seed=0) -> MultiTaskData:
    """Random features with Office-Home's sizes; the training split is ``per_class`` rows per class."""
    rng = np.random.default_rng(seed)
    n_train, n_rest = per_class * num_classes, num_classes  # plus one val and one test row per class
    xs, ys, train, val, test = [], [], [], [], []
    for _ in range(num_tasks):
        y = np.concatenate(
            [np.repeat(np.arange(num_classes), per_class), np.arange(num_classes), np.arange(num_classes)]
        )
        xs.append(rng.normal(size=(len(y), dim)).astype(np.float32))
        ys.append(y)
        train.append(np.arange(n_train))
        val.append(np.arange(n_train, n_train + n_rest))
        test.append(np.arange(n_train + n_rest, n_train + 2 * n_rest))
    return MultiTaskData.from_arrays(
        xs, ys, "classification", splits={"train": train, "val": val, "test": test}, name="office-home-shape"
    )


def make_shape(name: str, hidden: list[int] | None):
    """``(data, options)`` of one named shape."""
    if name == "office-home":
        opts = {"latent_dim": 512, "hidden": hidden or [512], "batch_size": 260}
        return office_home_data(), opts
    if name.startswith("clusters-"):
        T = int(name.split("-", 1)[1])
        opts = {"batch_size": 64}
        if hidden:
            opts["hidden"] = hidden
        return datasets.load("synthetic-clusters", num_tasks=T), opts
    raise SystemExit(f"unknown shape {name!r}: use clusters-T or office-home")


# ------------------------------------------------------------------------------------ the two steps
def make_optimizer(params, kind: str, lr: float):
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, foreach=True)
    from pyromtl.optim import ClippedAdam

    return ClippedAdam(params, lr=lr, clip_norm=10.0)


def build_ours(data, cfg, device, optim_kind, elbo=None):
    """pyromtl's loss module and optimiser, built the way ``pyromtl.train`` builds them.

    ``elbo``: an ELBO class to use instead of the method's own (same constructor arguments).
    """
    method = methods.get("vmtl")
    state = TrainState(total_steps=STEP)
    ctx = RunSpec.build(method, cfg, data).context(state)
    model, guide = method.build(ctx)
    if elbo is None:
        loss_fn = method.elbo(ctx)(model, guide)
    else:
        n = cfg["num_particles"]
        loss_fn = elbo(num_particles=n, vectorize_particles=n > 1, max_plate_nesting=method.max_plate_nesting)(
            model, guide
        )
    state.step = STEP
    loss_fn(data.train_batch(cfg["batch_size"], torch.Generator().manual_seed(1), device))  # creates lazy params
    optim = make_optimizer(list(loss_fn.parameters()), optim_kind, cfg["lr"])
    return loss_fn, optim, (model, guide)


def build_plain(data, cfg, device, optim_kind):
    pad = data.padded("train", torch.device("cpu"))
    T = data.num_tasks
    x = pad.x.reshape(T, pad.x.shape[1], -1)
    attended = precompute_attention(x, pad.y.long(), pad.n)
    info = data.info
    plain = PlainVMTL(
        T,
        info.out_dim,
        info.input_dim,
        cfg["hidden"],
        cfg["latent_dim"],
        attended,
        info.class_mask,
        mc_z=cfg["mc_z"],
        mc_w=cfg["mc_w"],
        z_components=cfg["z_components"],
        min_scale=cfg["z_component_min_scale"],
    ).to(device)
    optim = make_optimizer(list(plain.parameters()), optim_kind, cfg["lr"])
    return plain, optim


def schedules(cfg):
    """Temperature and the KL weights of w and z at ``STEP`` (annealed weight times the site's weight)."""
    tau = float(as_schedule(cfg["priors"]["z"]["temperature"])(STEP, STEP))
    weight = float(as_schedule(cfg["kl_weight"])(STEP, STEP))
    return tau, weight * cfg["kl_weights"]["w"], weight * cfg["kl_weights"]["z"]


def time_steps(step, batches, warmup: int, steps: int, device) -> list[float]:
    """Per-step wall times in ms (synchronised on CUDA), after ``warmup`` untimed steps."""
    cuda = device.type == "cuda"
    times = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step(batch)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def bench_shape(name: str, args, device) -> dict:
    data, opts = make_shape(name, args.hidden)
    L, M = args.mc
    method = methods.get("vmtl")
    extra = {} if args.z_components is None else {"z_components": args.z_components}
    cfg = resolve(method, {**opts, **extra, "mc_z": L, "mc_w": M, "device": str(device), "quiet": True}, data=data)
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    gen = torch.Generator().manual_seed(0)
    batches = [data.train_batch(cfg["batch_size"], gen, device) for _ in range(4)]
    tau, kl_w, kl_z = schedules(cfg)

    steps = {}
    with pyro.settings.context(module_local_params=True):
        loss_fn, optim, _ = build_ours(data, cfg, device, args.optim)
        steps["ours"] = _svi_step(loss_fn, optim)
        stock_fn, stock_optim, _ = build_ours(data, cfg, device, args.optim, elbo=TraceMeanField_ELBO)
        steps["ours_stock"] = _svi_step(stock_fn, stock_optim)
    plain, plain_optim = build_plain(data, cfg, device, args.optim)

    def plain_step(batch):
        loss = plain(batch.x, batch.y, batch.mask, batch.scale, batch.index, tau, kl_w, kl_z)
        plain_optim.zero_grad(set_to_none=True)
        loss.backward()
        plain_optim.step()

    steps["plain"] = plain_step
    results = {}
    times = {k: [] for k in steps}
    with pyro.settings.context(module_local_params=True), pyro.validation_enabled(False):
        # interleave rounds so drift (clocks, other load) hits every implementation alike
        per_round = max(1, math.ceil(args.steps / args.rounds))
        for r in range(args.rounds):
            for key, step in steps.items():
                times[key] += time_steps(step, batches, args.warmup if r == 0 else 2, per_round, device)
        if args.profile:
            results["profile"] = profile(steps, batches, device, args.profile, name)
    info = data.info
    results.update(
        {
            "shape": name,
            "tasks": data.num_tasks,
            "classes": info.out_dim,
            "input_dim": info.input_dim,
            "latent_dim": cfg["latent_dim"],
            "hidden": cfg["hidden"],
            "batch_per_task": batches[0].size,
            "mc_z": L,
            "mc_w": M,
            "z_components": min(cfg["z_components"], data.num_tasks - 1),
            "optimizer": args.optim,
            "elbo": type(loss_fn.elbo).__name__,
            "steps": len(times["plain"]),
        }
    )
    plain_ms = statistics.median(times["plain"])
    for key, ts in times.items():
        results[f"{key}_ms"] = statistics.median(ts)
        results[f"{key}_ms_iqr"] = _iqr(ts)
        if key != "plain":
            results["ratio" if key == "ours" else f"ratio_{key.removeprefix('ours_')}"] = (
                statistics.median(ts) / plain_ms
            )
    return results


def _svi_step(loss_fn, optim):
    def step(batch):
        loss = loss_fn(batch)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()

    return step


def objective_step(objective, optim):
    """One trainer step of a method's objective (``pyromtl.train.build_training`` builds both)."""

    def step(batch):
        optim.zero_grad(set_to_none=True)
        objective.backward(batch)
        optim.step()

    return step


def _iqr(values: list[float]) -> list[float]:
    q = np.percentile(values, [25, 75])
    return [float(q[0]), float(q[1])]


def profile(steps: dict, batches, device, out_dir: str, name: str) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sort = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    files = {}
    for label, step in steps.items():
        for b in batches[:2]:
            step(b)
        with tprofile(activities=acts) as prof:
            for i in range(5):
                step(batches[i % len(batches)])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        path = out / f"profile_{name}_{label}.txt"
        path.write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
        files[label] = str(path)
    return files


# ------------------------------------------------------------------------------------ equivalence
def check(device, num_tasks: int = 4) -> dict:
    """Same parameters and seed: pyromtl's loss and gradients must match the plain ones.

    ``num_tasks = 4`` evaluates every other task's z component (the exact bound), 16 a random
    subset of ``z_components = 8`` of them (the sampled estimate). Returns the relative gap of
    the losses and the largest relative gap of any gradient.
    """
    data = datasets.load("synthetic-clusters", num_tasks=num_tasks)
    method = methods.get("vmtl")
    cfg = resolve(method, {"batch_size": 64, "device": str(device), "quiet": True}, data=data)
    torch.manual_seed(0)
    with pyro.settings.context(module_local_params=True):
        loss_fn, _, (model, _guide) = build_ours(data, cfg, device, "adam")
        plain, _ = build_plain(data, cfg, device, "adam")
        linear = [m for m in model.encoder.net if isinstance(m, torch.nn.Linear)]
        pairs = [
            (mine, theirs)
            for a, b in zip([m for m in plain.encoder if isinstance(m, torch.nn.Linear)], linear)
            for mine, theirs in ((a.weight, b.weight), (a.bias, b.bias))
        ]
        pairs += [
            (plain.w_loc, model.w_post.loc),
            (plain.w_raw_scale, model.w_post.raw_scale),
            (plain.bias, model.bias_unconstrained),
            (plain.logits_w, model.w_prior.params["logits"]),
            (plain.logits_z, model.z_prior.params["logits"]),
        ]
        with torch.no_grad():
            for mine, theirs in pairs:
                mine.copy_(theirs)
        attn_gap = float((plain.attended.to(device) - model.attention.attended).abs().max())
        assert attn_gap < 1e-4, f"precomputed attention differs by {attn_gap}"
        batch = data.train_batch(cfg["batch_size"], torch.Generator().manual_seed(3), device)
        tau, kl_w, kl_z = schedules(cfg)
        with pyro.validation_enabled(True):
            torch.manual_seed(7)
            ours = loss_fn(batch)
        torch.manual_seed(7)
        ref = plain(batch.x, batch.y, batch.mask, batch.scale, batch.index, tau, kl_w, kl_z)
        ours.backward()
        ref.backward()
    gap = abs(float(ours.detach()) - float(ref.detach())) / abs(float(ref.detach()))
    grad_gap = max(
        float((mine.grad - theirs.grad).abs().max() / theirs.grad.abs().max().clamp(min=1e-12))
        for mine, theirs in pairs
    )
    print(
        f"check T={num_tasks}: pyromtl loss {float(ours.detach()):.6f}, plain loss {float(ref.detach()):.6f}, "
        f"relative gap {gap:.2e}; "
        f"largest relative gradient gap {grad_gap:.2e}"
    )
    assert gap < 1e-4 and grad_gap < 1e-3, "the two implementations disagree"
    return {"loss_relative_gap": gap, "grad_relative_gap": grad_gap}


# ------------------------------------------------------------------------------------ CLI
def environment(device) -> dict:
    env = {
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    else:
        env["cpu"] = _cpu_model()
        env["cpu_count"] = os.cpu_count()
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per implementation (default 100 CUDA, 10 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 20 CUDA, 3 CPU)")
    p.add_argument(
        "--rounds", type=int, default=None, help="alternate ours/plain this many times (default 5 CUDA, 1 CPU)"
    )
    p.add_argument("--shapes", default="clusters-4,clusters-8,clusters-16,clusters-32,office-home")
    p.add_argument("--mc", default="10x10", help="L x M Monte-Carlo draws of z and w (default 10x10)")
    p.add_argument(
        "--z-components",
        type=int,
        default=None,
        metavar="K",
        help="z prior components per sample (default: the method's, 8); K >= T-1 is the exact bound",
    )
    p.add_argument("--hidden", default=None, help="encoder hidden sizes, e.g. 512 or 1024,512 (default: per shape)")
    p.add_argument(
        "--optim",
        choices=("adam", "clipped"),
        default="adam",
        help="torch.optim.Adam(foreach=True), or the ClippedAdam pyromtl.train uses (pyromtl.optim; both sides)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--check", action="store_true", help="first check that both losses agree on one batch")
    p.add_argument("--profile", default=None, metavar="DIR", help="also write torch.profiler tables to DIR")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    cuda = device.type == "cuda"
    args.steps = args.steps or (100 if cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (20 if cuda else 3)
    args.rounds = args.rounds or (5 if cuda else 1)
    args.mc = tuple(int(v) for v in args.mc.lower().split("x"))
    args.hidden = [int(v) for v in args.hidden.split(",")] if args.hidden else None

    env = environment(device)
    print(json.dumps(env))
    out = {"environment": env, "results": []}
    if args.check:
        out["check"] = {f"T={T}": check(device, T) for T in (4, 16)}
    for name in args.shapes.split(","):
        r = bench_shape(name.strip(), args, device)
        out["results"].append(r)
        line = (
            f"{r['shape']:>12}  T={r['tasks']:<3} B={r['batch_per_task']:<4} K={r['classes']:<3} D={r['input_dim']:<5} "
            f"d={r['latent_dim']:<4} LxM={r['mc_z']}x{r['mc_w']} k={r['z_components']:<2}  "
            f"plain {r['plain_ms']:8.2f} ms  "
            f"ours ({r['elbo']}) {r['ours_ms']:8.2f} ms = {r['ratio']:.2f}x"
        )
        line += f"  ours (TraceMeanField_ELBO) {r['ours_stock_ms']:8.2f} ms = {r['ratio_stock']:.2f}x"
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
