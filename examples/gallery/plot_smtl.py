"""
Safe MTL: gates
===============

Safe multi-task learning (SMTL) gives each task a gate ``α_t`` between a public encoder,
shared by all tasks, and a private one: the task's representation is
``α_t · public + (1 − α_t) · private``. A task that the others would hurt can close its gate and
fall back to single-task learning, which is what makes the method "safe".

A short run on ``digits-binary``. The full run, with the learned gates in ``report.md``:

.. code-block:: bash

    pyromtl fit smtl --data digits-binary --seed 0 --out runs/smtl
    pyromtl report runs/smtl
"""

# %%
# Fit
# ---
import numpy as np

import pyromtl
from pyromtl import plots

fit = pyromtl.fit("smtl", "digits-binary", seed=0, steps=100, hidden=[64], latent_dim=32, eval_every=50, quiet=True)
print({key: round(value, 3) for key, value in fit.metrics()["average"].items()})  # test split

# %%
# The gates
# ---------
# :meth:`pyromtl.Fit.relatedness` holds the gates on the diagonal of ``"gates"``. At test time
# the lite variants (``lsmtl``) keep only one side per task: public where ``α_t > 0.5``.
alpha = np.diag(fit.relatedness()["gates"])
fig = plots.plot_gates(alpha, fit.data.task_names, "gate α_t: the weight of the public side")
