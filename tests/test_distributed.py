"""Training on several processes (``devices``): every method's step on 2 gloo processes equals its
one-process step on the same global batch (``pyromtl.distributed``).

One Lightning launch runs every case (starting processes costs seconds): the deterministic
methods train a few steps and must end where the one-process run ends; the variational ones take
step 0's loss and gradients with the per-example draws fixed (:class:`FixedNoise`), since two
shards draw their own noise where one process draws the batch's.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyro
import pytest
import torch
from pyro.poutine.messenger import Messenger

import pyromtl
from pyromtl import config, methods
from pyromtl.collective import Group
from pyromtl.data.core import Batch
from pyromtl.distributed import make_fabric
from pyromtl.params import local_params
from pyromtl.runspec import RunSpec
from pyromtl.schedules import TrainState
from pyromtl.train import build_objective, train
from tests.conftest import scaled

SMALL = {"hidden": [24], "latent_dim": 8, "quiet": True, "device": "cpu", "eval_every": 1000, "select": "last"}
#: The deterministic methods: a 2-process run ends with the 1-process run's parameters.
DETERMINISTIC = {
    "stl": "digits-domains",
    "bmtl": "digits-domains",
    "cross-stitch": "digits-mixed",
    **{m: "digits-mixed" for m in ("ls", "si", "rlw", "dwa", "uw", "mgda", "pcgrad", "cagrad", "imtl-g")},
    **{m: "digits-mixed" for m in ("nash-mtl", "aligned-mtl", "upgrad")},
}
#: bayesagg in pre-training (LS steps) and aggregating (the batch posterior of the global batch).
#: Aggregating is deterministic given the seed: binary heads by quadrature, regression in
#: closed form, and a multiclass head's logit points are one scrambled Sobol set for every row.
#: Batches of 360 of 1,078 training rows: an epoch is 3 steps, so the full-data prior (one pass
#: over every training row at an epoch's end, sharded over the processes) is built twice.
BAYESAGG = {
    "bayesagg-pretrain": ("digits-mixed", {"pretrain_steps": 100}),
    "bayesagg-binary": ("digits-binary", {"pretrain_steps": 2, "batch_size": 360}),
    "bayesagg-regression": ("digits-regression", {"pretrain_steps": 2, "batch_size": 360}),
    "bayesagg-mixed": ("digits-mixed", {"pretrain_steps": 2, "batch_size": 360}),
}
#: The variational methods: step 0's loss and gradients with the same draws.
VARIATIONAL = {
    "vstl": "digits-domains",
    "vbmtl": "digits-domains",
    "vmtl": "digits-domains",
    "vmtl-ac": "digits-domains",
    "hib": "digits-grouped",
    "mtvib": "digits-mixed",
    "smtl": "digits-mixed",
    "smtl-c": "digits-mixed",
    "lsmtl": "digits-mixed",
    "lsmtl-c": "digits-mixed",
}
STEPS = 6
SCRIPT = Path(sys.executable).parent / "pyromtl"  # the console script installed with this interpreter


def _spec(method: str, data: str, **options: Any) -> RunSpec:
    m = methods.get(method)
    return RunSpec.build(m, config.resolve(m, {**SMALL, "data": data, "steps": STEPS, **options}))


def _cases() -> dict[str, RunSpec]:
    cases = {m: _spec(m, d) for m, d in DETERMINISTIC.items()}
    cases |= {name: _spec("bayesagg", data, **opts) for name, (data, opts) in BAYESAGG.items()}
    # the bi-level gate step draws its own batch of the gates split: shards of it too
    cases["smtl-bilevel"] = _spec("smtl", "digits-mixed", gates="bilevel", batch_size=31)
    return cases


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """``‖a − b‖ / ‖a‖`` of every floating-point tensor."""
    out = {}
    for key, x in a.items():
        if torch.is_tensor(x) and x.is_floating_point():
            out[key] = float((x - b[key]).norm() / x.norm().clamp_min(1e-12))
    return out


# ---------------------------------------------------------------------------- same draws
class FixedNoise(Messenger):
    """Draw every per-example Normal site of a guide as ``loc + scale · ε[rows]`` from fixed ``ε``.

    ``noise`` maps a site to its ε over the global batch; ``rows`` picks a shard's rows (with its
    padding) along the ``data`` plate. A value set already (a model replaying the guide) is kept.
    """

    def __init__(self, noise: dict[str, torch.Tensor], rows: torch.Tensor):
        super().__init__()
        self.noise, self.rows = noise, rows

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None or msg["name"] not in self.noise:
            return
        base = msg["fn"]
        while not hasattr(base, "scale"):  # Normal (HIB's DiagNormal too) under Independent and the like
            base = base.base_dist
        frame = next(f for f in msg["cond_indep_stack"] if f.name == "data")
        dim = frame.dim - msg["fn"].event_dim
        eps = self.noise[msg["name"]].index_select(dim, self.rows)
        msg["value"] = base.loc + base.scale * eps


def _local_sites(objective, batch: Batch) -> dict[str, torch.Size]:
    """The guide's sample sites in the ``data`` plate, with their shapes on ``batch``."""
    trace = pyro.poutine.trace(objective.guide).get_trace(batch)
    return {
        name: site["value"].shape
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and any(f.name == "data" for f in site["cond_indep_stack"])
    }


