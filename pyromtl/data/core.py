"""Multi-task datasets: storage, validation, few-shot splits and task-stacked batches.

Two settings share one container:

* **SIMO** — one input tensor ``x [N, ...]`` and one target per task, ``y[task] [N]``;
* **MIMO** — every task has its own ``x_t [N_t, ...]`` and ``y_t [N_t]`` in a shared
  label or target space.

Training steps never loop over tasks: :meth:`MultiTaskData.train_batch` gathers a
``[T, B, ...]`` (MIMO) or ``[B, ...]`` (SIMO) batch from padded, device-resident tensors
with one vectorised index operation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

TASK_TYPES = ("classification", "binary", "regression")
TYPE_CODE = {name: code for code, name in enumerate(TASK_TYPES)}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TaskInfo:
    """Static per-task facts that models broadcast over (all tensors are ``[T, ...]``).

    ``out_dim`` is the width of every head: the largest class count, or 1 for binary and
    regression tasks. ``class_mask [T, out_dim]`` marks the logits that exist for a task.
    """

    names: tuple[str, ...]
    types: tuple[str, ...]
    num_classes: tuple[int, ...]
    out_dim: int
    type_code: torch.Tensor
    class_mask: torch.Tensor
    simo: bool
    input_shape: tuple[int, ...]

    @property
    def num_tasks(self) -> int:
        return len(self.names)

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.input_shape))

    def to(self, device: torch.device | str) -> "TaskInfo":
        return replace(self, type_code=self.type_code.to(device), class_mask=self.class_mask.to(device))


@dataclass
class Batch:
    """One task-stacked batch.

    ``x`` is ``[T, B, *input_shape]`` (MIMO) or ``[B, *input_shape]`` (SIMO); ``y`` and ``mask``
    are ``[T, B]`` (labels are stored as floats); ``scale [T, 1]`` is ``N_t / B_t`` for
    training batches (so subsampled log-likelihoods are unbiased) and 1 for evaluation;
    ``index [T, B]`` gives each entry's position in its task's ``split``.
    """

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    scale: torch.Tensor
    index: torch.Tensor
    simo: bool
    split: str = "train"

    @property
    def num_tasks(self) -> int:
        return self.y.shape[0]

    @property
    def size(self) -> int:
        return self.y.shape[1]


@dataclass
class _Padded:
    x: torch.Tensor  # [T, Nmax, ...] (MIMO) or [N, ...] (SIMO)
    y: torch.Tensor  # [T, Nmax]
    n: torch.Tensor  # [T]
    index: torch.Tensor  # [T, Nmax] row of each entry in the task's full arrays


@dataclass
class MultiTaskData:
    """A validated multi-task dataset with train/val/test splits.

    Build one with :meth:`from_arrays`; ``pyromtl.datasets.load`` returns the embedded ones.
    Targets of regression tasks are standardised on the training split; ``target_stats``
    keeps ``(mean, std)`` so metrics can be reported on the original scale.
    """

    name: str
    task_names: list[str]
    task_types: list[str]
    num_classes: list[int]
    x: list[torch.Tensor] | torch.Tensor
    y: list[torch.Tensor]
    splits: dict[str, list[torch.Tensor]]
    target_stats: list[tuple[float, float]]
    relatedness: np.ndarray | None = None
    class_names: list[str] | None = None
    description: str = ""
    fraction: float | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(
        cls,
        x,
        y,
        task_types: str | Sequence[str],
        task_names: Sequence[str] | None = None,
        *,
        num_classes: int | Sequence[int] | None = None,
        splits: Mapping[str, Sequence] | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        seed: int = 0,
        standardize: bool = True,
        name: str = "custom",
        relatedness=None,
        class_names: Sequence[str] | None = None,
        description: str = "",
    ) -> "MultiTaskData":
        """Validate arrays and build a dataset.

        ``x`` a list of arrays (one per task) gives MIMO, with ``y`` a list of the same length.
        ``x`` one array with ``y`` a dict ``{task: [N]}`` gives SIMO. ``task_types`` is one of
        ``classification``, ``binary``, ``regression``, or a sequence with one per task.
        ``splits`` optionally maps ``train``/``val``/``test`` to per-task index arrays (or to one
        index array shared by all tasks in SIMO); otherwise a stratified random split is drawn.
        Every problem raises ``ValueError`` naming the task and what is wrong.
        """
        from pyromtl.data.validate import validate_arrays

        checked = validate_arrays(x, y, task_types, task_names, num_classes)
        xs, ys, names, types, ncls, simo = checked
        T = len(names)
        if splits is None:
            split_idx = _random_splits(ys, types, simo, val_fraction, test_fraction, seed)
        else:
            split_idx = _check_splits(splits, ys, names, simo)
        stats: list[tuple[float, float]] = []
        for t in range(T):
            if types[t] == "regression" and standardize:
                tr = ys[t][split_idx["train"][t]]
                mean = float(tr.mean())
                std = float(tr.std()) if tr.numel() > 1 and float(tr.std()) > 0 else 1.0
                ys[t] = (ys[t] - mean) / std
                stats.append((mean, std))
            else:
                stats.append((0.0, 1.0))
        rel = None
        if relatedness is not None:
            rel = np.asarray(relatedness, dtype=float)
            if rel.shape != (T, T):
                raise ValueError(f"relatedness: expected shape ({T}, {T}), got {rel.shape}")
        return cls(
            name=name,
            task_names=names,
            task_types=types,
            num_classes=ncls,
            x=xs[0] if simo else xs,
            y=ys,
            splits=split_idx,
            target_stats=stats,
            relatedness=rel,
            class_names=list(class_names) if class_names is not None else None,
            description=description,
        )

    # ------------------------------------------------------------------ facts
    @property
    def simo(self) -> bool:
        return isinstance(self.x, torch.Tensor)

    @property
    def setting(self) -> str:
        return "simo" if self.simo else "mimo"

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        x = self.x if self.simo else self.x[0]
        return tuple(x.shape[1:])

    def split_sizes(self, split: str = "train") -> list[int]:
        return [int(i.numel()) for i in self.splits[split]]

    @property
    def info(self) -> TaskInfo:
        out_dim = max([c if t == "classification" else 1 for c, t in zip(self.num_classes, self.task_types)])
        mask = torch.zeros(self.num_tasks, out_dim, dtype=torch.bool)
        for t, (c, kind) in enumerate(zip(self.num_classes, self.task_types)):
            mask[t, : (c if kind == "classification" else 1)] = True
        return TaskInfo(
            names=tuple(self.task_names),
            types=tuple(self.task_types),
            num_classes=tuple(self.num_classes),
            out_dim=out_dim,
            type_code=torch.tensor([TYPE_CODE[k] for k in self.task_types]),
            class_mask=mask,
            simo=self.simo,
            input_shape=self.input_shape,
        )

    def task_index(self, task: str | int) -> int:
        """Position of a task, by name or index; unknown tasks raise ``ValueError``."""
        if isinstance(task, (int, np.integer)) and 0 <= int(task) < self.num_tasks:
            return int(task)
        if task in self.task_names:
            return self.task_names.index(task)
        raise ValueError(f"unknown task {task!r}; this dataset has tasks {self.task_names}")

    # ------------------------------------------------------------------ splits
    def with_fraction(self, fraction: float | None, seed: int = 0) -> "MultiTaskData":
        """Keep ``fraction`` of each task's training split, stratified by class (few-shot).

        Classification tasks keep at least one sample per class present in train. val and test
        are untouched. ``fraction=None`` or 1 returns the data unchanged.
        """
        if fraction is None or fraction >= 1.0:
            return self
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        rng = np.random.default_rng(seed)
        if self.simo:
            strat = next((t for t, k in enumerate(self.task_types) if k != "regression"), None)
            idx = self.splits["train"][0].numpy()
            labels = self.y[strat][idx].numpy() if strat is not None else None
            keep = torch.as_tensor(np.sort(idx[_stratified_take(labels, len(idx), fraction, rng)]))
            new_train = [keep] * self.num_tasks
        else:
            new_train = []
            for t in range(self.num_tasks):
                idx = self.splits["train"][t].numpy()
                labels = self.y[t][idx].numpy() if self.task_types[t] != "regression" else None
                new_train.append(torch.as_tensor(np.sort(idx[_stratified_take(labels, len(idx), fraction, rng)])))
        splits = dict(self.splits)
        splits["train"] = new_train
        return replace(self, splits=splits, fraction=fraction, _cache={})

    # ------------------------------------------------------------------ batching
    def _padded(self, split: str, device: torch.device) -> _Padded:
        key = (split, str(device))
        if key not in self._cache:
            idx = self.splits[split]
            n = torch.tensor([i.numel() for i in idx])
            nmax = int(n.max())
            pad_idx = torch.zeros(self.num_tasks, nmax, dtype=torch.long)
            for t, i in enumerate(idx):  # data preparation, once per split
                pad_idx[t, : i.numel()] = i
            if self.simo:
                x = self.x.to(device)
                y = torch.stack([yt for yt in self.y]).to(device)  # [T, N]
                pad = _Padded(x=x, y=y, n=n.to(device), index=pad_idx.to(device))
            else:
                x = torch.stack([self.x[t][pad_idx[t]] for t in range(self.num_tasks)]).to(device)
                y = torch.stack([self.y[t][pad_idx[t]] for t in range(self.num_tasks)]).to(device)
                pad = _Padded(x=x, y=y, n=n.to(device), index=pad_idx.to(device))
            self._cache[key] = pad
        return self._cache[key]

    def train_batch(self, batch_size: int, generator: torch.Generator | None, device: torch.device | str) -> Batch:
        """Draw one training batch of up to ``batch_size`` samples per task, without replacement.

        A task with fewer than ``batch_size`` training samples contributes all of them (the rest
        of its row is masked). ``scale = N_t / B_t`` keeps the subsampled likelihood unbiased.
        """
        device = torch.device(device)
        pad = self._padded("train", device)
        T = self.num_tasks
        n = pad.n
        if self.simo:
            N = int(n[0])
            B = min(batch_size, N)
            perm = torch.randperm(N, generator=generator, device="cpu")[:B].to(device)
            rows = pad.index[0, perm]
            x, y = pad.x[rows], pad.y[:, rows]
            pos = perm.expand(T, B)
            mask = torch.ones(T, B, dtype=torch.bool, device=device)
            scale = torch.full((T, 1), N / B, device=device)
            return Batch(x=x, y=y, mask=mask, scale=scale, index=pos, simo=True)
        nmax = pad.y.shape[1]
        B = min(batch_size, nmax)
        keys = torch.rand(T, nmax, generator=generator, device="cpu").to(device)
        keys = keys.masked_fill(torch.arange(nmax, device=device) >= n[:, None], 2.0)
        pos = keys.argsort(dim=1)[:, :B]  # uniform subset of each task's valid rows
        taken = torch.minimum(n, torch.tensor(B, device=device))
        mask = torch.arange(B, device=device) < taken[:, None]
        rows = torch.arange(T, device=device)[:, None]
        x = pad.x[rows, pos]
        y = pad.y[rows, pos]
        scale = (n / taken).to(torch.float32)[:, None]
        return Batch(x=x, y=y, mask=mask, scale=scale, index=pos, simo=False)

    def eval_batches(self, split: str, device: torch.device | str, batch_size: int = 4096) -> Iterator[Batch]:
        """Yield the whole split in padded, masked chunks (``scale = 1``)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        device = torch.device(device)
        pad = self._padded(split, device)
        T = self.num_tasks
        nmax = pad.index.shape[1]
        for start in range(0, nmax, batch_size):
            pos = torch.arange(start, min(start + batch_size, nmax), device=device).expand(T, -1)
            mask = pos < pad.n[:, None]
            if self.simo:
                rows = pad.index[0, pos[0]]
                x = pad.x[rows]
                y = pad.y[:, rows]
            else:
                r = torch.arange(T, device=device)[:, None]
                x = pad.x[r, pos]
                y = pad.y[r, pos]
            yield Batch(x=x, y=y, mask=mask, scale=torch.ones(T, 1, device=device), index=pos, simo=self.simo, split=split)

    def split_arrays(self, split: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per-task ``(x, y)`` numpy arrays of one split (targets standardised)."""
        xs, ys = [], []
        for t in range(self.num_tasks):
            i = self.splits[split][t]
            x = self.x if self.simo else self.x[t]
            xs.append(x[i].numpy())
            ys.append(self.y[t][i].numpy())
        return xs, ys

    def summary(self) -> str:
        """One line per task: type, classes and split sizes."""
        lines = [f"{self.name}: {self.setting.upper()}, {self.num_tasks} tasks, input {self.input_shape}"]
        for t, name in enumerate(self.task_names):
            sizes = "/".join(str(self.splits[s][t].numel()) for s in SPLITS)
            kind = self.task_types[t]
            extra = f" ({self.num_classes[t]} classes)" if kind == "classification" else ""
            lines.append(f"  {name}: {kind}{extra}, train/val/test = {sizes}")
        return "\n".join(lines)


def _stratified_take(labels: np.ndarray | None, n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Positions of a stratified ``fraction`` of ``n`` items (at least one per class)."""
    if labels is None:
        k = max(1, int(round(fraction * n)))
        return rng.permutation(n)[:k]
    picked = []
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        k = max(1, int(round(fraction * len(pos))))
        picked.append(rng.permutation(pos)[:k])
    return np.concatenate(picked)


def _random_splits(ys, types, simo, val_fraction, test_fraction, seed) -> dict[str, list[torch.Tensor]]:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction and test_fraction must be in [0, 1) and sum below 1, got {val_fraction} and {test_fraction}"
        )
    rng = np.random.default_rng(seed)
    out: dict[str, list[torch.Tensor]] = {s: [] for s in SPLITS}
    tasks = [0] if simo else range(len(ys))
    for t in tasks:
        n = ys[t].numel()
        labels = ys[t].numpy() if types[t] != "regression" else None
        groups = [np.flatnonzero(labels == c) for c in np.unique(labels)] if labels is not None else [np.arange(n)]
        parts = {s: [] for s in SPLITS}
        for g in groups:
            g = rng.permutation(g)
            n_test = int(round(test_fraction * len(g)))
            n_val = int(round(val_fraction * len(g)))
            parts["test"].append(g[:n_test])
            parts["val"].append(g[n_test : n_test + n_val])
            parts["train"].append(g[n_test + n_val :])
        for s in SPLITS:
            out[s].append(torch.as_tensor(np.sort(np.concatenate(parts[s])), dtype=torch.long))
    if simo:
        out = {s: out[s] * len(ys) for s in SPLITS}
    for s in ("train",):
        for t, idx in enumerate(out[s]):
            if idx.numel() == 0:
                raise ValueError(f"task {t}: the train split is empty; give more samples or smaller val/test fractions")
    return out


