"""
Gradient weighting against single-task learning
===============================================

The twelve MTL weighting baselines (``ls``, ``uw``, ``pcgrad``, ``upgrad``, ...) share one
network and differ in how they combine the tasks' losses or gradients; the gradient methods
call torchjd. Whether any of them helps is measured against single-task learning (``stl``):
Δm% (BayesAgg-MTL's average relative change, lower is better), and SMTL's Δ_I% and η̂ (the
share of tasks not made worse; higher is better).

Three short runs on ``digits-mixed`` (a regression, a binary and a 10-class task from one
image). The full comparison, over seeds, is a ``pyromtl bench`` grid:

.. code-block:: bash

    pyromtl bench --methods stl,ls,upgrad --data digits-mixed --seeds 3 --out runs/bench
"""

# %%
# Fit
# ---
import pyromtl
from pyromtl import plots
from pyromtl.metrics import compare_table

small = {"steps": 100, "hidden": [64], "latent_dim": 32, "eval_every": 50, "quiet": True}
runs = {name: pyromtl.fit(name, "digits-mixed", seed=0, **small) for name in ("stl", "ls", "upgrad")}
tasks = {name: fit.metrics()["tasks"] for name, fit in runs.items()}  # test split

# %%
# The comparison
# --------------
# :func:`~pyromtl.metrics.compare_table` is what ``pyromtl compare`` prints: each task's primary
# metric (accuracy, or NMSE for regression), then Δm%, Δ_I% and η̂ against the baseline.
print(compare_table(tasks, baseline="stl"))

# %%
# Per-task metrics of one run
# ---------------------------
fig = plots.plot_task_metrics(tasks["upgrad"])
