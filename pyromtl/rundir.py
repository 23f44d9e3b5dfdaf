"""A run directory, and the one place that reads and writes its files.

Layout: ``config.toml`` (the resolved config), ``metrics.json``, ``checkpoint.pt``,
``posterior.nc`` (an ArviZ DataTree), ``plots/*.png`` and ``report.md``. Every file is
replaced atomically, so a reader never sees half of one.

Run directories are what people send each other, so opening one never runs code from it:
checkpoints are read with ``torch.load(..., weights_only=True)`` (tensors and plain
containers only) and a file that does not load that way is refused with one line naming it.
File names that come from a run's contents (plots named after a relatedness matrix) are made
plain and checked to stay inside the run.

A run is *complete* once ``complete.json`` exists: it is written last, atomically, after every
other file, so an interrupted or failed save leaves a run that the same command finishes.
One writer at a time: :meth:`RunDir.writing` holds an advisory lock (``.lock``, ``flock``) for
a run's whole life, and readers (:meth:`RunDir.reading`) are refused while a writer holds it,
each with one line naming the writer's process. The OS releases the lock of a killed process.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pyromtl.io import atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text

#: Locks this process holds, by resolved run path: (file descriptor, exclusive?, depth).
_HELD: dict[Path, list[Any]] = {}


def plain_name(text: str) -> str:
    """``text`` as a file name that stays where it is put: only letters, digits, ``.``, ``_``
    and ``-``, with no leading dot (``"../../x"`` becomes ``"_.._x"``)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(text)).lstrip(".")
    return name[:100] or "_"