def _check_splits(splits, ys, names, simo) -> dict[str, list[torch.Tensor]]:
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"splits: unknown split names {sorted(unknown)}; use {list(SPLITS)}")
    if "train" not in splits:
        raise ValueError("splits: a 'train' split is required")
    out: dict[str, list[torch.Tensor]] = {}
    T = len(names)
    for s in SPLITS:
        given = splits.get(s, [np.zeros(0, dtype=int)] * T if not simo else np.zeros(0, dtype=int))
        per_task = [given] * T if simo else list(given)
        if len(per_task) != T:
            raise ValueError(f"splits[{s!r}]: expected {T} index arrays (one per task), got {len(per_task)}")
        idx_list = []
        for t, idx in enumerate(per_task):
            a = np.asarray(idx)
            if a.size and (a.ndim != 1 or not np.issubdtype(a.dtype, np.integer)):
                raise ValueError(f"splits[{s!r}] for task {names[t]!r}: expected a 1-d integer index array")
            a = a.astype(np.int64)
            n = ys[t].numel()
            if a.size and (a.min() < 0 or a.max() >= n):
                raise ValueError(f"splits[{s!r}] for task {names[t]!r}: index out of range [0, {n})")
            idx_list.append(torch.as_tensor(a))
        out[s] = idx_list
    for t in range(T):
        if out["train"][t].numel() == 0:
            raise ValueError(f"splits['train'] for task {names[t]!r} is empty")
    return out
