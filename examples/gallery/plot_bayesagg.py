"""
BayesAgg-MTL: aggregation weights
=================================

BayesAgg-MTL gives each task's last layer a Gaussian posterior, which turns each task's
gradient with respect to the shared representation into a random vector. The tasks'
gradients are combined with weights that grow with their precision (eq. 7 of the paper), so a
task whose gradient is uncertain pushes the shared encoder less.

A short run on ``digits-binary`` (ten imbalanced one-vs-rest tasks). The full run:

.. code-block:: bash

    pyromtl fit bayesagg --data digits-binary --seed 0 --out runs/bayesagg
    pyromtl report runs/bayesagg   # plots/aggregation_weights.png among them
"""

# %%
# Fit
# ---
import pyromtl
from pyromtl import plots

fit = pyromtl.fit(
    "bayesagg", "digits-binary", seed=0, steps=120, pretrain_steps=20, hidden=[64], latent_dim=32, quiet=True
)
print({key: round(value, 3) for key, value in fit.metrics()["average"].items()})  # test split

# %%
# Each task's weight in the shared gradient
# -----------------------------------------
# The method records each task's mean aggregation weight along training
# (``metrics.json``'s ``extra``); its own figure draws them, with the uniform weight ``1/K``
# dotted. :func:`pyromtl.plots.run_figures` lists every figure of a run, the method's included.
figures = plots.run_figures(fit.metrics(), fit.history, fit.context)
print(sorted(figures))
fig = figures["aggregation_weights.png"]()

# %%
# Per-task test metrics
# ---------------------
fig = plots.plot_task_metrics(fit.metrics()["tasks"])
