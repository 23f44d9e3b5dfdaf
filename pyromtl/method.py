"""What a method declares about itself (:class:`Method`), the posterior sites it exports
(:class:`ExportSite`), and the one object its callbacks are given (:class:`MethodContext`).

A method is a plug-in. Its declaration sits beside its code in ``models/<name>.py``::

    METHODS = (Method(name="vmtl", summary=..., paper=..., build=build_vmtl, options=VMTLOptions,
                      priors={"z": ..., "w": ...}, settings=("mimo",), relatedness=vmtl_relatedness,
                      export=(CLASSIFIER_EXPORT, ...)),)

and :mod:`pyromtl.methods` lists the built-in modules. The core (trainer, Fit, diagnostics, CLI)
reads only this declaration: it never names a method's sites.

Every callback takes a :class:`MethodContext`: the method, the resolved config, the data, the
device and training state, and, once they exist, the model and guide, the training history and
the ``metrics.json`` document. A callback reads what its phase provides (see each field).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pyro.infer import ELBO

from pyromtl.data.core import MultiTaskData
from pyromtl.infer.meanfield import MeanFieldELBO
from pyromtl.nn import Backbone
from pyromtl.objective import Objective
from pyromtl.options import Options
from pyromtl.schedules import TrainState


class MethodContext:
    """What a method's callbacks are given. Each field exists from a phase of the run on:

    * ``method``, ``config`` (the resolved config), ``device`` and ``state`` always;
    * ``backbone`` (:class:`~pyromtl.nn.Backbone`, the network in front of the method's own parts)
      where the run resolved it (``build``);
    * ``data`` from the data's preparation on (``prepare_data`` gets the loaded data, every later
      callback the prepared data);
    * ``model`` and ``guide`` once ``build`` returned them (``objective``, ``relatedness``,
      ``extra``, ``export_pruned`` and the export sites' ``draw``);
    * ``history`` (the training history, possibly empty) for ``extra``; ``doc`` (the run's
      ``metrics.json``) for ``plots``, which draw from a run directory's files alone.

    Reading ``data``, ``model``, ``guide`` or ``doc`` where the phase lacks it raises
    ``RuntimeError`` naming it.
    """

    __slots__ = ("_backbone", "_data", "_doc", "_guide", "_model", "config", "device", "history", "method", "state")

    def __init__(
        self,
        method: Method,
        config: Mapping[str, Any],
        *,
        device: torch.device | None = None,
        state: TrainState | None = None,
        data: MultiTaskData | None = None,
        model: Any = None,
        guide: Any = None,
        history: Sequence[Mapping[str, float]] = (),
        doc: Mapping[str, Any] | None = None,
        backbone: Backbone | None = None,
    ):
        self.method = method
        self.config = config
        self.device = device if device is not None else torch.device("cpu")
        self.state = state if state is not None else TrainState()
        self.history = history
        self._data, self._model, self._guide, self._doc = data, model, guide, doc
        self._backbone = backbone

    def __repr__(self) -> str:
        return f"MethodContext({self.method.name!r}, device={self.device.type!r}, step={self.state.step})"

    def _need(self, value: Any, name: str) -> Any:
        if value is None:
            raise RuntimeError(
                f"method {self.method.name!r} read ctx.{name}, which this phase of the run does not "
                "provide (see pyromtl.method.MethodContext)"
            )
        return value

    @property
    def data(self) -> MultiTaskData:
        """The data: the loaded data for ``prepare_data``, the prepared data afterwards.

        Raises:
            RuntimeError: this phase of the run does not provide it.
        """
        return self._need(self._data, "data")

    @property
    def model(self) -> Any:
        """The model ``build`` returned.

        Raises:
            RuntimeError: this phase of the run does not provide it.
        """
        return self._need(self._model, "model")

    @property
    def guide(self) -> Any:
        """The guide ``build`` returned.

        Raises:
            RuntimeError: this phase of the run does not provide it.
        """
        return self._need(self._guide, "guide")

    @property
    def doc(self) -> Mapping[str, Any]:
        """The run's ``metrics.json`` document (for ``plots``).

        Raises:
            RuntimeError: this phase of the run does not provide it.
        """
        return self._need(self._doc, "doc")

    @property
    def backbone(self) -> Backbone:
        """The network in front of the method's own parts (for ``build``).

        Raises:
            RuntimeError: this phase of the run does not provide it.
        """
        return self._need(self._backbone, "backbone")

    def replace(self, **changes: Any) -> MethodContext:
        """A copy with ``changes`` to the keyword fields (``data=``, ``model=``, ``guide=``, ...).

        Args:
            changes: new values of keyword fields.

        Returns:
            The new context; this one is unchanged.

        Raises:
            TypeError: a name that is not a keyword field.
        """
        fields = {
            "device": self.device,
            "state": self.state,
            "data": self._data,
            "model": self._model,
            "guide": self._guide,
            "history": self.history,
            "doc": self._doc,
            "backbone": self._backbone,
        }
        if unknown := sorted(set(changes) - set(fields)):
            raise TypeError(f"MethodContext has no field(s) {unknown}")
        return MethodContext(self.method, self.config, **{**fields, **changes})

    def relatedness(self) -> dict[str, np.ndarray]:
        """The method's task-by-task matrices (``Method.relatedness``), as numpy; empty if it declares none.

        Returns:
            ``{name: [T, T] array}``, computed without gradients.

        Raises:
            RuntimeError: the method reads a field this context lacks (e.g. ``model``).
        """
        if self.method.relatedness is None:
            return {}
        with torch.no_grad():
            return {k: np.asarray(v) for k, v in self.method.relatedness(self).items()}


def meanfield_elbo(ctx: MethodContext) -> ELBO:
    """``TraceMeanField_ELBO`` (as :class:`~pyromtl.infer.meanfield.MeanFieldELBO`, which skips the
    log-densities its analytic KL terms replace): analytic KL wherever one is registered.

    Args:
        ctx: the context; its config's ``num_particles`` sets the particles (vectorised above 1).

    Returns:
        The ELBO.
    """
    n = ctx.config["num_particles"]
    return MeanFieldELBO(num_particles=n, vectorize_particles=n > 1, max_plate_nesting=ctx.method.max_plate_nesting)


def default_objective(ctx: MethodContext) -> Objective:
    """The method's ELBO of the context's model and guide, and ``backward()``.

    Args:
        ctx: the context, with ``model`` and ``guide``.

    Returns:
        An :class:`~pyromtl.objective.Objective` wrapping ``ctx.method.elbo(ctx)``'s loss.

    Raises:
        RuntimeError: ``ctx`` has no model or guide yet.
    """
    return Objective(ctx.method.elbo(ctx)(ctx.model, ctx.guide))


@dataclass(frozen=True)
class ExportSite:
    """A posterior quantity that ``to_arviz`` writes and the report shows.

    ``draw(ctx, n)`` returns ``n`` draws, ``[n, *shape]`` (numpy or a tensor), with one named dim
    per entry of ``dims``, or ``None`` where the fitted configuration lacks the site (e.g. an
    ablation without mixing weights). ``coords(data, shape)`` may name the coordinates of dims the
    core does not know (``task``, ``other_task`` and ``obs`` it does).
    """

    name: str
    dims: tuple[str, ...]
    draw: Callable[[MethodContext, int], Any]
    coords: Callable[[MultiTaskData, tuple[int, ...]], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Method:
    """How to build, train and inspect one method. Every callback takes a :class:`MethodContext`.

    :param build: ``build(ctx) -> (model, guide)``, two PyroModules called with the same
        :class:`~pyromtl.data.core.Batch`.
    :param options: the method's options dataclass (keys, types, defaults);
        ``config.resolve`` validates every key against it and :class:`~pyromtl.options.TrainOptions`.
    :param overrides: this method's values for keys of either dataclass (e.g. stl's
        ``per_task_encoder = true``).
    :param priors: the latent sites and their default prior specs.
    :param settings: the data settings it supports (``simo``, ``mimo``).
    :param min_tasks: the fewest tasks it can learn (VMTL's priors mix the *other* tasks: 2).
    :param max_plate_nesting: plates its model nests (2: ``task`` and ``data``).
    :param elbo: ``elbo(ctx) -> ELBO`` (default: :func:`meanfield_elbo`).
    :param objective: ``objective(ctx) -> Objective``, what the trainer calls each step (default:
        the ELBO of ``ctx.model`` and ``ctx.guide`` and ``backward()``).
    :param relatedness: ``relatedness(ctx) -> {name: [T, T] array}``.
    :param relatedness_titles: a title per relatedness matrix, for plots and reports.
    :param export: the posterior sites diagnostics export.
    :param prepare_data: ``prepare_data(ctx) -> data``, run on the loaded data (``ctx.data``)
        before training and on reload (e.g. carve an extra split out of val); ``None`` keeps it.
    :param export_pruned: ``export_pruned(ctx) -> nn.Module``, a plain module holding only what
        the fitted method uses at inference (``Fit.export_pruned``); ``None`` if it has none.
    :param extra: ``extra(ctx) -> dict``, method-specific results (JSON values) that
        ``metrics.json`` keeps under ``"extra"`` (e.g. a clustering criterion).
    :param plots: ``plots(ctx) -> {filename: Figure or zero-argument function returning one}``,
        extra figures for the run's ``plots/``, drawn from its ``metrics.json`` document
        ``ctx.doc``; a name the core also draws replaces the core's figure. A function is called
        only when its file is written (``pyromtl report`` redraws missing plots only).
    """

    name: str
    summary: str
    paper: str
    build: Callable[[MethodContext], tuple[Any, Any]]
    options: type[Options] = Options
    overrides: Mapping[str, Any] = field(default_factory=dict)
    priors: Mapping[str, Any] = field(default_factory=dict)
    settings: tuple[str, ...] = ("simo", "mimo")
    min_tasks: int = 1
    max_plate_nesting: int = 2
    elbo: Callable[[MethodContext], ELBO] = meanfield_elbo
    objective: Callable[[MethodContext], Objective] = default_objective
    relatedness: Callable[[MethodContext], Mapping[str, Any]] | None = None
    relatedness_titles: Mapping[str, str] = field(default_factory=dict)
    export: tuple[ExportSite, ...] = ()
    prepare_data: Callable[[MethodContext], MultiTaskData] | None = None
    export_pruned: Callable[[MethodContext], torch.nn.Module] | None = None
    extra: Callable[[MethodContext], dict[str, Any]] | None = None
    plots: Callable[[MethodContext], dict[str, Any]] | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        """The method's option defaults (its dataclass's, then ``overrides``), fresh copies."""
        return {**self.options.defaults(), **{k: _copy(v) for k, v in self.overrides.items()}}

    def prepare(self, ctx: MethodContext) -> MultiTaskData:
        """``ctx.data`` as this method trains on it (``prepare_data``, if declared).

        Args:
            ctx: the context, with the loaded data.

        Returns:
            The data to train on.

        Raises:
            RuntimeError: ``ctx`` has no data.
        """
        return ctx.data if self.prepare_data is None else self.prepare_data(ctx)

    def check_data(self, data: MultiTaskData) -> None:
        """Refuse data the method cannot learn (its setting, too few tasks), naming the problem.

        Args:
            data: the data to check.

        Raises:
            ValueError: a setting the method does not support, or fewer than ``min_tasks`` tasks.
        """
        if data.setting not in self.settings:
            raise ValueError(
                f"method {self.name!r} needs {' or '.join(s.upper() for s in self.settings)} data; "
                f"{data.name!r} is {data.setting.upper()}"
            )
        if data.num_tasks < self.min_tasks:
            raise ValueError(
                f"method {self.name!r} needs at least {self.min_tasks} tasks; {data.name!r} has {data.num_tasks}"
            )


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else list(value) if isinstance(value, list) else value
