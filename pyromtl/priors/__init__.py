"""Declarative priors: a prior is a ``kind`` plus parameters, built by a registered function.

A spec is written as a :class:`PriorSpec`, a kind name, or a table (dict / TOML)::

    [priors.w]
    kind = "task_mixture"
    weights = "gumbel_softmax"
    temperature = { start = 5.0, end = 0.5, rate = 1e-3 }

:func:`parse_spec` validates it against the kind's defaults (unknown kinds and parameters fail
fast, naming the valid ones) and fills in the missing parameters, so a parsed spec is the fully
resolved prior. :func:`build` turns a spec plus a :class:`PriorContext` (the site's shapes, the
task count, the step, the mixture components) into a distribution. Models own one
:class:`PriorSite` per latent site, which holds the prior's learned parameters (e.g. VMTL's π,
eq. 7) as ordinary ``torch.nn.Parameter`` s.

The built-in kinds are listed in :data:`~pyromtl.priors.registry.BUILTIN_KINDS`:

* ``normal`` and ``learned_normal`` (:mod:`~pyromtl.priors.gaussian`), and ``deterministic``,
  a flat prior whose guide is a point mass;
* ``task_mixture`` (VMTL eq. 6, 7, 9; :mod:`~pyromtl.priors.mixture`);
* ``isotropic``, ``full_data`` and ``previous_batch``, BayesAgg-MTL's last-layer priors
  (:mod:`~pyromtl.priors.last_layer`);
* ``relaxed_bernoulli``, a Bayesian SMTL gate (:mod:`~pyromtl.priors.gates`).

New kinds are one decorated function away, see :func:`register`.
"""

from pyromtl.priors.mixture import MIXTURE_WEIGHTS, mixture_weights, other_tasks
from pyromtl.priors.registry import BUILTIN_KINDS, available, build, describe, parse_spec, register, uses_components
from pyromtl.priors.site import PriorSite
from pyromtl.priors.spec import PriorContext, PriorKind, PriorSpec

__all__ = [
    "BUILTIN_KINDS",
    "MIXTURE_WEIGHTS",
    "PriorContext",
    "PriorKind",
    "PriorSite",
    "PriorSpec",
    "available",
    "build",
    "describe",
    "mixture_weights",
    "other_tasks",
    "parse_spec",
    "register",
    "uses_components",
]
