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

import functools
from collections.abc import Mapping
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.nn import PyroParam
from pyro.poutine.mask_messenger import MaskMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.plate_messenger import PlateMessenger
from pyro.poutine.scale_messenger import ScaleMessenger
from pyro.poutine.subsample_messenger import SubsampleMessenger
from torch.distributions import constraints

from pyromtl.data.core import Batch, TaskInfo
from pyromtl.likelihoods import MultiTaskOutput
from pyromtl.params import LocalParamsModule
from pyromtl.priors import parse_spec
from pyromtl.schedules import Schedule, TrainState, as_schedule


def is_point(spec) -> bool:
    """A ``deterministic`` prior makes the site a point estimate (flat prior, Delta guide)."""
    return parse_spec(spec).kind == "deterministic"


def kl_weighted(weight: float) -> Messenger:
    """A handler scaling a site's KL by ``weight`` (enter it with ``with``); Pyro rejects a zero
    scale, so a zero weight masks the KL terms out instead."""
    return ScaleMessenger(weight) if weight > 0 else MaskMessenger(False)


class Handlers:
    """Pyro handlers entered in order (the first outermost) and left in reverse: one flat context
    manager where nested ``with`` blocks of generator context managers cost a step several
    times as much Python."""

    __slots__ = ("entered", "handlers")

    def __init__(self, *handlers: Messenger):
        self.handlers = handlers
        self.entered = 0

    def __enter__(self) -> None:
        for handler in self.handlers:
            handler.__enter__()
            self.entered += 1

    def __exit__(self, *exc: Any) -> None:
        while self.entered:
            self.entered -= 1
            self.handlers[self.entered].__exit__(*exc)


class _Broadcast(Messenger):
    """Expand a sample site's distribution to the batch shape its plates give it, as Pyro's
    :class:`~pyro.poutine.broadcast_messenger.BroadcastMessenger` does, but only where that shape
    differs from the distribution's own. Pyro's wraps every site in a warnings filter for the
    JIT and expands even to the same shape: two Python-level costs per site, every step."""

    def _pyro_sample(self, msg) -> None:
        fn = msg["fn"]
        if msg["done"] or not isinstance(fn, TorchDistributionMixin):
            return
        # A dim the distribution has as 1 (or lacks) takes its plate's size; any other size must
        # equal the plate's. None marks "not set by a plate yet".
        shape: list[int | None] = [None if n == 1 else n for n in fn.batch_shape]
        for frame in msg["cond_indep_stack"]:
            if frame.dim is None or frame.size == -1:
                continue
            if -frame.dim > len(shape):
                shape[:0] = [None] * (-frame.dim - len(shape))
            if shape[frame.dim] not in (None, frame.size):
                raise ValueError(
                    f"site {msg['name']!r}: its distribution has size {shape[frame.dim]} at dim {frame.dim}, "
                    f"where plate {frame.name!r} has size {frame.size}"
                )
            shape[frame.dim] = frame.size
        target = torch.Size(1 if n is None else n for n in shape)
        if target != fn.batch_shape:
            msg["fn"] = fn.expand(target)
            if msg["fn"].has_rsample != fn.has_rsample:
                msg["fn"].has_rsample = fn.has_rsample


class _Plate(PlateMessenger):
    """A plate that leaves broadcasting to one :class:`_Broadcast` outside all of
    :class:`Plates`' plates: Pyro's plate broadcasts a site's distribution at every plate, and
    all but the outermost expansion are redone by the next one."""

    def _process_message(self, msg) -> None:
        SubsampleMessenger._process_message(self, msg)


@functools.lru_cache(maxsize=256)
def _plate(name: str, size: int, dim: int, broadcast: bool = True) -> PlateMessenger:
    """One plate object per name, size and dim, re-entered by every run.

    Creating a plate sends its index set through the whole handler stack (a subsample site,
    which the ELBO then prunes from the trace): about a tenth of a small model's step, for a
    value that depends only on the size. A plate without subsampling holds no state between
    entries, so every model and guide run may share it.
    """
    with poutine.block():  # created inside a trace, it would record its index set there, once
        return (pyro.plate if broadcast else _Plate)(name, size, dim=dim)


