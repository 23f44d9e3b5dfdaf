"""
VMTL: learned task relatedness
==============================

Variational multi-task learning (VMTL) puts a Gumbel-Softmax mixture prior over the *other*
tasks' posteriors on each task's representation ``z`` and classifier ``w``. The mixture
weights, ``α`` for ``z`` and ``β`` for ``w``, are the relatedness it learns: row ``t`` says how
much task ``t`` borrows from each other task.

The data are the embedded ``digits-domains`` (four domain-shifted quarters of scikit-learn's
digits, 5% of each task for training). This is the same run as

.. code-block:: bash

    pyromtl fit vmtl --data digits-domains --fraction 0.05 --seed 0 --out runs/vmtl
    pyromtl report runs/vmtl   # the same figures, in runs/vmtl/plots/
"""

# %%
# Fit
# ---
# The method's defaults: 100 epochs (one batch each at this split), 10 Monte-Carlo draws of
# ``z`` and of ``w`` per sample, model selection on the validation split.
import pyromtl
from pyromtl import plots

fit = pyromtl.fit("vmtl", "digits-domains", fraction=0.05, seed=0, quiet=True)
print({key: round(value, 3) for key, value in fit.metrics()["average"].items()})  # test split

# %%
# The training curve
# ------------------
# Loss (the negative ELBO with its KL upper bound) per logged step, and the validation metric
# at each evaluation; the dotted line marks the state that model selection kept.
fig = plots.plot_training(fit.history, fit.metrics()["train"].get("best_step"))

# %%
# Relatedness
# -----------
# :meth:`pyromtl.Fit.relatedness` returns both matrices; each row sums to 1 over the other
# tasks (the diagonal is empty: a task's prior mixes the others only).
relatedness = fit.relatedness()
names = fit.data.task_names
fig = plots.plot_relatedness(relatedness["alpha"], names, "α: mixture weights of the z prior", "α")

# %%
fig = plots.plot_relatedness(relatedness["beta"], names, "β: mixture weights of the w prior", "β")
