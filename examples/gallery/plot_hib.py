"""
HIB: task distances and clustering
==================================

HIB learns a compressed representation ``Z`` shared by all tasks, and one noisy channel
``W_j = Z + N_j`` per task. A task that needs little of ``Z`` learns a large noise variance.
The distance between two tasks is the L1 distance between their log noise variances (eq. 11),
and clustering those distances recovers groups of related tasks.

``digits-grouped`` has six tasks in two known clusters. The full run:

.. code-block:: bash

    pyromtl fit hib --data digits-grouped --seed 0 --out runs/hib
    pyromtl report runs/hib
"""

# %%
# Fit
# ---
import pyromtl
from pyromtl import plots
from pyromtl.infer.hib import cluster_tasks, clustering_success

fit = pyromtl.fit("hib", "digits-grouped", seed=0, steps=200, eval_every=100, quiet=True)
print({key: round(value, 3) for key, value in fit.metrics()["average"].items()})  # test split

# %%
# Distances (eq. 11)
# ------------------
distance = fit.relatedness()["distance"]
names = fit.data.task_names
fig = plots.plot_relatedness(distance, names, "eq. 11: L1 distance between log noise variances", "distance")

# %%
# Hierarchical clustering
# -----------------------
# :func:`~pyromtl.infer.hib.cluster_tasks` turns the distances into a SciPy linkage matrix;
# with the data's known groups (``digits-grouped`` declares them), the paper's criterion
# (§V-B: every distance across groups exceeds every distance within one) is
# :func:`~pyromtl.infer.hib.clustering_success`. This short run need not meet it yet.
fig = plots.plot_dendrogram(cluster_tasks(distance, "average"), names, "task clustering (average linkage)")
print("groups recovered:", clustering_success(distance, fit.data.relatedness))