class RunDir:
    """The files of one run, under ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def posterior_path(self) -> Path:
        return self.path / "posterior.nc"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    @property
    def report_path(self) -> Path:
        return self.path / "report.md"

    @property
    def complete_path(self) -> Path:
        return self.path / "complete.json"

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    # ------------------------------------------------------------------ completion and locks
    def is_complete(self) -> bool:
        """Whether every file of the run was written (the marker is written last)."""
        return self.complete_path.is_file()

    def mark_complete(self, step: int) -> None:
        atomic_write_json(self.complete_path, {"step": int(step)})

    def clear_complete(self) -> None:
        """Before files are replaced: until the marker is written again, the run is incomplete."""
        self.complete_path.unlink(missing_ok=True)

    @contextmanager
    def writing(self) -> Iterator[RunDir]:
        """Create the folder and hold the run's lock, exclusively, for the ``with`` block.

        Another process writing or reading the run is a ``ValueError`` naming it; this process
        may nest. A folder this call created and left empty is removed again.
        """
        created = not self.path.exists()
        self.create()
        try:
            with self._lock(exclusive=True):
                yield self
        finally:
            if created and self.path.is_dir() and not any(self.path.iterdir()):
                self.path.rmdir()

    @contextmanager
    def reading(self) -> Iterator[RunDir]:
        """Hold the run's lock, shared, for the ``with`` block: refused while a process writes it.
        A reader creates no file (with no ``.lock``, no process is writing)."""
        with self._lock(exclusive=False):
            yield self

    @contextmanager
    def _lock(self, exclusive: bool) -> Iterator[None]:
        key = self.path.resolve()
        held = _HELD.get(key)
        if held is not None and (held[1] or not exclusive):  # nested in this process
            held[2] += 1
            try:
                yield
            finally:
                held[2] -= 1
            return
        if held is not None:
            raise ValueError(f"{self.path} is open for reading in this process; it cannot be written at the same time")
        fd = self._acquire(exclusive)
        if fd is None:  # no lock file: no process is writing the run
            yield
            return
        _HELD[key] = [fd, exclusive, 1]
        try:
            yield
        finally:
            del _HELD[key]
            if exclusive:  # removed while held: a process that opened it before then finds it stale
                self.lock_path.unlink(missing_ok=True)
            os.close(fd)  # releases the lock

    def _acquire(self, exclusive: bool) -> int | None:
        """A descriptor of ``.lock`` holding the lock (a writer creates the file and writes its
        process id into it); ``None`` for a reader when there is no lock file."""
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | (os.O_CREAT if exclusive else 0), 0o666)
            except FileNotFoundError:
                return None
            except PermissionError:
                if exclusive:
                    raise
                return None  # a read-only run (e.g. a shared archive): nobody writes it
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ValueError(self._busy(exclusive)) from None
            try:
                current = os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:  # the holder removed it as we opened it: start again
                os.close(fd)
                if not exclusive:
                    return None
                continue
            if exclusive:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            return fd

    def _busy(self, exclusive: bool) -> str:
        try:
            pid = self.lock_path.read_text().strip()
        except OSError:
            pid = ""
        holder = f"process {pid}" if pid.isdigit() else "another process"
        if exclusive:
            return f"{self.path} is in use by {holder}; wait for it to finish, or pass another run directory"
        return f"{self.path} is being written by {holder}; read it once that run has finished"

    def create(self) -> RunDir:
        """Make the folder; a path that exists and is not a folder is a ``ValueError``."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"run directory {self.path} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------------ config
    def read_config(self) -> dict[str, Any]:
        from pyromtl import config

        return config.load_toml(self.config_path)

    def write_config(self, cfg: Mapping[str, Any]) -> None:
        from pyromtl import config

        atomic_write_text(self.config_path, config.to_toml(cfg))

    # ------------------------------------------------------------------ metrics
    def read_metrics(self) -> dict[str, Any]:
        """``metrics.json``; a missing or malformed file is a ``ValueError`` naming it."""
        path = self.metrics_path
        if not path.is_file():
            raise ValueError(f"{self.path} is not a pyromtl run directory (no metrics.json)")
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), dict) or "dataset" not in doc:
            raise ValueError(f"{path} lacks the 'dataset' and 'tasks' entries of a pyromtl metrics.json")
        problem = _malformed(doc)
        if problem:
            raise ValueError(f"{path} is malformed: {problem}")
        return doc

    def write_metrics(self, doc: dict[str, Any]) -> None:
        """Write strict JSON: NaN and infinities become ``null``, which every parser accepts."""
        atomic_write_json(self.metrics_path, doc)

    # ------------------------------------------------------------------ checkpoint
    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    def read_checkpoint(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """The checkpoint, loaded with ``weights_only=True``; anything else is refused in one line."""
        path = self.checkpoint_path
        if not path.is_file():
            raise ValueError(f"{self.path} holds no checkpoint.pt")
        try:
            saved = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            if "GLOBAL" in str(err):  # a class or function reference: loading it could run code
                raise ValueError(
                    f"{path} holds objects other than tensors and plain containers; "
                    "refusing to load it, since that could run code from the file"
                ) from None
            raise ValueError(f"{path} cannot be read: it is not a checkpoint") from None
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, IndexError) as err:
            reason = " ".join(str(err).split())[:200] or f"{type(err).__name__}, the file is empty or cut short"
            if path.stat().st_size == 0:
                reason = "the file is empty (a copy or a disk that failed part-way?)"
            raise ValueError(f"{path} cannot be read: {reason}") from None
        if not isinstance(saved, dict) or "step" not in saved:
            raise ValueError(f"{path} is not a pyromtl checkpoint")
        return saved

    def write_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save(state, self.checkpoint_path)

    # ------------------------------------------------------------------ posterior and plots
    def write_posterior(self, tree) -> None:
        """Write an ArviZ DataTree with h5netcdf, atomically."""
        tmp = self.path / ".posterior.nc.tmp"
        tree.to_netcdf(tmp, engine="h5netcdf")
        tmp.replace(self.posterior_path)

    def write_report(self, text: str) -> None:
        atomic_write_text(self.report_path, text)

    def write_png(self, name: str, data: bytes) -> Path:
        """Write ``plots/<name>`` (a plain name: see :func:`plain_name`), never outside the run."""
        path = self.plots_dir / plain_name(name)
        if path.resolve().parent != self.plots_dir.resolve():
            raise ValueError(f"plot name {name!r} would be written outside {self.plots_dir}")
        atomic_write_bytes(path, data)
        return path


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _malformed(doc: Mapping[str, Any]) -> str:
    """What is wrong with a ``metrics.json`` document's shape ('' if nothing): the entries that
    readers (``compare``, ``report``) index into must have the types ``Fit.metrics`` writes."""
    for key in ("method", "dataset", "split", "device"):
        if key in doc and not isinstance(doc[key], str):
            return f"{key!r} must be a string, got {type(doc[key]).__name__}"
    tasks = doc["tasks"]
    if not tasks:
        return "'tasks' is empty"
    for name, metrics in tasks.items():
        if not isinstance(metrics, dict) or not all(_is_number(v) for v in metrics.values()):
            return f"task {name!r} must map metric names to numbers"
    for key in ("average", "train", "extra"):
        if key in doc and not isinstance(doc[key], dict):
            return f"{key!r} must be a table, got {type(doc[key]).__name__}"
    if not all(_is_number(v) for v in doc.get("average", {}).values()):
        return "'average' must map metric names to numbers"
    for key in ("seed", "fraction"):
        if key in doc and not _is_number(doc[key]):
            return f"{key!r} must be a number, got {type(doc[key]).__name__}"
    relatedness = doc.get("relatedness", {})
    if not isinstance(relatedness, dict):
        return f"'relatedness' must be a table, got {type(relatedness).__name__}"
    T = len(tasks)
    for key, matrix in relatedness.items():
        rows_ok = isinstance(matrix, list) and len(matrix) == T
        if not rows_ok or not all(isinstance(r, list) and len(r) == T and all(map(_is_number, r)) for r in matrix):
            return f"relatedness {key!r} must be a {T} x {T} matrix of numbers (one row and column per task)"
    return ""
