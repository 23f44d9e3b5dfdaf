"""``MeanFieldELBO``: Pyro's ``TraceMeanField_ELBO`` that evaluates only the terms its loss uses.

``TraceMeanField_ELBO`` builds its traces with ``get_importance_trace``, which scores *every*
site: the model's log-density of each latent under its prior and the guide's log-density of
each draw, before the loss replaces those latents by analytic KL terms. For VMTL that wasted
work is the exact log-density of the mixture priors, e.g. ``[L, 1, T, B, T, d]`` for ``z``, more
than the whole KL bound costs. Its ``differentiable_loss`` also reads the loss back to the host
twice per call (``.item()``) and checks it for NaN (more device syncs).

This subclass computes the same estimator with the same gradients:

* the observed sites' log-likelihoods (a ``pyro.deterministic`` record scores 0 and is skipped);
* ``kl_divergence(guide, prior)`` where one is registered (scaled and masked by the guide site);
* otherwise, for that site only, the Monte-Carlo term ``log p(z) - log q(z)`` (entropy part of the
  guide's score, so reparameterised guides only, as ``TraceMeanField_ELBO`` requires);

and scores nothing else. Without validation it runs the guide and the model under one small
messenger each (``_Sites``) instead of ``poutine.trace`` and ``poutine.replay``: the same sites
in the same handler order, without the trace graphs, their copies and the subsample sites the
ELBO would prune. With validation on (``pyro.enable_validation``) every site is still
scored, for Pyro's model/guide and shape checks, and the NaN warning is kept. Use it wherever
``TraceMeanField_ELBO`` is used::

    loss_fn = MeanFieldELBO(num_particles=n, vectorize_particles=n > 1, max_plate_nesting=4)(model, guide)
"""

from __future__ import annotations

from typing import Any

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.trace_mean_field_elbo import _check_mean_field_requirement
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape, warn_if_nan
from torch.distributions import kl_divergence

__all__ = ["MeanFieldELBO"]


def _scored(site) -> bool:
    """An observed site whose log-likelihood counts: not a ``pyro.deterministic`` record (log p = 0)."""
    return site["is_observed"] and not site["infer"].get("_deterministic", False)


def _log_prob_sum(site) -> torch.Tensor:
    """A site's scaled, masked log-density at its value, summed (cached in the site, as
    :meth:`pyro.poutine.Trace.compute_log_prob` caches it)."""
    if "log_prob_sum" not in site:
        log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        site["log_prob_sum"] = scale_and_mask(log_p, site["scale"], site["mask"]).sum()
    return site["log_prob_sum"]


def _entropy_term(site) -> torch.Tensor:
    """The scaled, masked entropy part of a guide site's score (``-log q`` for reparameterised draws)."""
    if "score_parts" not in site:
        parts = site["fn"].score_parts(site["value"], *site["args"], **site["kwargs"])
        site["score_parts"] = parts.scale_and_mask(site["scale"], site["mask"])
    return site["score_parts"].entropy_term


class _Sites(Messenger):
    """The sample sites of one run, by name: what ``poutine.trace`` records and the ELBO reads,
    without the trace's graph, copies and subsample sites. With ``replay``, the model's latent
    sites take the guide's values (``poutine.replay``).

    Entered outermost, as ``poutine.trace(poutine.replay(model, guide_trace))`` is, so every
    handler of the model or guide sees each site as it would under Pyro's own handlers.
    """

    def __init__(self, replay: dict[str, Any] | None = None):
        super().__init__()
        self.nodes: dict[str, Any] = {}
        self.replay = replay

    def _pyro_sample(self, msg) -> None:
        guide_site = self.replay.get(msg["name"]) if self.replay is not None else None
        if guide_site is not None and not msg["is_observed"]:
            msg["done"] = True
            msg["value"] = guide_site["value"]
            msg["infer"] = guide_site["infer"]

    def _pyro_post_sample(self, msg) -> None:
        if msg["infer"].get("_do_not_trace") or site_is_subsample(msg):
            return
        self.nodes[msg["name"]] = msg


class MeanFieldELBO(TraceMeanField_ELBO):
    """Mean-field ELBO with analytic KLs that scores only the sites its loss needs (see module doc)."""

    def _get_trace(self, model, guide, args, kwargs):
        if not is_validation_enabled():
            with _Sites() as guide_sites:
                guide(*args, **kwargs)
            with _Sites(replay=guide_sites.nodes) as model_sites:
                model(*args, **kwargs)
            return model_sites, guide_sites
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace), graph_type="flat").get_trace(
            *args, **kwargs
        )
        check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        # Pyro's shape checks read every site's log-density: paid for only when validating.
        model_trace.compute_log_prob()
        guide_trace.compute_score_parts()
        for trace in (model_trace, guide_trace):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    check_site_shape(site, self.max_plate_nesting)
        check_if_enumerated(guide_trace)
        _check_mean_field_requirement(model_trace, guide_trace)
        return model_trace, guide_trace

    def _particle_elbo(self, model_trace, guide_trace) -> torch.Tensor | float:
        elbo: torch.Tensor | float = 0.0  # a float only when the traces have no sample sites
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                if _scored(site):
                    elbo = elbo + _log_prob_sum(site)
                continue
            guide_site = guide_trace.nodes[name]
            if is_validation_enabled():
                check_fully_reparametrized(guide_site)
            try:
                kl = kl_divergence(guide_site["fn"], site["fn"])
            except NotImplementedError:
                # no closed form: Monte-Carlo log p(z) - log q(z) at the guide's draw
                elbo = elbo + _log_prob_sum(site) - _entropy_term(guide_site).sum()
                continue
            kl = scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])
            if torch.is_tensor(kl):
                elbo = elbo - kl.sum()
            else:
                elbo = elbo - kl * guide_site["fn"].batch_shape.numel()
        # auxiliary guide sites (not in the model) contribute their entropy
        for name, guide_site in guide_trace.nodes.items():
            if guide_site["type"] == "sample" and name not in model_trace.nodes:
                assert guide_site["infer"].get("is_auxiliary")
                if is_validation_enabled():
                    check_fully_reparametrized(guide_site)
                elbo = elbo - _entropy_term(guide_site).sum()
        return elbo

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor | float:
        """The negative ELBO as a differentiable tensor, without reading it back to the host.

        Args:
            model: the Pyro model.
            guide: the Pyro guide.
            args, kwargs: passed to both (e.g. the batch).

        Returns:
            The negative ELBO averaged over ``num_particles`` particles (a float only when the
            traces have no sample sites).
        """
        loss: torch.Tensor | float = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss = loss - self._particle_elbo(model_trace, guide_trace) / self.num_particles
        if is_validation_enabled():
            # pyro's stub takes numbers.Number, which float is only at runtime (ABC registration)
            warn_if_nan(loss, "loss")  # type: ignore[arg-type]
        return loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The negative ELBO as a number, computed without gradients.

        Args:
            model: the Pyro model.
            guide: the Pyro guide.
            args, kwargs: passed to both (e.g. the batch).

        Returns:
            The negative ELBO.
        """
        with torch.no_grad():
            loss = self.differentiable_loss(model, guide, *args, **kwargs)
        return float(loss)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The negative ELBO as a number, after back-propagating it into the parameters' gradients.

        Args:
            model: the Pyro model.
            guide: the Pyro guide.
            args, kwargs: passed to both (e.g. the batch).

        Returns:
            The negative ELBO.
        """
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return float(loss.detach()) if torch.is_tensor(loss) else float(loss)
