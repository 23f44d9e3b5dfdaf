"""Data-parallel training on several processes, launched by Lightning Fabric (``devices``, ``num_nodes``).

A run with ``devices × num_nodes = W > 1`` processes takes the one-process run's steps on the
one-process run's global batches:

* every process draws the same global batch (the same seed, the same data RNG) and keeps its
  shard, the r-th of W consecutive slices of every task's batch, padded with masked rows to
  one size (:meth:`Group.shard`);
* **the scaling rule**: a shard's likelihood is scaled by ``W · N_t / B_t`` (``Batch.scale``
  times W), and every prior and KL term is computed in full on every process. The mean of the
  W local losses, ``(1/W) Σ_r [W (N_t/B_t) Σ_{n∈r} ℓ_n + KL] = (N_t/B_t) Σ_n ℓ_n + KL``, is the
  global batch's loss, so the mean of the local gradients, which :meth:`Group.mean_gradients`
  all-reduces, is its gradient;
* every process runs with the same seed, so a draw that is not per example (``w``, a gate, a
  random loss weighting) is the same everywhere and the averaged gradient is that of one draw.
  Per-example draws of different shards come from the same noise stream (as dropout masks do
  under PyTorch's DDP): the gradient stays unbiased;
* an objective whose step is not linear in the examples all-reduces what it needs through
  :attr:`pyromtl.objective.Objective.group`: the weighting baselines combine the global task
  losses and aggregate the global Jacobian (:mod:`pyromtl.infer.weighting`);
* rank 0 validates, selects the kept state and writes the checkpoints; the process that
  launched the workers receives the kept state and writes everything else once.

Lightning Fabric launches the processes (``ddp_spawn``: this process stays the one that holds the
run directory's lock and writes the outputs), sets up the process group (gloo on CPUs, NCCL on
GPUs) and picks the devices; pyromtl's trainer keeps its own loop, since several objectives set
their gradients themselves (torchjd's Jacobians, BayesAgg's aggregated gradient, SMTL's gate
step). On several machines, each runs the same command with Lightning's ``MASTER_ADDR``,
``MASTER_PORT`` and ``NODE_RANK`` set; the machine with ``NODE_RANK = 0`` writes the run.
"""

from __future__ import annotations

import dataclasses
import pickle
import signal
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from pyromtl.collective import Group, world_size
from pyromtl.errors import TrainingError, TrainingInterrupted

if TYPE_CHECKING:
    from pyromtl.runspec import RunSpec


def _worker(fabric, train: Callable[..., Any], payload: bytes, plugins: Sequence[str], out: str) -> None:
    """One process of the run: ``train`` on this rank's shards; rank 0 pickles what the launcher keeps to ``out``.

    The run arrives pickled, and is unpickled after ``--import``'s modules are imported again
    here, since they may define the method it names. The result goes through a file: the
    launcher's queue is read only once every process has exited, and a pipe holds far less
    than a model."""
    from pyromtl.plugins import import_plugins

    import_plugins(plugins)
    spec: RunSpec = pickle.loads(payload)
    group = Group(rank=fabric.global_rank, world_size=fabric.world_size)
    spec = dataclasses.replace(spec, device=fabric.device, run=spec.run if group.leader else None)
    try:
        result = train(spec, group=group)
    except (TrainingError, ValueError) as err:
        kept: dict[str, Any] = {"error": type(err).__name__, "message": str(err)}
    else:
        fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
        kept = {
            "state": result.objective.state_dict(),
            "fields": {k: v for k, v in fields.items() if k not in _REBUILT},
        }
    if group.leader:
        Path(out).write_bytes(pickle.dumps(kept))
    # Every process reaches here before any closes its connections: a process whose peers had
    # already exited could abort in gloo's teardown (SIGABRT), most often on another machine.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


#: TrainResult fields the launching process rebuilds rather than receives.
_REBUILT = ("objective", "state")


def make_fabric(devices: int, num_nodes: int = 1, cuda: bool = False) -> Any:
    """The ``lightning_fabric.Fabric`` that runs ``devices × num_nodes`` processes: ``ddp_spawn``
    (the calling process stays the launcher), gloo on CPUs and NCCL on GPUs, and Lightning's own
    cluster environment (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``).

    Raises ``ValueError`` naming the extra to install when Lightning Fabric is missing."""
    try:
        from lightning_fabric import Fabric
        from lightning_fabric.plugins.environments import LightningEnvironment
        from lightning_fabric.strategies import DDPStrategy
    except ImportError:
        raise ValueError(
            "devices × num_nodes > 1 trains through Lightning Fabric, which is not installed: "
            "pip install 'pyromtl[lightning]'"
        ) from None
    strategy = DDPStrategy(
        start_method="spawn",
        process_group_backend="nccl" if cuda else "gloo",
        cluster_environment=LightningEnvironment(),
    )
    return Fabric(accelerator="cuda" if cuda else "cpu", devices=devices, num_nodes=num_nodes, strategy=strategy)


def launch(spec: RunSpec, train: Callable[..., Any]) -> dict[str, Any]:
    """Run ``train(spec, group=...)`` on ``devices × num_nodes`` processes (Lightning Fabric,
    ``ddp_spawn``); return what rank 0 kept: the kept state (``"state"``) and the other fields
    of its ``TrainResult`` (``"fields"``). A failure in a process is raised here, with where
    the same command resumes."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    from pyromtl.plugins import IMPORTED

    cfg = spec.config
    fabric = make_fabric(int(cfg["devices"]), int(cfg["num_nodes"]), cuda=spec.device.type == "cuda")
    with tempfile.TemporaryDirectory(prefix="pyromtl-ddp-") as tmp:
        out = Path(tmp) / "result.pkl"
        work = partial(_worker, train=train, payload=pickle.dumps(spec), plugins=list(IMPORTED), out=str(out))
        try:
            fabric.launch(work)
        except KeyboardInterrupt:  # Ctrl-C reaches every process; rank 0 saves what it can (see train)
            raise TrainingInterrupted(f"interrupted; {_resume_hint(spec)}") from None
        except ProcessExitedException as err:
            how = signal.Signals(-err.exit_code).name if err.exit_code < 0 else f"exit code {err.exit_code}"
            raise TrainingError(
                f"process {err.error_index} of {world_size(cfg)} died ({how}); {_resume_hint(spec)}"
            ) from None
        except ProcessRaisedException as err:
            last = str(err).strip().splitlines()[-1]
            if "Connection closed by peer" in last or "Connection reset by peer" in last:
                last = "another process of the run died (its connection closed)"
            raise TrainingError(
                f"process {err.error_index} of {world_size(cfg)} failed: {last}; {_resume_hint(spec)}"
            ) from None
        if not out.exists():  # a machine other than NODE_RANK 0: its processes are done
            raise SystemExit(0)
        kept = pickle.loads(out.read_bytes())
    if "error" in kept:
        raise (ValueError if kept["error"] == "ValueError" else TrainingError)(kept["message"])
    return kept


def _resume_hint(spec: RunSpec) -> str:
    if spec.run is not None and spec.run.has_checkpoint():
        step = spec.run.read_checkpoint()["step"]
        return f"the same command resumes from the checkpoint of step {step} in {spec.run.path}"
    return "no checkpoint was written" + ("" if spec.run is not None else " (no run directory)")


__all__ = ["launch", "make_fabric"]
