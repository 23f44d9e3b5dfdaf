"""pyromtl: probabilistic multi-task learning written as Pyro models and guides.

    >>> import pyromtl
    >>> fit = pyromtl.fit("vmtl", "digits-domains", fraction=0.05, seed=0)
    >>> fit.evaluate()["average"]["accuracy"]

See ``pyromtl.methods.available()``, ``pyromtl.datasets.available()`` and
``pyromtl.priors.available()`` for what is built in.
"""

import importlib

from pyromtl.data.core import MultiTaskData
from pyromtl.fit import Fit, fit, load

__all__ = ["Fit", "MultiTaskData", "__version__", "fit", "load"]
__version__ = "0.1.0"

#: Submodules reachable as attributes (``pyromtl.datasets.load(...)``), imported on first use.
_SUBMODULES = ("config", "datasets", "methods", "metrics", "networks", "priors", "schedules")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"pyromtl.{name}")
    raise AttributeError(f"module 'pyromtl' has no attribute {name!r}")
