"""Pieces every Pyro model and guide of pyromtl shares: plates, KL weighting and the likelihood.

Plate layout (``max_plate_nesting = 4``, see :class:`Plates`):

* ``mc_z`` at dim -4 and ``mc_w`` at dim -3: L and M Monte-Carlo draws of local and global
  latents, each draw weighted ``1/L`` or ``1/M`` (VMTL eq. 11);
* ``task`` at dim -2 (size T): global per-task latents have batch shape ``[T, 1]``;
* ``data`` at dim -1 (size B): local latents have batch shape ``[T, B]`` (or ``[1, B]`` for a
  representation shared by all tasks in SIMO data).

Local sites are scaled by ``N_t / B_t`` per task (``poutine.scale`` with a ``[T, 1]`` tensor,
since MIMO tasks have different sizes: one subsampled plate size cannot express that) and
masked where a task's row is padding.
"""

from __future__ import annotations

import functools
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator

import pyro
import torch
from pyro import poutine
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints

from pyromtl.data.core import Batch, TaskInfo
from pyromtl.likelihoods import MultiTaskOutput
from pyromtl.priors import parse_spec
from pyromtl.schedules import Schedule, as_schedule


def is_point(spec) -> bool:
    """A ``deterministic`` prior makes the site a point estimate (flat prior, Delta guide)."""
    return parse_spec(spec).kind == "deterministic"


def local_params(fn):
    """Run ``fn`` with Pyro's module-local parameters, so PyroModules own their parameters
    (no global param store) and ``ELBO()(model, guide)`` is a plain ``nn.Module``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with pyro.settings.context(module_local_params=True):
            return fn(*args, **kwargs)

    return wrapper


@dataclass
class TrainState:
    """Mutable training progress, shared by a model and its guide (the trainer sets ``step``)."""

    step: int = 0


class Plates:
    """The plates of one model or guide run.

    Pyro identifies a plate by its object, so a run creates each plate once here and re-enters
    it for every site; the context managers below compose them for the three kinds of site.
    """

    def __init__(self, batch: Batch, mc_z: int = 1, mc_w: int = 1):
        self.batch = batch
        self.mc_z = pyro.plate("mc_z", mc_z, dim=-4)
        self.mc_w = pyro.plate("mc_w", mc_w, dim=-3)
        self.task = pyro.plate("task", batch.num_tasks, dim=-2)
        self.data = pyro.plate("data", batch.size, dim=-1)

    @contextmanager
    def globals(self) -> Iterator[None]:
        """Per-task latents (batch ``[M, T, 1]``), each Monte-Carlo draw weighted ``1/M``."""
        with self.mc_w, poutine.scale(scale=1.0 / self.mc_w.size), self.task:
            yield

    @contextmanager
    def locals(self, shared: bool = False) -> Iterator[None]:
        """Per-sample latents (batch ``[L, 1, T|1, B]``), scaled by ``N_t / B_t / L`` and masked.

        ``shared=True`` is for a SIMO representation all tasks share: no task plate, and the
        scale and mask of the first task (SIMO tasks share their samples).
        """
        with self._sample_weights(shared), self._local_plates(shared):
            yield

    @contextmanager
    def observations(self) -> Iterator[None]:
        """The likelihood of every (L, M) pair of draws, each weighted ``1/(L M)`` (VMTL eq. 11)."""
        with self._sample_weights(), self.mc_w, poutine.scale(scale=1.0 / self.mc_w.size), self._local_plates():
            yield

    @contextmanager
    def _sample_weights(self, shared: bool = False) -> Iterator[None]:
        # The per-task tensor scale and the mask go outermost: Pyro applies the innermost handlers
        # first, so the plates and float weights inside multiply a Python float, and the tensor
        # multiplies in once per site (not once per plate: tiny device ops add up every step).
        b = self.batch
        with poutine.scale(scale=b.scale[:1] if shared else b.scale), poutine.mask(mask=b.mask[:1] if shared else b.mask):
            yield

    @contextmanager
    def _local_plates(self, shared: bool = False) -> Iterator[None]:
        with ExitStack() as stack:
            stack.enter_context(self.mc_z)
            stack.enter_context(poutine.scale(scale=1.0 / self.mc_z.size))
            if not shared:
                stack.enter_context(self.task)
            stack.enter_context(self.data)
            yield


def site_kl_weights(cfg: dict) -> dict[str, float]:
    """Per-site KL multipliers from config keys ``kl_weight_<site>`` (e.g. ``kl_weight_z``)."""
    return {k.removeprefix("kl_weight_"): float(v) for k, v in cfg.items() if k.startswith("kl_weight_")}


class MultiTaskModule(PyroModule):
    """Base of every pyromtl model and guide: task facts, training state and the KL weight.

    ``kl_weight`` is a schedule over training steps (Bowman et al. annealing). Models and guides
    both wrap their latent sites in :meth:`kl_scope`, because ``TraceMeanField_ELBO`` takes the
    scale of an analytic KL term from the guide site.
    """

    def __init__(self, info: TaskInfo, state: TrainState, kl_weight: Schedule | float | dict = 1.0,
                 site_weights: dict[str, float] | None = None):
        super().__init__()
        self.info = info
        self.state = state
        self.kl_weight = as_schedule(kl_weight)
        self.site_weights = dict(site_weights or {})

    @contextmanager
    def kl_scope(self, site: str) -> Iterator[None]:
        """Scale the KL of ``site`` by the annealed weight times the site's own weight."""
        weight = float(self.kl_weight(self.state.step)) * self.site_weights.get(site, 1.0)
        # Pyro rejects a zero scale; a zero weight masks the KL terms out instead.
        with poutine.scale(scale=weight) if weight > 0 else poutine.mask(mask=False):
            yield


class MultiTaskModel(MultiTaskModule):
    """A model: adds the regression noise scales and the shared likelihood site ``y``."""

    def __init__(self, info: TaskInfo, state: TrainState, kl_weight: Schedule | float | dict = 1.0,
                 site_weights: dict[str, float] | None = None):
        super().__init__(info, state, kl_weight, site_weights)
        self.noise = PyroParam(torch.ones(info.num_tasks, device=info.type_code.device), constraint=constraints.positive)

    def observe(self, outputs: torch.Tensor, batch: Batch) -> None:
        """Record ``outputs`` and score ``y``; call inside :meth:`Plates.observations`."""
        pyro.deterministic("outputs", outputs, event_dim=1)
        pyro.sample("y", MultiTaskOutput(outputs, self.info, self.noise), obs=batch.y)
