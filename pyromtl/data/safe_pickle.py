"""Unpickling files from disk without letting them run code.

A pickle names the callables that rebuild its objects, so a crafted file can call anything
(``os.system``...). :func:`load_pickle` resolves only the few names that plain containers
and numpy arrays need and refuses every other one before it is imported or called.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

#: ``(module, name)`` pairs a numpy array's pickle may reference (numpy 1 and 2 module paths;
#: ``_codecs.encode`` is how protocol-2 pickles written by Python 3 store ``bytes``).
NUMPY_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``allowed``."""

    def __init__(self, file, *, allowed: frozenset[tuple[str, str]], **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: only numpy arrays and plain data are allowed"
            )
        return super().find_class(module, name)


def load_pickle(
    path: str | Path, *, allowed: frozenset[tuple[str, str]] = NUMPY_GLOBALS, encoding: str = "bytes"
) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`; any failure is a ``ValueError`` naming the file.

    ``encoding="bytes"`` reads Python 2 pickles (CIFAR's) with their ``str`` keys as ``bytes``.
    """
    try:
        with open(path, "rb") as fh:
            return RestrictedUnpickler(fh, allowed=allowed, encoding=encoding).load()
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"{path}: cannot read this pickle safely ({err})") from None
