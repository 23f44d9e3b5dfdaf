"""The SVI loop: seeds, devices, ClippedAdam, annealing, model selection on val, checkpoints.

One step draws a task-stacked batch, lets the method's objective (``Method.objective``, by
default the ELBO and ``backward()``, see :mod:`pyromtl.objective`) set the gradients, and takes
an optimiser step; the objective's hooks run after each step and at each epoch's end. Every
``eval_every`` steps the validation split is scored and the best state kept (model selection
uses val, never test, and by default only states at the method's full objective: once every
schedule, such as a KL warm-up or a temperature decay, holds its final value). Every
``checkpoint_every`` steps the whole state (the objective's, the optimiser's, the RNGs) is
written atomically, so an interrupted run resumed from its checkpoint ends exactly where an
uninterrupted one would.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from tqdm.auto import tqdm

from pyromtl import config, metrics
from pyromtl.collective import Group, node_rank, world_size
from pyromtl.distributed import launch
from pyromtl.errors import TrainingError, TrainingInterrupted
from pyromtl.evaluation import predict_split, score_prediction
from pyromtl.method import Method
from pyromtl.objective import Objective, TrainContext
from pyromtl.optim import ClippedAdam
from pyromtl.params import local_params
from pyromtl.predict import evaluating
from pyromtl.rundir import RunDir
from pyromtl.runspec import RunSpec
from pyromtl.schedules import TrainState


@dataclass
class TrainResult:
    objective: Objective
    state: TrainState
    steps: int
    seconds: float
    final_loss: float
    best_step: int
    best_score: float
    history: list[dict[str, float]] = field(default_factory=list)
    #: The kept state's step and every schedule's value there (KL weights, temperatures).
    selected: dict[str, Any] = field(default_factory=dict)


def warmup_steps(method: Method, cfg: Mapping[str, Any], n_steps: int) -> int:
    """The first step at which every schedule of the run holds its final value (capped at the run's end)."""
    settled = [s.settled(n_steps) for s in config.schedules(method, cfg).values()]
    return int(min(n_steps, max(settled, default=0)))


def schedule_values(method: Method, cfg: Mapping[str, Any], step: int, n_steps: int) -> dict[str, Any]:
    """``{"step": step, path: value}`` for every schedule of the run; per-site KL weights too, if the
    method has ``kl_weights`` (each is the annealed ``kl_weight`` times the site's own)."""
    values: dict[str, Any] = {"step": step}
    values.update({path: s(step, n_steps) for path, s in config.schedules(method, cfg).items()})
    if isinstance(cfg.get("kl_weights"), dict) and "kl_weight" in values:
        values["kl_weights"] = {site: values["kl_weight"] * w for site, w in cfg["kl_weights"].items()}
    return values


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "data": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _interrupted(run: RunDir | None, step: int, updating: bool, snapshot, checkpoint) -> str:
    """Save what can be resumed exactly after Ctrl-C at ``step``, and say what a rerun will do.

    Before a step's update nothing but the RNGs has moved, so the state at the step's start is
    saved. During an update (optimiser step, hooks, validation) it is not consistent, so the
    last periodic checkpoint stands.
    """
    if run is None:
        return f"interrupted at step {step}; nothing was saved (no run directory)"
    if not updating and snapshot is not None:
        checkpoint(step, snapshot)
        return f"interrupted at step {step}; saved a checkpoint there, and the same command resumes from it"
    if run.has_checkpoint():
        kept = run.read_checkpoint()["step"]
        return f"interrupted at step {step}; the same command resumes from the checkpoint of step {kept}"
    return f"interrupted at step {step} before any checkpoint was written; the same command starts over"


def validation_score(spec: RunSpec, model, guide, seed: int) -> float:
    """Higher-is-better score of the val split (mean accuracy, or -NMSE for regression).

    Draws use their own seeded RNG so evaluating never shifts the training random stream.
    """
    device = spec.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        sp = predict_split(
            model,
            guide,
            spec.data,
            "val",
            num_samples=spec.config["eval_samples"],
            max_plate_nesting=spec.method.max_plate_nesting,
            device=device,
        )
    tasks = score_prediction(spec.data, sp)["tasks"]
    return metrics.selection_score(tasks, spec.data.task_types)


def build_objective(spec: RunSpec, state: TrainState) -> Objective:
    """The run's model, guide and objective, with every lazily created parameter made.

    Parameters of priors and guides may be created on first use, so the objective runs once on
    a batch (with the RNGs restored after it). Validation is off as in the loop: a non-finite
    loss is reported as such (:class:`TrainingError`), not as a distribution's argument check.
    Call it with module-local parameters on.
    """
    cfg, data, device = spec.config, spec.data, spec.device
    ctx = spec.context(state)
    try:
        model, guide = spec.method.build(ctx)
    except (RuntimeError, MemoryError) as err:  # torch's OutOfMemoryError is a RuntimeError
        if not isinstance(err, MemoryError) and "alloc" not in str(err) and "out of memory" not in str(err):
            raise
        raise ValueError(
            f"the networks of {cfg['method']} do not fit in memory ({' '.join(str(err).split())[:160]}); "
            "ask for smaller sizes (hidden, latent_dim, conv_channels, ...)"
        ) from None
    objective = spec.method.objective(ctx.replace(model=model, guide=guide))
    generator = torch.Generator().manual_seed(int(cfg["seed"]))
    # the pass leaves no trace: the RNGs are forked, and in eval mode no buffer (BatchNorm's
    # statistics) moves
    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        pyro.validation_enabled(False),
        evaluating(objective),
    ):
        first = float(objective(data.train_batch(cfg["batch_size"], generator, device)).detach())
    if not math.isfinite(first):
        raise TrainingError(
            f"loss is {first} before the first step of {cfg['method']} on {data.name}; check the "
            "inputs' scale (standardise them) and the priors; training did not start"
        )
    return objective