class Plates:
    """The plates of one model or guide run.

    ``task`` and ``data`` are Pyro plates, for a site of your own; the context managers below
    compose the plates for the three kinds of site, with one broadcast of the site's
    distribution outside them all. ``local_draws``/``global_draws`` (``None`` by default) add
    Monte-Carlo plates of L draws of every local and M of every global latent, each draw
    weighted ``1/L`` or ``1/M`` (VMTL eq. 11).
    """

    def __init__(self, batch: Batch, local_draws: int | None = None, global_draws: int | None = None):
        self.batch = batch
        self.task = _plate("task", batch.num_tasks, -2)
        self.data = _plate("data", batch.size, -1)
        self._local_draws = _plate("local_draws", local_draws, -4, False) if local_draws is not None else None
        self._global_draws = _plate("global_draws", global_draws, -3, False) if global_draws is not None else None
        self._task = _plate("task", batch.num_tasks, -2, False)
        self._data = _plate("data", batch.size, -1, False)

    def globals(self) -> Handlers:
        """Per-task latents (batch ``[M, T, 1]``, or ``[T, 1]``)."""
        return Handlers(_Broadcast(), *self._draws(self._global_draws), self._task)

    def locals(self, shared: bool = False) -> Handlers:
        """Per-sample latents (batch ``[L, 1, T|1, B]``, or ``[T|1, B]``), scaled by ``N_t / B_t`` and masked.

        ``shared=True`` is for a SIMO representation all tasks share: no task plate, and the
        scale and mask of the first task (SIMO tasks share their samples).
        """
        return Handlers(*self._sample_weights(shared), _Broadcast(), *self._local_plates(shared))

    def observations(self) -> Handlers:
        """The likelihood of every sample (and of every (L, M) pair of draws, each weighted ``1/(L M)``)."""
        return Handlers(*self._sample_weights(), _Broadcast(), *self._draws(self._global_draws), *self._local_plates())

    @staticmethod
    def _draws(plate: PlateMessenger | None) -> tuple[Messenger, ...]:
        """A Monte-Carlo plate with its ``1/size`` weight; nothing without one."""
        return () if plate is None else (plate, ScaleMessenger(1.0 / plate.size))

    def _sample_weights(self, shared: bool = False) -> tuple[Messenger, ...]:
        # The per-task tensor scale and the mask go outermost: Pyro applies the innermost handlers
        # first, so the plates and float weights inside multiply a Python float, and the tensor
        # multiplies in once per site (not once per plate: tiny device ops add up every step).
        b = self.batch
        scale = ScaleMessenger(b.scale[:1] if shared else b.scale)
        if b.unmasked:
            return (scale,)
        # pyro's stub asks for the legacy torch.BoolTensor class; a bool-dtype Tensor is what it takes
        return scale, MaskMessenger(b.mask[:1] if shared else b.mask)  # type: ignore[arg-type]

    def _local_plates(self, shared: bool = False) -> tuple[Messenger, ...]:
        return (*self._draws(self._local_draws), *(() if shared else (self._task,)), self._data)


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

    def kl_scope(self, site: str) -> Messenger:
        """Scale the KL of ``site`` by the annealed weight times the site's own weight (a handler
        to enter with ``with``)."""
        return kl_weighted(self.state.value(self.kl_weight) * self.site_weights.get(site, 1.0))


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
        """Score ``y`` and, in eval mode (predictions: :func:`pyromtl.predict.draw`), record
        ``outputs`` as a deterministic site; call inside :meth:`Plates.observations`.

        A training step skips the record: it adds nothing to the ELBO and its trip through the
        handler stack cost about 7% of a small model's step.
        """
        if not self.training:
            pyro.deterministic("outputs", outputs, event_dim=1)
        # The noise scales serve regression tasks only; reading the constrained parameter costs
        # a transform per step.
        noise = self.noise if "regression" in self.info.types else None
        pyro.sample("y", MultiTaskOutput(outputs, self.info, noise), obs=batch.y)