@local_params
def _step_zero(spec: RunSpec, noise: dict[str, torch.Tensor], group: Group | None):
    """Step 0's loss and gradients (one process, or this process's shard and the all-reduce)."""
    seed = int(spec.config["seed"])
    pyro.set_rng_seed(seed)
    objective = build_objective(spec, TrainState(total_steps=spec.total_steps))
    objective.group = group
    batch = spec.data.train_batch(spec.config["batch_size"], torch.Generator().manual_seed(seed), spec.device)
    rows = torch.arange(batch.size)
    if group is not None:
        rows = group.rows(batch.size)[0]
        batch = group.shard(batch)
    with FixedNoise(noise, rows), pyro.validation_enabled(False):
        loss = objective.backward(batch)
    params = objective.trainable_parameters()
    if group is not None:
        loss = group.mean_gradients(params, loss)
    named = {id(p): n for n, p in objective.named_parameters()}
    return float(loss), {named[id(p)]: p.grad.clone() for p in params if p.grad is not None}


@local_params
def _noise(spec: RunSpec) -> dict[str, torch.Tensor]:
    seed = int(spec.config["seed"])
    pyro.set_rng_seed(seed)
    objective = build_objective(spec, TrainState(total_steps=spec.total_steps))
    batch = spec.data.train_batch(spec.config["batch_size"], torch.Generator().manual_seed(seed), spec.device)
    gen = torch.Generator().manual_seed(1)
    return {name: torch.randn(shape, generator=gen) for name, shape in _local_sites(objective, batch).items()}


# ---------------------------------------------------------------------------- the workers
def _worker(fabric, payload: bytes, out: str) -> None:
    cases, variational = pickle.loads(payload)
    group = Group(rank=fabric.global_rank, world_size=fabric.world_size)
    results: dict[str, Any] = {}
    for name, spec in cases.items():
        results[name] = train(spec, group=group).objective.state_dict()
    for name, (spec, noise) in variational.items():
        results[name] = _step_zero(spec, noise, group)
    if group.leader:
        Path(out).write_bytes(pickle.dumps(results))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Every case on 2 processes, and on one."""
    cases = _cases()
    variational = {}
    for m, d in VARIATIONAL.items():
        spec = _spec(m, d)
        variational[m] = (spec, _noise(spec))
    out = tmp_path_factory.mktemp("ddp") / "results.pkl"
    make_fabric(2).launch(_worker, pickle.dumps((cases, variational)), str(out))
    parallel = pickle.loads(out.read_bytes())
    single = {name: train(spec).objective.state_dict() for name, spec in cases.items()}
    single |= {name: _step_zero(spec, noise, None) for name, (spec, noise) in variational.items()}
    return single, parallel


@pytest.mark.slow
@pytest.mark.parametrize("name", [*DETERMINISTIC, *BAYESAGG, "smtl-bilevel"])
def test_deterministic_methods_end_where_one_process_ends(two_processes, name):
    single, parallel = two_processes
    worst = _relative(single[name], parallel[name])
    assert max(worst.values()) < 1e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIATIONAL)
def test_variational_step_zero_matches_with_the_same_draws(two_processes, name):
    (loss_1, grads_1), (loss_2, grads_2) = two_processes[0][name], two_processes[1][name]
    assert loss_2 == pytest.approx(loss_1, rel=1e-5)
    assert grads_1.keys() == grads_2.keys()
    worst = _relative(grads_1, grads_2)
    assert max(worst.values()) < 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


# ---------------------------------------------------------------------------- no processes
def _batch(simo: bool, size: int = 5) -> Batch:
    T = 2
    x = torch.arange(size * 3.0).reshape(size, 3) if simo else torch.arange(T * size * 3.0).reshape(T, size, 3)
    y = torch.arange(T * size, dtype=torch.float32).reshape(T, size)
    mask = torch.ones(T, size, dtype=torch.bool)
    mask[1, -1] = False
    index = torch.arange(size).expand(T, size).clone()
    return Batch(x=x, y=y, mask=mask, scale=torch.tensor([[4.0], [5.0]]), index=index, simo=simo)


@pytest.mark.parametrize("simo", [True, False])
def test_shards_cover_the_batch_once_and_scale_by_the_world(simo):
    batch = _batch(simo)
    shards = [Group(rank=r, world_size=3).shard(batch) for r in range(3)]
    assert {s.size for s in shards} == {2}  # ceil(5 / 3), the last padded
    # every real row once, in order, with its mask; padding masked
    real = [(s.y[:, s.mask.any(0)]) for s in shards]
    assert torch.equal(torch.cat(real, 1), batch.y)
    assert torch.equal(torch.cat([s.mask for s in shards], 1)[:, :5], batch.mask)
    assert not shards[-1].mask[:, -1].any()
    for s in shards:
        assert torch.equal(s.scale, batch.scale * 3)
        assert s.x.shape[0 if simo else 1] == 2


def test_the_mean_of_the_shards_scaled_sums_is_the_global_one():
    """The scaling rule: (1/W) Σ_r W·s·Σ_{n∈r} ℓ_n = s·Σ_n ℓ_n, padding included."""
    batch = _batch(True, size=7)
    loss = batch.y.square()  # any per-example loss

    def scaled_sum(b: Batch) -> torch.Tensor:
        return (b.scale * torch.where(b.mask, b.y.square(), 0)).sum()

    whole = (batch.scale * torch.where(batch.mask, loss, 0)).sum()
    for world in (2, 3, 4):
        parts = [scaled_sum(Group(rank=r, world_size=world).shard(batch)) for r in range(world)]
        assert float(sum(parts) / world) == pytest.approx(float(whole))


def test_devices_and_num_nodes_are_options_checked_before_training():
    with pytest.raises(ValueError, match="devices"):
        pyromtl.fit("bmtl", "digits-domains", devices=0, steps=1)
    with pytest.raises(ValueError, match="num_nodes"):
        pyromtl.fit("bmtl", "digits-domains", num_nodes=0, steps=1)
    with pytest.raises(ValueError, match="callback"):
        train(_spec("bmtl", "digits-domains", devices=2), callback=lambda step, loss: None)


def test_a_spec_round_trips_through_pickle():
    spec = _spec("vmtl", "digits-domains")
    back = pickle.loads(pickle.dumps(spec))
    assert dict(back.config) == dict(spec.config)
    assert back.total_steps == spec.total_steps and back.method.name == "vmtl"
    with pytest.raises(TypeError):
        back.config["steps"] = 1  # type: ignore[index]  # still read-only


# ---------------------------------------------------------------------------- the whole path
@pytest.mark.slow
def test_fit_on_two_processes_writes_the_one_process_metrics(tmp_path):
    """``pyromtl.fit(..., devices=2)``: Lightning launches the workers; rank 0 checkpoints, this
    process writes the run once, and the test metrics equal the one-process run's."""
    options = {**SMALL, "steps": 40, "eval_every": 20, "select": "after_warmup"}
    one = pyromtl.fit("bmtl", "digits-domains", out=tmp_path / "one", **options)
    two = pyromtl.fit("bmtl", "digits-domains", out=tmp_path / "two", devices=2, **options)
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    for task, scores in m1["tasks"].items():
        for key, value in scores.items():
            if isinstance(value, float):
                assert m2["tasks"][task][key] == pytest.approx(value, abs=1e-4), (task, key)
    assert two.train_info["best_step"] == one.train_info["best_step"]
    assert [r["step"] for r in two.history] == [r["step"] for r in one.history]
    assert two.config["devices"] == 2
    assert (tmp_path / "two" / "complete.json").exists()


