"""``MeanFieldELBO``: Pyro's ``TraceMeanField_ELBO`` that evaluates only the terms its loss uses.

``TraceMeanField_ELBO`` builds its traces with ``get_importance_trace``, which scores *every*
site: the model's log-density of each latent under its prior and the guide's log-density of
each draw, before the loss replaces those latents by analytic KL terms. For VMTL that wasted
work is the exact log-density of the mixture priors, e.g. ``[L, 1, T, B, T, d]`` for ``z``, more
than the whole KL bound costs. Its ``differentiable_loss`` also reads the loss back to the host
twice per call (``.item()``) and checks it for NaN (more device syncs).

This subclass computes the same estimator with the same gradients:

* the observed sites' log-likelihoods;
* ``kl_divergence(guide, prior)`` where one is registered (scaled and masked by the guide site);
* otherwise, for that site only, the Monte-Carlo term ``log p(z) - log q(z)`` (entropy part of the
  guide's score, so reparameterised guides only, as ``TraceMeanField_ELBO`` requires);

and scores nothing else. With validation on (``pyro.enable_validation``) every site is still
scored, for Pyro's model/guide and shape checks, and the NaN warning is kept. Use it wherever
``TraceMeanField_ELBO`` is used::

    loss_fn = MeanFieldELBO(num_particles=n, vectorize_particles=n > 1, max_plate_nesting=4)(model, guide)
"""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.trace_mean_field_elbo import _check_mean_field_requirement
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape, warn_if_nan
from torch.distributions import kl_divergence

__all__ = ["MeanFieldELBO"]


def _only(name: str):
    return lambda site_name, site: site_name == name


def _entropy_term(site) -> torch.Tensor:
    """The scaled, masked entropy part of a guide site's score (``-log q`` for reparameterised draws)."""
    if "score_parts" not in site:
        parts = site["fn"].score_parts(site["value"], *site["args"], **site["kwargs"])
        site["score_parts"] = parts.scale_and_mask(site["scale"], site["mask"])
    return site["score_parts"].entropy_term


class MeanFieldELBO(TraceMeanField_ELBO):
    """Mean-field ELBO with analytic KLs that scores only the sites its loss needs (see module doc)."""

    def _get_trace(self, model, guide, args, kwargs):
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace), graph_type="flat").get_trace(
            *args, **kwargs
        )
        validate = is_validation_enabled()
        if validate:
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        if validate:
            # Pyro's shape checks read every site's log-density: pay for it only when validating.
            model_trace.compute_log_prob()
            guide_trace.compute_score_parts()
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        check_site_shape(site, self.max_plate_nesting)
            check_if_enumerated(guide_trace)
            _check_mean_field_requirement(model_trace, guide_trace)
        else:
            model_trace.compute_log_prob(site_filter=lambda name, site: site["is_observed"])
        return model_trace, guide_trace

    def _particle_elbo(self, model_trace, guide_trace) -> torch.Tensor | float:
        elbo: torch.Tensor | float = 0.0  # a float only when the traces have no sample sites
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                elbo = elbo + site["log_prob_sum"]
                continue
            guide_site = guide_trace.nodes[name]
            if is_validation_enabled():
                check_fully_reparametrized(guide_site)
            try:
                kl = kl_divergence(guide_site["fn"], site["fn"])
            except NotImplementedError:
                # no closed form: Monte-Carlo log p(z) - log q(z) at the guide's draw
                model_trace.compute_log_prob(site_filter=_only(name))
                elbo = elbo + site["log_prob_sum"] - _entropy_term(guide_site).sum()
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
