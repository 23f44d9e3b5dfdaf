"""Pieces every Pyro model and guide of pyromtl shares: plates, KL weighting and the likelihood.

Plate layout (see :class:`Plates`):

* ``task`` at dim -2 (size T): global per-task latents have batch shape ``[T, 1]``;
* ``data`` at dim -1 (size B): local latents have batch shape ``[T, B]`` (or ``[1, B]`` for a
  representation shared by all tasks in SIMO data).

A method may add Monte-Carlo plates outside them (VMTL takes L and M draws of its local and
global latents: ``Plates(batch, local_draws=L, global_draws=M)`` puts ``local_draws`` at dim -4
and ``global_draws`` at -3); it then declares ``max_plate_nesting = 4``. Without them a method
nests two plates.

Local sites are scaled by ``N_t / B_t`` per task (``poutine.scale`` with a ``[T, 1]`` tensor,
since MIMO tasks have different sizes: one subsampled plate size cannot express that) and
masked where a task's row is padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager

import pyro
import torch
from pyro import poutine
from pyro.nn import PyroParam
from torch.distributions import constraints

from pyromtl.data.core import Batch, TaskInfo
from pyromtl.likelihoods import MultiTaskOutput
from pyromtl.params import LocalParamsModule
from pyromtl.priors import parse_spec
from pyromtl.schedules import Schedule, TrainState, as_schedule


def is_point(spec) -> bool:
    """A ``deterministic`` prior makes the site a point estimate (flat prior, Delta guide)."""
    return parse_spec(spec).kind == "deterministic"


class Plates:
    """The plates of one model or guide run.

    Pyro identifies a plate by its object, so a run creates each plate once here and re-enters
    it for every site; the context managers below compose them for the three kinds of site.
    ``local_draws``/``global_draws`` (``None`` by default) add Monte-Carlo plates of L draws of
    every local and M of every global latent, each draw weighted ``1/L`` or ``1/M`` (VMTL eq. 11).
    """

    def __init__(self, batch: Batch, local_draws: int | None = None, global_draws: int | None = None):
        self.batch = batch
        self.local_draws = pyro.plate("local_draws", local_draws, dim=-4) if local_draws is not None else None
        self.global_draws = pyro.plate("global_draws", global_draws, dim=-3) if global_draws is not None else None
        self.task = pyro.plate("task", batch.num_tasks, dim=-2)
        self.data = pyro.plate("data", batch.size, dim=-1)

    @contextmanager
    def globals(self) -> Iterator[None]:
        """Per-task latents (batch ``[M, T, 1]``, or ``[T, 1]``)."""
        with self._draws(self.global_draws), self.task:
            yield

    @contextmanager
    def locals(self, shared: bool = False) -> Iterator[None]:
        """Per-sample latents (batch ``[L, 1, T|1, B]``, or ``[T|1, B]``), scaled by ``N_t / B_t`` and masked.

        ``shared=True`` is for a SIMO representation all tasks share: no task plate, and the
        scale and mask of the first task (SIMO tasks share their samples).
        """
        with self._sample_weights(shared), self._local_plates(shared):
            yield

    @contextmanager
    def observations(self) -> Iterator[None]:
        """The likelihood of every sample (and of every (L, M) pair of draws, each weighted ``1/(L M)``)."""
        with self._sample_weights(), self._draws(self.global_draws), self._local_plates():
            yield

    @staticmethod
    @contextmanager
    def _draws(plate) -> Iterator[None]:
        """Enter a Monte-Carlo plate with its ``1/size`` weight; nothing without one."""
        if plate is None:
            yield
            return
        with plate, poutine.scale(scale=1.0 / plate.size):
            yield

    @contextmanager
    def _sample_weights(self, shared: bool = False) -> Iterator[None]:
        # The per-task tensor scale and the mask go outermost: Pyro applies the innermost handlers
        # first, so the plates and float weights inside multiply a Python float, and the tensor
        # multiplies in once per site (not once per plate: tiny device ops add up every step).
        b = self.batch
        with (
            poutine.scale(scale=b.scale[:1] if shared else b.scale),
            # pyro's stub asks for the legacy torch.BoolTensor class; a bool-dtype Tensor is what it takes
            poutine.mask(mask=b.mask[:1] if shared else b.mask),  # type: ignore[call-overload]
        ):
            yield

    @contextmanager
    def _local_plates(self, shared: bool = False) -> Iterator[None]:
        with ExitStack() as stack:
            stack.enter_context(self._draws(self.local_draws))
            if not shared:
                stack.enter_context(self.task)
            stack.enter_context(self.data)
            yield


class MultiTaskModule(LocalParamsModule):
    """Base of every pyromtl model and guide: task facts, training state and the KL weight.

    ``kl_weight`` is a schedule over training steps (Bowman et al. annealing) and
    ``kl_weights`` maps a latent site to its own constant multiplier (config ``kl_weights =
    {z = 0.1, w = 1.0}``; a site not named has 1). Together they temper the posterior: the KL of
    each site is scaled, the likelihood is not. Models and guides both wrap their latent sites in
    :meth:`kl_scope`, because ``TraceMeanField_ELBO`` takes the scale of an analytic KL term from
    the guide site.
    """

    def __init__(
        self,
        info: TaskInfo,
        state: TrainState,
        kl_weight: Schedule | float | dict = 1.0,
        kl_weights: Mapping[str, float] | None = None,
    ):
        super().__init__()
        self.info = info
        self.state = state
        self.kl_weight = as_schedule(kl_weight)
        self.site_weights = dict(kl_weights or {})

    @contextmanager
    def kl_scope(self, site: str) -> Iterator[None]:
        """Scale the KL of ``site`` by the annealed weight times the site's own weight."""
        weight = self.state.value(self.kl_weight) * self.site_weights.get(site, 1.0)
        # Pyro rejects a zero scale; a zero weight masks the KL terms out instead.
        with poutine.scale(scale=weight) if weight > 0 else poutine.mask(mask=False):
            yield


class MultiTaskModel(MultiTaskModule):
    """A model: adds the regression noise scales and the shared likelihood site ``y``."""

    def __init__(
        self,
        info: TaskInfo,
        state: TrainState,
        kl_weight: Schedule | float | dict = 1.0,
        kl_weights: Mapping[str, float] | None = None,
    ):
        super().__init__(info, state, kl_weight, kl_weights)
        # PyroModule stores a PyroParam as a constrained parameter: reading it gives the tensor
        self.noise: torch.Tensor = PyroParam(  # type: ignore[assignment]
            torch.ones(info.num_tasks, device=info.type_code.device), constraint=constraints.positive
        )

    def observe(self, outputs: torch.Tensor, batch: Batch) -> None:
        """Record ``outputs`` and score ``y``; call inside :meth:`Plates.observations`."""
        pyro.deterministic("outputs", outputs, event_dim=1)
        pyro.sample("y", MultiTaskOutput(outputs, self.info, self.noise), obs=batch.y)