@pytest.mark.slow
def test_a_killed_process_stops_the_run_and_the_same_command_resumes(tmp_path):
    """``kill -9`` of one worker: the command stops with a message naming the checkpoint, and run
    again it resumes there and ends where a one-process run of the same steps ends."""
    out = tmp_path / "run"
    options = ["--set", "hidden=[24]", "--set", "latent_dim=8", "--set", "checkpoint_every=20"]
    cmd = [str(SCRIPT), "fit", "bmtl", "--data", "digits-domains", "--steps", "600", "--seed", "3", "--quiet"]
    cmd += ["--devices", "2", "--out", str(out), *options]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + scaled(120)
        while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = [pid for pid in _children(proc.pid) if "spawn_main" in _cmdline(pid)]
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=scaled(60))
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert "died (SIGKILL)" in err or "another process of the run died" in err, err
    kept = re.search(r"resumes from the checkpoint of step (\d+)", err)
    assert kept is not None and 0 < int(kept[1]) < 600, err  # stopped part-way, after a checkpoint
    assert not (out / "complete.json").exists()
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=scaled(180))
    assert again.returncode == 0, again.stderr
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)["objective"]
    one = pyromtl.fit("bmtl", "digits-domains", steps=600, seed=3, **{**SMALL, "checkpoint_every": 20})
    worst = _relative(one.objective.state_dict(), resumed)
    assert max(worst.values()) < 1e-4, worst


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


@pytest.mark.slow
def test_two_machines_through_lightnings_environment(tmp_path):
    """``num_nodes = 2`` as on a cluster, both "machines" here: each runs the same command with
    ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; node 0 writes the run, node 1 exits 0,
    and the run equals a one-process one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    cmd = [str(SCRIPT), "fit", "bmtl", "--data", "digits-domains", "--steps", "30", "--quiet", "--out", str(out)]
    cmd += ["--num-nodes", "2", "--set", "hidden=[24]", "--set", "latent_dim=8", "--set", "select=last"]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(cmd, cwd=tmp_path, env={**env, "NODE_RANK": str(rank)}, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    errs = [p.communicate(timeout=scaled(180))[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert (out / "complete.json").exists()
    two = torch.load(out / "checkpoint.pt", weights_only=True)["objective"]
    one = pyromtl.fit("bmtl", "digits-domains", steps=30, **SMALL).objective.state_dict()
    assert max(_relative(one, two).values()) < 1e-5
