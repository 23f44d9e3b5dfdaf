"""The prior of one latent site: :class:`PriorSite`, owned by a model, holding the prior's learned parameters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin
from torch.distributions import constraints

from pyromtl.params import LocalParamsModule
from pyromtl.priors.registry import build_parsed, parse_spec
from pyromtl.priors.spec import PriorContext, PriorSpec
from pyromtl.schedules import TrainState


def _transform_to(constraint: constraints.Constraint) -> torch.distributions.Transform:
    """``transform_to(constraint)``, with ``exp`` alone for ``positive``.

    torch maps ``positive`` through ``exp`` and then the identity ``0 + 1·x``: the same values,
    two more ops and autograd nodes on every use.
    """
    if constraint is constraints.positive:
        return torch.distributions.ExpTransform()
    return torch.distributions.transform_to(constraint)


class PriorSite(LocalParamsModule):
    """The prior of one latent site, owned by a model; builds a distribution per call.

    Learned prior parameters (``learned_normal``'s loc/scale, ``task_mixture``'s logits π) are
    created lazily on the first :meth:`build` as ``torch.nn.Parameter`` s in ``params``, so
    they appear in ``parameters()`` and ``state_dict()``. Build optimisers after one dry-run
    call. ``load_state_dict`` also creates parameters it finds in the state dict and does not hold
    yet, so a checkpoint loads into a fresh site (the trainer's dry run beforehand is harmless).

    :param site: the latent site's name.
    :param spec: its prior spec (anything :func:`parse_spec` takes).
    :param device: default device for new tensors (follows ``.to()``); a build's components or an
        explicit ``device=`` take precedence.

    Raises:
        ValueError: a spec :func:`parse_spec` refuses.
    """

    def __init__(self, site: str, spec: PriorSpec | str | Mapping[str, Any], device: torch.device | str | None = None):
        super().__init__()
        self.site = site
        self.spec = parse_spec(spec)
        self.params = torch.nn.ParameterDict()
        self._transforms: dict[str, torch.distributions.Transform] = {}
        self.constants: dict[tuple, torch.Tensor] = {}  # PriorContext.full's, by shape, value, device, dtype
        # An empty buffer that moves with .to(): the device for priors without components.
        self.register_buffer("_anchor", torch.empty(0, device=device), persistent=False)
        self.num_tasks: int | None = None

    def param(
        self, name: str, init: torch.Tensor, constraint: constraints.Constraint = constraints.real
    ) -> torch.Tensor:
        """See :meth:`PriorContext.param`.

        Args:
            name: the parameter's name within the site.
            init: its initial (constrained) value, which also fixes its shape.
            constraint: the constraint the returned value satisfies.

        Returns:
            The constrained value.

        Raises:
            ValueError: the stored parameter's shape differs from ``init``'s.
        """
        transform = self._transforms.get(name)
        if transform is None:
            transform = self._transforms[name] = _transform_to(constraint)
        if name not in self.params:
            with torch.no_grad():
                self.params[name] = torch.nn.Parameter(transform.inv(init.detach()).clone())
        raw = self.params[name]
        if raw.shape != init.shape:
            raise ValueError(
                f"prior parameter {self.site}.{name} has shape {tuple(raw.shape)} but {tuple(init.shape)} is asked; "
                "did the number of tasks or the latent size change?"
            )
        return transform(raw)

    def context(
        self,
        *,
        batch_shape: tuple[int, ...] | torch.Size,
        event_shape: tuple[int, ...] | torch.Size,
        num_tasks: int,
        state: TrainState | None = None,
        components: tuple[torch.Tensor, torch.Tensor] | None = None,
        task_axis: int | None = None,
        device: torch.device | str | None = None,
        extras: Mapping[str, Any] | None = None,
    ) -> PriorContext:
        """The :class:`PriorContext` of one build, owned by this site.

        ``state`` is the model's :class:`~pyromtl.schedules.TrainState`: the context's ``step`` and
        ``total_steps``, for annealed prior parameters (step 0 of a run of unknown length if None).

        Args:
            batch_shape: the site's batch shape.
            event_shape: the site's event shape.
            num_tasks: the number of tasks T.
            state: the model's training state, or None.
            components: the mixture components ``(loc, scale)``, for kinds that use them.
            task_axis: the dim of ``batch_shape`` that indexes the tasks (default: the first).
            device: the device of new tensors (by default the components', else the site's).
            extras: anything else a kind reads.

        Returns:
            The context.
        """
        if device is None and components is None:
            device = self._anchor.device
        step, total = (state.step, state.total_steps) if state is not None else (0, None)
        return PriorContext(
            self.site,
            torch.Size(batch_shape),
            torch.Size(event_shape),
            num_tasks,
            step=step,
            total_steps=total,
            components=components,
            task_axis=task_axis,
            device=torch.device(device) if isinstance(device, str) else device,
            owner=self,
            extras=dict(extras or {}),
        )

    def build(self, **context: Any) -> TorchDistributionMixin:
        """Build the prior; keyword arguments as in :meth:`context`.

        Args:
            context: as in :meth:`context`.

        Returns:
            The prior distribution, with the context's batch and event shapes.

        Raises:
            ValueError: a built prior whose shapes differ from the site's, or what the kind's
                builder refuses.
        """
        ctx = self.context(**context)
        if self.num_tasks != ctx.num_tasks:  # a module attribute write costs ~15 us a step
            self.num_tasks = ctx.num_tasks
        return build_parsed(self.spec, ctx)  # parsed in __init__: skip re-validating it every step

    def forward(self, **context: Any) -> TorchDistributionMixin:
        return self.build(**context)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Create lazily-made parameters that a checkpoint holds, so strict loading works before
        # the first build; the ParameterDict's own loader then copies the values in.
        head = prefix + "params."
        for key, value in state_dict.items():
            name = key[len(head) :] if key.startswith(head) else ""
            if name and "." not in name and name not in self.params:
                self.params[name] = torch.nn.Parameter(torch.empty_like(value, device=self._anchor.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
