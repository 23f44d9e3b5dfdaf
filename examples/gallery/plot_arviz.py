"""
A run in ArviZ
==============

:meth:`pyromtl.Fit.to_arviz` returns an ArviZ DataTree with the groups ``posterior`` (the
latents' summaries and the deterministic sites, such as VMTL's mixture weights), ``posterior_predictive``,
``log_likelihood`` and ``observed_data``, with dimensions named ``task``, ``other_task``,
``class`` and ``latent_dim``. A saved run holds the same tree in ``posterior.nc``.

The full run, then the file:

.. code-block:: bash

    pyromtl fit vmtl --data digits-domains --seed 0 --out runs/vmtl
    python -c "import arviz as az; print(az.summary(az.from_netcdf('runs/vmtl/posterior.nc')))"
"""

# %%
# Fit and export
# --------------
import arviz as az

import pyromtl

# a smaller network and fewer Monte-Carlo draws than the defaults, so this page builds quickly
fit = pyromtl.fit("vmtl", "digits-domains", seed=0, hidden=[64], latent_dim=16, mc_z=2, mc_w=2, quiet=True)
tree = fit.to_arviz()
print(tree)

# %%
# Posterior summary
# -----------------
# :func:`arviz.summary` over the posterior group: SVI gives independent draws (one chain), so
# the MCMC diagnostics (R-hat, ESS) say little here; the means and intervals are the point.
print(az.summary(tree, var_names=["z_weights"], kind="stats"))

# %%
# A forest plot of the mixture weights
# ------------------------------------
# ``z_weights`` are the Gumbel-Softmax draws of each task's mixture weights over the other
# tasks (their mean is the α of :meth:`pyromtl.Fit.relatedness`), with credible intervals.
pc = az.plot_forest(tree, var_names=["z_weights"])

# %%
# Leave-one-out cross-validation
# ------------------------------
# The ``log_likelihood`` group makes :func:`arviz.loo` (PSIS-LOO) work, and with it
# :func:`arviz.compare` across methods fitted on the same data. After so short a run some
# Pareto k values are high, which ArviZ warns about.
print(az.loo(tree))
