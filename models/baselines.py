"""The baselines STL / BMTL / VSTL / VBMTL of the VMTL paper (§4): the core latent model
(:mod:`pyromtl.latent`, model and guide) under four configurations.

========  ==========================  ==========================
method    encoder                     priors of z and w
========  ==========================  ==========================
``stl``   one per task                ``deterministic`` (ML point)
``bmtl``  shared                      ``deterministic``
``vstl``  one per task                ``normal`` N(0, I)
``vbmtl`` shared                      ``normal`` N(0, I)
========  ==========================  ==========================

A ``deterministic`` prior is flat, and the guide then uses a point mass (``Delta``), so the
ELBO reduces to the log-likelihood at that point; any other prior gets a diagonal Gaussian
posterior.
"""

from __future__ import annotations

from pyromtl.latent import CLASSIFIER_EXPORT, VMTL_PAPER, LatentOptions, build_latent, tempered
from pyromtl.method import Method

_POINT = {"z": "deterministic", "w": "deterministic"}
_NORMAL = {"z": "normal", "w": "normal"}

METHODS: tuple[Method, ...] = tuple(
    Method(
        name=name,
        summary=summary,
        paper=VMTL_PAPER + " (baselines)",
        build=build_latent,
        options=LatentOptions,
        overrides={**kl, "per_task_encoder": per_task},
        priors=dict(priors),
        export=(CLASSIFIER_EXPORT,),
    )
    for name, per_task, priors, kl, summary in (
        ("stl", True, _POINT, {}, "single-task learning: one encoder and head per task, maximum likelihood"),
        ("bmtl", False, _POINT, {}, "shared encoder with task heads, maximum likelihood"),
        ("vstl", True, _NORMAL, tempered(1e-4), "variational STL: probabilistic z and w under N(0, I) priors"),
        (
            "vbmtl",
            False,
            _NORMAL,
            tempered(1e-7),
            "variational BMTL: shared amortised q(z|x), q(w_t) under N(0, I) priors",
        ),
    )
)