def build_training(spec: RunSpec, state: TrainState | None = None) -> tuple[Objective, ClippedAdam]:
    """The objective (:func:`build_objective`) and optimiser of a run, as the trainer builds them
    (benchmarks time them). ``state`` defaults to a fresh one of the run's length."""
    cfg = spec.config
    objective = build_objective(spec, state if state is not None else TrainState(total_steps=spec.total_steps))
    optim = ClippedAdam(
        objective.trainable_parameters(),
        lr=cfg["lr"],
        clip_norm=cfg["clip_norm"],
        lrd=cfg["lr_decay"],
        weight_decay=cfg["weight_decay"],
    )
    return objective, optim


@local_params
def train(
    spec: RunSpec, *, callback: Callable[[int, float], None] | None = None, group: Group | None = None
) -> TrainResult:
    """Fit ``spec.method`` on ``spec.data`` by SVI; resume from ``spec.checkpoint`` when it has one,
    and checkpoint into ``spec.run`` when it has one.

    ``callback(step, loss)`` runs after every step (tests use it to interrupt a run). A run on
    several processes (``devices × num_nodes > 1``) is launched here (:mod:`pyromtl.distributed`);
    each of its processes runs this loop with its ``group``, on its shard of every global batch,
    and only rank 0 validates and keeps the selected state.
    """
    if group is None and world_size(spec.config) > 1:
        if callback is not None:
            raise ValueError("a callback runs in the training process: train on one device (devices = 1)")
        if not spec.trained:
            return _from_workers(spec, launch(spec, train))
        if node_rank() > 0:  # trained to its end: the machine with NODE_RANK 0 finishes the run alone
            raise SystemExit(0)
    method, data, cfg, device, run = spec.method, spec.data, spec.config, spec.device, spec.run
    seed = int(cfg["seed"])
    pyro.set_rng_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n_steps = spec.total_steps
    state = TrainState(total_steps=n_steps)
    objective, optim = build_training(spec, state)
    objective.group = group
    model, guide = objective.model, objective.guide
    # validation (and so model selection) runs on rank 0 alone
    has_val = all(n > 0 for n in data.split_sizes("val")) and (group is None or group.leader)
    per_epoch = spec.steps_per_epoch
    # states model selection may keep: from the full objective on, every state, or the last one
    first_kept = {"after_warmup": warmup_steps(method, cfg, n_steps), "all": 0, "last": n_steps}[cfg["select"]]

    start, history, seconds, loss_val = 0, [], 0.0, math.nan
    best: dict[str, Any] = {"score": -math.inf, "step": -1, "state": None}
    if spec.checkpoint is not None:  # every process of a multi-process run resumes, not only the writer
        saved = spec.checkpoint
        try:
            objective.load_state_dict(saved["objective"])
            optim.load_state_dict(saved["optim"])
        except (RuntimeError, KeyError, ValueError) as err:
            where = run.checkpoint_path if run is not None else "the checkpoint"
            raise ValueError(f"{where} does not fit this method and data: {' '.join(str(err).split())[:300]}") from None
        _set_rng_state(saved["rng"], gen)
        start, seconds, best = saved["step"], saved["seconds"], saved["best"]
        history = list(saved["history"])  # appended to: the spec's checkpoint stays as it was read
        loss_val = saved.get("loss", math.nan)

    def checkpoint(step: int, rng: dict[str, Any]) -> None:
        if run is None:  # called only with a run directory
            raise RuntimeError("no run directory to checkpoint into")
        run.write_checkpoint(
            {
                "step": step,
                "objective": objective.state_dict(),
                "optim": optim.state_dict(),
                "rng": rng,
                "history": history,
                "seconds": seconds,
                "best": best,
                "loss": loss_val,
                "config": dict(cfg),
            }
        )

    ctx = TrainContext(data=data, cfg=cfg, device=device, generator=gen, step=start, epoch=start // per_epoch)
    log_every = max(1, cfg["eval_every"] // 10)  # training-loss points between validation scores
    bar = tqdm(
        range(start, n_steps),
        initial=start,
        total=n_steps,
        disable=bool(cfg["quiet"]),
        desc=f"{cfg['method']} on {data.name}",
        unit="step",
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    step, updating, snapshot = start, False, None
    shared = objective.trainable_parameters()  # the optimiser's, fixed when it was built
    objective.train()  # a prediction (validation) puts it in eval mode only while it runs
    try:
        with pyro.validation_enabled(False):
            for step in bar:
                state.step = step
                updating = False
                if run is not None:
                    snapshot = _rng_state(gen)  # where an interrupted step resumes from
                batch = data.train_batch(cfg["batch_size"], gen, device)
                optim.zero_grad(set_to_none=True)
                if group is None:
                    loss = float(objective.backward(batch))
                else:  # the global batch's loss and gradients (the scaling rule of pyromtl.distributed)
                    local = objective.backward(group.shard(batch))
                    loss = float(group.mean_gradients(shared, local))
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss} at step {step} of {cfg['method']} on {data.name}; training stopped. "
                        f"Try a smaller lr (now {cfg['lr']}), kl_weight or clip_norm"
                        + (
                            f"; the last checkpoint is {run.checkpoint_path}"
                            if run is not None and run.has_checkpoint()
                            else ""
                        )
                    )
                updating, loss_val = True, loss
                optim.step()
                done = ctx.step = step + 1
                objective.after_step(ctx)
                if done % per_epoch == 0:
                    ctx.epoch = done // per_epoch
                    objective.end_epoch(ctx)
                if done % cfg["eval_every"] == 0 or done == n_steps:
                    record = {"step": done, "loss": loss_val, **objective.diagnostics()}
                    if has_val:
                        score = validation_score(spec, model, guide, seed + done)
                        record["val_score"] = score
                        if done >= first_kept and (score > best["score"] or cfg["select"] == "last"):
                            best = {"score": score, "step": done, "state": copy.deepcopy(objective.state_dict())}
                        bar.set_postfix(loss=f"{loss_val:.4g}", val=f"{score:.4f}", kept=best["step"])
                    history.append(record)
                elif done % log_every == 0:
                    history.append({"step": done, "loss": loss_val, **objective.diagnostics()})
                if callback is not None:
                    callback(done, loss_val)
                if run is not None and (done % cfg["checkpoint_every"] == 0 or done == n_steps):
                    seconds_now = seconds + time.perf_counter() - t0
                    seconds, t0 = seconds_now, time.perf_counter()
                    checkpoint(done, _rng_state(gen))
    except KeyboardInterrupt:
        seconds += time.perf_counter() - t0  # the saved checkpoint counts the time trained so far
        raise TrainingInterrupted(_interrupted(run, step, updating, snapshot, checkpoint)) from None
    finally:
        bar.close()
    seconds += time.perf_counter() - t0
    if best["state"] is not None:
        objective.load_state_dict(best["state"])
    objective.eval()  # a fitted model predicts, exports and reports in eval mode
    state.step = n_steps
    selected = schedule_values(method, cfg, best["step"] if best["state"] is not None else n_steps, n_steps)
    return TrainResult(
        objective=objective,
        state=state,
        steps=n_steps,
        seconds=seconds,
        final_loss=loss_val,
        best_step=best["step"],
        best_score=best["score"],
        history=history,
        selected=selected,
    )


def _from_workers(spec: RunSpec, kept: dict[str, Any]) -> TrainResult:
    """The result of a multi-process run from what its rank 0 kept: a fresh objective holding the kept state."""
    state = TrainState(total_steps=spec.total_steps)
    objective, _ = build_training(spec, state)
    objective.load_state_dict(kept["state"])
    objective.eval()
    state.step = spec.total_steps
    return TrainResult(objective=objective, state=state, **kept["fields"])
