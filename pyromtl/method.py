"""What a method declares about itself: :class:`Method` and the posterior sites it exports.

A method is a plug-in. Its declaration sits beside its code in ``models/<name>.py``::

    register(Method(name="vmtl", summary=..., paper=..., build=build_vmtl, options=VMTLOptions,
                    priors={"z": ..., "w": ...}, settings=("mimo",), relatedness=vmtl_relatedness,
                    export=(CLASSIFIER_EXPORT, ...)))

The core (trainer, Fit, diagnostics, CLI) reads only this declaration: it never names a
method's sites.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import torch
from pyro.infer import ELBO

from pyromtl.options import Options

if TYPE_CHECKING:
    from pyromtl.base import TrainState
    from pyromtl.data.core import MultiTaskData
    from pyromtl.objective import Objective


def meanfield_elbo(method: "Method", cfg: Mapping[str, Any]) -> ELBO:
    """``TraceMeanField_ELBO`` (as :class:`~pyromtl.infer.meanfield.MeanFieldELBO`, which skips the
    log-densities its analytic KL terms replace): analytic KL wherever one is registered."""
    from pyromtl.infer.meanfield import MeanFieldELBO

    n = cfg["num_particles"]
    return MeanFieldELBO(num_particles=n, vectorize_particles=n > 1, max_plate_nesting=method.max_plate_nesting)


def default_objective(method: "Method", cfg: Mapping[str, Any], model, guide) -> "Objective":
    from pyromtl.objective import Objective

    return Objective(method.elbo(method, cfg)(model, guide))


@dataclass(frozen=True)
class ExportSite:
    """A posterior quantity that ``to_arviz`` writes and the report shows.

    ``draw(model, guide, n)`` returns ``n`` draws, ``[n, *shape]`` (numpy or a tensor), with one
    named dim per entry of ``dims``, or ``None`` where the fitted configuration lacks the site
    (e.g. an ablation without mixing weights). ``coords(data, shape)`` may name the coordinates of dims
    the core does not know (``task``, ``other_task`` and ``obs`` it does).
    """

    name: str
    dims: tuple[str, ...]
    draw: Callable[[Any, Any, int], Any | None]
    coords: Callable[["MultiTaskData", tuple[int, ...]], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Method:
    """How to build, train and inspect one method.

    :param build: ``build(data, cfg, state, device) -> (model, guide)``, two PyroModules called
        with the same :class:`~pyromtl.data.core.Batch`.
    :param options: the method's options dataclass (keys, types, defaults);
        ``config.resolve`` validates every key against it and :class:`~pyromtl.options.TrainOptions`.
    :param overrides: this method's values for keys of either dataclass (e.g. stl's
        ``per_task_encoder = true``).
    :param priors: the latent sites and their default prior specs.
    :param settings: the data settings it supports (``simo``, ``mimo``).
    :param min_tasks: the fewest tasks it can learn (VMTL's priors mix the *other* tasks: 2).
    :param max_plate_nesting: plates its model nests (2: ``task`` and ``data``).
    :param elbo: ``elbo(method, cfg) -> ELBO`` (default: :func:`meanfield_elbo`).
    :param objective: ``objective(method, cfg, model, guide) -> Objective``, what the trainer
        calls each step (default: the ELBO and ``backward()``).
    :param relatedness: ``relatedness(model, guide) -> {name: [T, T] array}``.
    :param relatedness_titles: a title per relatedness matrix, for plots and reports.
    :param export: the posterior sites diagnostics export.
    :param prepare_data: ``prepare_data(data, cfg) -> data``, run on the loaded data before
        training and on reload (e.g. carve an extra split out of val); ``None`` keeps it as is.
    :param export_pruned: ``export_pruned(fit) -> nn.Module``, a plain module holding only what
        the fitted method uses at inference (``Fit.export_pruned``); ``None`` if it has none.
    :param extra: ``extra(fit) -> dict``, method-specific results (JSON values) that
        ``metrics.json`` keeps under ``"extra"`` (e.g. a clustering criterion).
    :param plots: ``plots(doc) -> {filename: Figure or zero-argument function returning one}``,
        extra figures for the run's ``plots/``, drawn from its ``metrics.json`` document ``doc``;
        a name the core also draws replaces the core's figure. A function is called only when
        its file is written (``pyromtl report`` redraws missing plots only).
    """

    name: str
    summary: str
    paper: str
    build: Callable[["MultiTaskData", dict[str, Any], "TrainState", torch.device], tuple[Any, Any]]
    options: type[Options] = Options
    overrides: Mapping[str, Any] = field(default_factory=dict)
    priors: Mapping[str, Any] = field(default_factory=dict)
    settings: tuple[str, ...] = ("simo", "mimo")
    min_tasks: int = 1
    max_plate_nesting: int = 2
    elbo: Callable[["Method", Mapping[str, Any]], ELBO] = meanfield_elbo
    objective: Callable[..., "Objective"] = default_objective
    relatedness: Callable[[Any, Any], dict[str, np.ndarray]] | None = None
    relatedness_titles: Mapping[str, str] = field(default_factory=dict)
    export: tuple[ExportSite, ...] = ()
    prepare_data: Callable[["MultiTaskData", Mapping[str, Any]], "MultiTaskData"] | None = None
    export_pruned: Callable[[Any], torch.nn.Module] | None = None
    extra: Callable[[Any], dict[str, Any]] | None = None
    plots: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        """The method's option defaults (its dataclass's, then :attr:`overrides`), fresh copies."""
        return {**self.options.defaults(), **{k: _copy(v) for k, v in self.overrides.items()}}

    def prepare(self, data: "MultiTaskData", cfg: Mapping[str, Any]) -> "MultiTaskData":
        """``data`` as this method trains on it (:attr:`prepare_data`, if declared)."""
        return data if self.prepare_data is None else self.prepare_data(data, cfg)

    def check_data(self, data: "MultiTaskData") -> None:
        """Refuse data the method cannot learn (its setting, too few tasks), naming the problem."""
        if data.setting not in self.settings:
            raise ValueError(f"method {self.name!r} needs {' or '.join(s.upper() for s in self.settings)} data; "
                             f"{data.name!r} is {data.setting.upper()}")
        if data.num_tasks < self.min_tasks:
            raise ValueError(f"method {self.name!r} needs at least {self.min_tasks} tasks; {data.name!r} has "
                             f"{data.num_tasks}")


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else list(value) if isinstance(value, list) else value
