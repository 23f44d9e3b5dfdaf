"""An on-disk cache of built arrays, so embedded datasets are built once per machine.

Building a digits set costs seconds (scikit-learn's import alone is most of it); reading a
cached ``.npz`` costs milliseconds. The folder is ``$PYROMTL_CACHE``, else
``$XDG_CACHE_HOME/pyromtl``, else ``~/.cache/pyromtl``; ``PYROMTL_CACHE=off`` disables it.

An entry is keyed by the dataset name, its construction options and its builder's version
string: change what a builder makes, bump its version, and old entries are no longer read.
Files are written to a temporary name and renamed into place (atomic, so concurrent
processes never read half a file) and read without pickle. An unreadable entry is rebuilt;
a cache folder that cannot be written only costs the rebuild next time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

CACHE_ENV = "PYROMTL_CACHE"
#: Bumped when the file layout changes; part of every key.
CACHE_FORMAT = 1
_KEY = "__key__"  # the entry's full key, stored in the file and checked on reading


def cache_dir() -> Path | None:
    """The cache folder (created on first write), or ``None`` when ``PYROMTL_CACHE=off``."""
    given = os.environ.get(CACHE_ENV, "").strip()
    if given.lower() == "off":
        return None
    if given:
        return Path(given).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "pyromtl"


def cache_key(name: str, version: str, options: Mapping[str, Any]) -> str:
    """A canonical JSON text of what determines an entry's content."""
    return json.dumps(
        {"name": name, "version": version, "options": dict(options), "format": CACHE_FORMAT},
        sort_keys=True,
        default=repr,
    )


def cache_path(name: str, version: str, options: Mapping[str, Any]) -> Path | None:
    """Where the entry lives: ``<cache_dir>/<name>-<hash of the key>.npz``."""
    folder = cache_dir()
    if folder is None:
        return None
    digest = hashlib.sha256(cache_key(name, version, options).encode()).hexdigest()[:20]
    return folder / f"{name}-{digest}.npz"


def cached_arrays(
    name: str,
    build: Callable[[], dict[str, np.ndarray]],
    *,
    version: str,
    options: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """``build()``'s named arrays, read from the cache when an intact entry exists, else built and stored.

    ``build`` must be deterministic given ``name``, ``version`` and ``options`` and return numeric
    or string arrays (no objects: entries are read with ``allow_pickle=False``).
    """
    options = dict(options or {})
    path = cache_path(name, version, options)
    key = cache_key(name, version, options)
    if path is not None and path.is_file():
        arrays = _read(path, key)
        if arrays is not None:
            return arrays
    arrays = {k: np.asarray(v) for k, v in build().items()}
    if path is not None:
        _write(path, key, arrays)
    return arrays


def _read(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The entry's arrays, or ``None`` if the file is corrupt, truncated or holds another key."""
    try:
        # our own handle: np.load leaves the file it opened open when the archive is damaged
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None
    stored = arrays.pop(_KEY, None)
    return arrays if stored is not None and stored.shape == () and str(stored) == key else None


def _write(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            # numpy's stub cannot tell that the arrays' names never fill savez's allow_pickle
            np.savez(fh, **arrays, **{_KEY: np.asarray(key)})  # type: ignore[arg-type]
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(
            f"pyromtl: cannot write the dataset cache {path} ({err}); set {CACHE_ENV} to a writable "
            f"folder, or to 'off'",
            stacklevel=3,
        )
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
