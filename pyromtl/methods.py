"""The method registry: name -> builder of (model, guide), loss, defaults and priors.

Each method is a Pyro model in ``models/<name>.py`` with its guide in ``guides/<name>.py``;
this module only wires them to names. ``available()`` lists the names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyro
import torch
from pyro.infer import ELBO

from pyromtl.base import TrainState
from pyromtl.data.core import MultiTaskData
from pyromtl.infer.meanfield import MeanFieldELBO


def meanfield_elbo(method: "Method", cfg: dict[str, Any]) -> ELBO:
    """``TraceMeanField_ELBO`` (as :class:`~pyromtl.infer.meanfield.MeanFieldELBO`, which skips the
    log-densities its analytic KL terms replace): analytic KL wherever one is registered."""
    n = cfg["num_particles"]
    return MeanFieldELBO(num_particles=n, vectorize_particles=n > 1, max_plate_nesting=method.max_plate_nesting)


@dataclass(frozen=True)
class Method:
    """How to build and train one method.

    ``build(data, cfg, state, device)`` returns ``(model, guide)``, two PyroModules called with
    the same :class:`~pyromtl.data.core.Batch`. ``relatedness(model, guide)`` returns named
    task-by-task matrices (VMTL α and β, HIB noise distances, SMTL gates).
    """

    name: str
    summary: str
    paper: str
    build: Callable[[MultiTaskData, dict[str, Any], TrainState, torch.device], tuple[pyro.nn.PyroModule, pyro.nn.PyroModule]]
    defaults: dict[str, Any] = field(default_factory=dict)
    priors: dict[str, Any] = field(default_factory=dict)
    max_plate_nesting: int = 4
    settings: tuple[str, ...] = ("simo", "mimo")
    elbo: Callable[["Method", dict[str, Any]], ELBO] = meanfield_elbo
    relatedness: Callable[[Any, Any], dict[str, np.ndarray]] | None = None

    def check_data(self, data: MultiTaskData) -> None:
        if data.setting not in self.settings:
            raise ValueError(f"method {self.name!r} needs {' or '.join(s.upper() for s in self.settings)} data; "
                             f"{data.name!r} is {data.setting.upper()}")


_REGISTRY: dict[str, Method] = {}
_BUILTIN_LOADED: list[bool] = []


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def _load_builtin() -> None:
    if not _BUILTIN_LOADED:
        _BUILTIN_LOADED.append(True)
        _register_builtin()


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get(name: str) -> Method:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


# ---------------------------------------------------------------------------- built-in methods
LATENT_DEFAULTS: dict[str, Any] = {"latent_dim": 64, "hidden": [256], "activation": "elu", "per_task_encoder": False,
                                   "mc_z": 1, "mc_w": 1, "kl_weight_z": 1.0, "kl_weight_w": 1.0}


def build_latent(data: MultiTaskData, cfg: dict[str, Any], state: TrainState, device: torch.device):
    """Model and guide of the baseline family; they share the encoder and ``q(w)``."""
    from pyromtl.guides.baselines import LatentMTLGuide
    from pyromtl.models.baselines import ClassifierPosterior, LatentMTLModel
    from pyromtl.nn import GaussianEncoder

    info = data.info
    encoder = GaussianEncoder(info.num_tasks, info.input_dim, cfg["hidden"], cfg["latent_dim"], cfg["activation"],
                              per_task=cfg["per_task_encoder"]).to(device)
    w_post = ClassifierPosterior(info.num_tasks, info.out_dim, cfg["latent_dim"]).to(device)
    model = LatentMTLModel(data, cfg, state, encoder, w_post, device)
    guide = LatentMTLGuide(data, cfg, state, encoder, w_post, device)
    return model, guide


def build_vmtl(data: MultiTaskData, cfg: dict[str, Any], state: TrainState, device: torch.device):
    """VMTL (and VMTL-AC when ``amortized_classifier``): mixture priors over the other tasks."""
    from pyromtl.guides.vmtl import AmortizedClassifier, VMTLGuide
    from pyromtl.models.baselines import ClassifierPosterior
    from pyromtl.models.vmtl import ClassAttention, VMTLModel
    from pyromtl.nn import GaussianEncoder

    info = data.info
    encoder = GaussianEncoder(info.num_tasks, info.input_dim, cfg["hidden"], cfg["latent_dim"], cfg["activation"]).to(device)
    if cfg["amortized_classifier"]:
        w_post = AmortizedClassifier(data, encoder, cfg["hidden"], cfg["activation"], device,
                                     min_scale=cfg["ac_min_scale"]).to(device)
    else:
        w_post = ClassifierPosterior(info.num_tasks, info.out_dim, cfg["latent_dim"]).to(device)
    attention = ClassAttention(data, device, cfg["attention_max_mb"])
    model = VMTLModel(data, cfg, state, encoder, w_post, device, attention=attention)
    guide = VMTLGuide(data, cfg, state, encoder, w_post, device)
    return model, guide


def vmtl_relatedness(model, guide) -> dict[str, np.ndarray]:
    """Expected mixing weights: α (classifier prior, eq. 7) and β (representation prior, eq. 9)."""
    from pyromtl.priors import expected_weights

    out = {}
    for name, site in (("alpha", model.w_prior), ("beta", model.z_prior)):
        # Table 1 ablations give a site another prior kind: it has no mixing weights to report.
        if site.spec.kind == "task_mixture":
            out[name] = expected_weights(site).detach().cpu().numpy()
    return out


#: KL settings of every variational method (vstl, vbmtl, vmtl, vmtl-ac), so they compare fairly:
#: Bowman et al.'s linear warm-up, and z's KL at 0.1 because it adds d terms per sample against
#: one log-likelihood term and at full weight drowns it (measured: README, "What we found").
VARIATIONAL_KL: dict[str, Any] = {"kl_weight": {"start": 0.0, "end": 1.0, "steps": 200}, "kl_weight_z": 0.1}


def _register_builtin() -> None:
    point = {"z": "deterministic", "w": "deterministic"}
    normal = {"z": "normal", "w": "normal"}
    vmtl_paper = "Shen et al., Variational Multi-Task Learning with Gumbel-Softmax Priors, NeurIPS 2021"
    for name, per_task, priors, summary in (
        ("stl", True, point, "single-task learning: one encoder and head per task, maximum likelihood"),
        ("bmtl", False, point, "shared encoder with task heads, maximum likelihood"),
        ("vstl", True, normal, "variational STL: probabilistic z and w under N(0, I) priors"),
        ("vbmtl", False, normal, "variational BMTL: shared amortised q(z|x), q(w_t) under N(0, I) priors"),
    ):
        register(Method(name=name, summary=summary, paper=vmtl_paper + " (baselines)", build=build_latent,
                        defaults={**LATENT_DEFAULTS, **(VARIATIONAL_KL if priors is normal else {}),
                                  "per_task_encoder": per_task}, priors=dict(priors)))
    mixture = {"kind": "task_mixture", "weights": "gumbel_softmax",
               "temperature": {"start": 5.0, "end": 0.5, "rate": 5e-3}, "kl": "upper_bound"}
    vmtl_defaults = {**LATENT_DEFAULTS, **VARIATIONAL_KL, "mc_z": 10, "mc_w": 10, "amortized_classifier": False,
                     "ac_min_scale": 0.2,  # floor of the amortised classifier's scales (guides/vmtl.py)
                     "eval_samples": 2,  # each draw already averages L x M = 100 inner pairs
                     "attention_max_mb": 1024.0}
    for name, amortized, summary in (
        ("vmtl", False, "VMTL: Gumbel-Softmax mixture priors over the other tasks' posteriors for z and w"),
        ("vmtl-ac", True, "VMTL-AC: VMTL with an amortised classifier from per-class mean representations"),
    ):
        register(Method(name=name, summary=summary, paper=vmtl_paper, build=build_vmtl,
                        defaults={**vmtl_defaults, "amortized_classifier": amortized},
                        priors={"z": dict(mixture), "w": dict(mixture)}, settings=("mimo",),
                        relatedness=vmtl_relatedness))
