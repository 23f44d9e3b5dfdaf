"""``--import``: the user's modules that register methods, priors, datasets and networks.

Only modules named on the command line are imported; nothing named inside a run directory ever
is. The workers of a multi-process run import the same ones (:data:`IMPORTED`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

#: What :func:`import_plugins` imported, in order: the workers of a multi-process run import it too.
IMPORTED: list[str] = []


def import_plugins(specs: Sequence[str]) -> None:
    """Import the modules named by ``--import``: a module name or a ``.py`` file path.

    This is how a run of a user's own method, prior kind or dataset is fitted, evaluated or
    reported: the module registers it. Only modules given on the command line are imported;
    nothing named inside a run directory ever is.
    """
    import importlib
    import importlib.util

    for spec in specs:
        path = Path(spec)
        if spec.endswith(".py") or len(path.parts) > 1:
            if not path.is_file():
                raise ValueError(f"--import: no such file {spec}")
            spec = str(path.resolve())  # a worker of a multi-process run may start elsewhere
            name = f"pyromtl_plugin_{path.stem}"
            loader = importlib.util.spec_from_file_location(name, path)
            if loader is None or loader.loader is None:
                raise ValueError(f"--import: cannot import {spec!r} (not a Python file)")
            module = importlib.util.module_from_spec(loader)
            sys.modules[name] = module
            try:
                loader.loader.exec_module(module)
            except Exception as err:  # the user's code: one line saying which file failed, and how
                sys.modules.pop(name, None)
                raise ValueError(f"--import {spec}: running it raised {type(err).__name__}: {err}") from None
        else:
            try:
                importlib.import_module(spec)
            except ModuleNotFoundError as err:
                raise ValueError(f"--import: cannot import {spec!r} ({err})") from None
            except Exception as err:  # the user's code: one line saying which module failed, and how
                raise ValueError(f"--import {spec}: importing it raised {type(err).__name__}: {err}") from None
        IMPORTED.append(spec)
