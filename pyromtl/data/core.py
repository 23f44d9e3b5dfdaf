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

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from pyromtl.data.constants import SPLITS, TASK_TYPES, TYPE_CODE
from pyromtl.data.validate import as_names, as_real_array, check_int, validate_arrays

__all__ = ["SPLITS", "TASK_TYPES", "TYPE_CODE", "Batch", "MultiTaskData", "TaskInfo"]


@dataclass(frozen=True)
class TaskInfo:
    """Static per-task facts that models broadcast over (all tensors are ``[T, ...]``).

    ``out_dim`` is the width of every head: the largest class count, or 1 for binary and
    regression tasks. ``class_mask [T, out_dim]`` marks the logits that exist for a task.
    Built by :attr:`MultiTaskData.info`.
    """

    #: The tasks' names.
    names: tuple[str, ...]
    #: Each task's type: ``classification``, ``binary`` or ``regression``.
    types: tuple[str, ...]
    #: Each task's class count (as the dataset records it).
    num_classes: tuple[int, ...]
    #: The width of every head.
    out_dim: int
    #: ``[T]`` integer code of each task's type (``TYPE_CODE``).
    type_code: torch.Tensor
    #: ``[T, out_dim]`` bool mask of the logits each task has.
    class_mask: torch.Tensor
    #: True for SIMO data (one input shared by the tasks), False for MIMO.
    simo: bool
    #: The shape of one sample's input.
    input_shape: tuple[int, ...]

    @property
    def num_tasks(self) -> int:
        """The number of tasks ``T``."""
        return len(self.names)

    @property
    def input_dim(self) -> int:
        """The number of values in one sample's input (the product of ``input_shape``)."""
        return int(np.prod(self.input_shape))

    @functools.cached_property
    def all_classes(self) -> bool:
        """Whether every classification task has all ``out_dim`` classes (``class_mask`` then
        masks no logit a likelihood reads), known without reading the mask off the device."""
        return all(k == self.out_dim for k, t in zip(self.num_classes, self.types) if t == "classification")

    def to(self, device: torch.device | str) -> TaskInfo:
        """The same facts with their tensors (``type_code``, ``class_mask``) on ``device``.

        Args:
            device: where the tensors go.

        Returns:
            A new :class:`TaskInfo`; this one is left as it is.

        Raises:
            RuntimeError: ``device`` names no valid device.
        """
        return replace(self, type_code=self.type_code.to(device), class_mask=self.class_mask.to(device))


@dataclass
class Batch:
    """One task-stacked batch.

    ``x`` is ``[T, B, *input_shape]`` (MIMO) or ``[B, *input_shape]`` (SIMO); ``y`` and ``mask``
    are ``[T, B]`` (labels are stored as floats); ``scale [T, 1]`` is ``N_t / B_t`` for
    training batches (so subsampled log-likelihoods are unbiased) and 1 for evaluation;
    ``index [T, B]`` gives each entry's position in its task's ``split``. Built by
    :meth:`MultiTaskData.train_batch` and :meth:`MultiTaskData.eval_batches`.
    """

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    scale: torch.Tensor
    index: torch.Tensor
    simo: bool
    split: str = "train"
    #: True when ``mask`` is all True by construction (a SIMO training batch): models then skip
    #: masking, which costs an op per site and step and changes nothing. Not an argument, so a
    #: batch made with :func:`dataclasses.replace` (a new mask, say) is masked again.
    unmasked: bool = field(default=False, init=False)

    @property
    def num_tasks(self) -> int:
        """The number of tasks ``T`` (the rows of ``y``)."""
        return self.y.shape[0]

    @property
    def size(self) -> int:
        """The positions per task ``B``, masked ones included (the columns of ``y``)."""
        return self.y.shape[1]


@dataclass
class Padded:
    """One split stacked over tasks on a device, as :meth:`MultiTaskData.padded` caches it.

    Rows past a task's size ``n[t]`` repeat its first row of the split and must be masked.
    """

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

    #: The dataset's name, recorded in runs.
    name: str
    #: The tasks' names, in order.
    task_names: list[str]
    #: Each task's type: ``classification``, ``binary`` or ``regression``.
    task_types: list[str]
    #: Each task's class count.
    num_classes: list[int]
    #: The inputs: one ``[N_t, ...]`` tensor per task (MIMO), or one ``[N, ...]`` tensor (SIMO).
    x: list[torch.Tensor] | torch.Tensor
    #: Each task's ``[N_t]`` float targets (regression ones standardised).
    y: list[torch.Tensor]
    #: ``train``/``val``/``test``: each task's row indices into its ``x`` and ``y``.
    splits: dict[str, list[torch.Tensor]]
    #: Each task's ``(mean, std)`` of the standardisation, ``(0, 1)`` where none was applied.
    target_stats: list[tuple[float, float]]
    #: A known ``[T, T]`` task relatedness, if the data come with one.
    relatedness: np.ndarray | None = None
    #: The names of the classes of the widest classification task, if given.
    class_names: list[str] | None = None
    #: Free text about the data.
    description: str = ""
    #: The fraction of the training split kept by :meth:`with_fraction`; None for all of it.
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
        num_classes: int | Sequence[int | None] | None = None,
        splits: Mapping[str, Sequence | np.ndarray] | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        seed: int = 0,
        standardize: bool = True,
        name: str = "custom",
        relatedness=None,
        class_names: Sequence[str] | None = None,
        description: str = "",
    ) -> MultiTaskData:
        """Validate arrays and build a dataset.

        ``x`` a list of arrays (one per task) gives MIMO, with ``y`` a list of the same length.
        ``x`` one array with ``y`` a dict ``{task: [N]}`` gives SIMO. ``task_types`` is one of
        ``classification``, ``binary``, ``regression``, or a sequence with one per task.
        ``splits`` optionally maps ``train``/``val``/``test`` to per-task index arrays (or to one
        index array shared by all tasks in SIMO), disjoint; otherwise a random split stratified by
        class is drawn with ``seed`` (SIMO: one split, stratified by the task with the most classes).
        Every problem raises ``ValueError`` naming the task and what is wrong.

        Args:
            x: MIMO: a list of per-task input arrays ``[N_t, ...]``; SIMO: one array ``[N, ...]``.
            y: MIMO: a list of per-task target arrays ``[N_t]``; SIMO: a dict ``{task: [N]}``.
            task_types: one task type for all tasks, or one per task.
            task_names: the tasks' names (by default taken from ``y``'s keys, or numbered).
            num_classes: classes per classification task (one for all, or one per task, None to
                infer from the labels).
            splits: ``train``/``val``/``test`` index arrays; None draws a random split.
            val_fraction: fraction of each task held out for validation by the random split.
            test_fraction: fraction of each task held out for test by the random split.
            seed: seeds the random split.
            standardize: standardise regression targets on the training split.
            name: the dataset's name, recorded in runs.
            relatedness: an optional ``[T, T]`` matrix of known task relatedness.
            class_names: optional names of the classes of the widest classification task.
            description: a free-text description.

        Returns:
            The validated, split dataset.

        Raises:
            ValueError: inconsistent shapes, unknown task types, bad labels or targets (including
                regression targets that overflow float32 once standardised), overlapping or
                out-of-range splits, an empty train split, ``val_fraction``/``test_fraction``
                outside [0, 1) or summing to 1 or more, a negative or non-integer ``seed``,
                ``class_names`` of the wrong length, or a ``relatedness`` that is not ``[T, T]``.
        """
        checked = validate_arrays(x, y, task_types, task_names, num_classes)
        xs, ys, names, types, ncls, simo = checked
        T = len(names)
        if splits is None:
            split_idx = _random_splits(ys, types, names, simo, val_fraction, test_fraction, seed)
        else:
            split_idx = _check_splits(splits, ys, names, simo)
        stats: list[tuple[float, float]] = []
        for t in range(T):
            if types[t] == "regression" and standardize:
                # float64, so targets near the float32 limits do not overflow on the way
                y64 = ys[t].double()
                tr = y64[split_idx["train"][t]]
                mean = float(tr.mean())
                std = float(tr.std()) if tr.numel() > 1 else 0.0
                std = std if std > 0 else 1.0
                z = (y64 - mean) / std
                if not bool(torch.isfinite(z.float()).all()):
                    raise ValueError(f"task {names[t]!r}: regression targets overflow float32 once standardised")
                ys[t] = z.float()
                stats.append((mean, std))
            else:
                stats.append((0.0, 1.0))
        labels = as_names(class_names, "class_names") if class_names is not None else None
        if labels is not None:
            widest = max((c for c, k in zip(ncls, types) if k == "classification"), default=0)
            if len(labels) != widest:
                raise ValueError(
                    f"class_names: expected one name per class of the widest classification task ({widest}), "
                    f"got {len(labels)}"
                )
        rel = None
        if relatedness is not None:
            rel = as_real_array(relatedness, "relatedness")
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
            class_names=labels,
            description=str(description),
        )

    # ------------------------------------------------------------------ facts
    @property
    def simo(self) -> bool:
        """True when the tasks share one input tensor (SIMO), False when each has its own (MIMO)."""
        return isinstance(self.x, torch.Tensor)

    @property
    def setting(self) -> str:
        """The setting's name: ``"simo"`` or ``"mimo"``."""
        return "simo" if self.simo else "mimo"

    @property
    def num_tasks(self) -> int:
        """The number of tasks ``T``."""
        return len(self.task_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample's input (the same for every task)."""
        x = self.x if isinstance(self.x, torch.Tensor) else self.x[0]  # SIMO: one shared tensor
        return tuple(x.shape[1:])

    def split_sizes(self, split: str = "train") -> list[int]:
        """Each task's number of samples in ``split``.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Returns:
            One size per task.

        Raises:
            KeyError: no such split.
        """
        return [int(i.numel()) for i in self.splits[split]]

    @property
    def info(self) -> TaskInfo:
        """What models are built from (a new :class:`~pyromtl.data.core.TaskInfo`, on the CPU)."""
        out_dim = max([c if t == "classification" else 1 for c, t in zip(self.num_classes, self.task_types)])
        mask = torch.zeros(self.num_tasks, out_dim, dtype=torch.bool, device="cpu")
        for t, (c, kind) in enumerate(zip(self.num_classes, self.task_types)):
            mask[t, : (c if kind == "classification" else 1)] = True
        return TaskInfo(
            names=tuple(self.task_names),
            types=tuple(self.task_types),
            num_classes=tuple(self.num_classes),
            out_dim=out_dim,
            type_code=torch.tensor([TYPE_CODE[k] for k in self.task_types], device="cpu"),
            class_mask=mask,
            simo=self.simo,
            input_shape=self.input_shape,
        )

    def task_index(self, task: str | int) -> int:
        """Position of a task, by name or index.

        Args:
            task: a task name, or an index in ``range(num_tasks)``.

        Returns:
            The task's index.

        Raises:
            ValueError: no such task.
        """
        if isinstance(task, (int, np.integer)) and not isinstance(task, bool) and 0 <= int(task) < self.num_tasks:
            return int(task)
        if task in self.task_names:
            return self.task_names.index(task)
        raise ValueError(f"unknown task {task!r}; this dataset has tasks {self.task_names}")

    def with_input_shape(self, shape: Sequence[int], name: str | None = None) -> MultiTaskData:
        """The same data with every sample's input reshaped to ``shape`` (e.g. flat 64-d digits as
        ``(1, 8, 8)`` images for a convolutional backbone), under ``name`` (by default the name
        and the shape, ``digits-mixed-1x8x8``: a run names the data it was fitted on).

        Args:
            shape: the new per-sample input shape.
            name: the new dataset's name (None: derived from the name and the shape).

        Returns:
            A new dataset sharing this one's targets and splits.

        Raises:
            ValueError: ``shape`` holds a different number of values, or a size below 1.
            TypeError: an entry of ``shape`` is not a number.
        """
        shape = tuple(int(n) for n in shape)
        if math.prod(shape) != math.prod(self.input_shape) or any(n < 1 for n in shape):
            raise ValueError(
                f"cannot reshape inputs of shape {self.input_shape} ({math.prod(self.input_shape)} numbers) to {shape}"
            )
        x = (
            self.x.reshape(len(self.x), *shape)
            if isinstance(self.x, torch.Tensor)
            else [xt.reshape(len(xt), *shape) for xt in self.x]
        )
        new_name = name if name is not None else f"{self.name}-{'x'.join(map(str, shape))}"
        return replace(self, x=x, name=new_name, _cache={})

    # ------------------------------------------------------------------ splits
    def with_fraction(self, fraction: float | None, seed: int = 0) -> MultiTaskData:
        """Keep ``fraction`` of each task's training split, stratified by class (few-shot).

        Classification tasks keep at least one sample per class present in train. SIMO tasks
        share one subset, stratified by the task with the most classes, and every class of every
        classification or binary task keeps at least one sample. val and test are untouched.
        ``fraction=None`` or 1 (or more) returns the data unchanged.

        Args:
            fraction: the fraction of each task's training split to keep, in (0, 1], or None.
            seed: seeds the draw (a non-negative integer).

        Returns:
            A new dataset with the reduced training split (or this one, unchanged).

        Raises:
            ValueError: ``fraction`` is not above 0 (or is NaN), or ``seed`` is negative or not an
                integer (checked only when a subset is drawn).
        """
        if fraction is None or fraction >= 1.0:
            return self
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        rng = _rng(seed)
        if self.simo:
            idx = self.splits["train"][0].numpy()
            discrete = [self.y[t][idx].numpy() for t, k in enumerate(self.task_types) if k != "regression"]
            labels = _finest(discrete)
            picked = _stratified_take(labels, len(idx), fraction, rng)
            # one stratifying task cannot guarantee the others' classes (e.g. one-vs-rest
            # positives): add one random sample of every class a task would otherwise lose
            chosen = np.zeros(len(idx), dtype=bool)
            chosen[picked] = True
            for lab in discrete:
                for c in np.unique(lab):
                    if not chosen[lab == c].any():
                        chosen[rng.choice(np.flatnonzero(lab == c))] = True
            keep = torch.as_tensor(idx[chosen])
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
    def padded(self, split: str, device: torch.device) -> Padded:
        """A split stacked over tasks and padded to its largest task, on ``device`` (cached).

        MIMO: ``x [T, Nmax, ...]``, ``y [T, Nmax]``; SIMO: the shared ``x [N, ...]`` and ``y [T, N]``.
        ``n [T]`` holds each task's size and ``index [T, Nmax]`` each entry's row (padding repeats the first).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            device: where the tensors go.

        Returns:
            The padded split.

        Raises:
            KeyError: no such split.
        """
        key = (split, str(device))
        if key not in self._cache:
            idx = self.splits[split]
            n = torch.tensor([i.numel() for i in idx], device="cpu")
            nmax = int(n.max())
            pad_idx = torch.zeros(self.num_tasks, nmax, dtype=torch.long, device="cpu")
            for t, i in enumerate(idx):  # data preparation, once per split
                # pad with the split's own first row: masked entries still never show another
                # split's inputs to batch-level statistics (e.g. normalisation layers)
                if i.numel():
                    pad_idx[t] = i[0]
                pad_idx[t, : i.numel()] = i
            if isinstance(self.x, torch.Tensor):  # SIMO
                x = self.x.to(device)
                y = torch.stack([yt for yt in self.y]).to(device)  # [T, N]
                pad = Padded(x=x, y=y, n=n.to(device), index=pad_idx.to(device))
            else:
                x = torch.stack([self.x[t][pad_idx[t]] for t in range(self.num_tasks)]).to(device)
                y = torch.stack([self.y[t][pad_idx[t]] for t in range(self.num_tasks)]).to(device)
                pad = Padded(x=x, y=y, n=n.to(device), index=pad_idx.to(device))
            self._cache[key] = pad
        return self._cache[key]

    def train_batch(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device | str, split: str = "train"
    ) -> Batch:
        """Draw one training batch of up to ``batch_size`` samples per task, without replacement.

        ``split`` names the split it is drawn from (another one for an objective that learns
        some parameters elsewhere, e.g. gates on val).

        A task with fewer than ``batch_size`` training samples contributes all of them (the rest
        of its row is masked). ``scale = N_t / B_t`` keeps the subsampled likelihood unbiased; a
        task without rows in ``split`` gets a fully masked row and scale 0.

        Args:
            batch_size: the most samples drawn per task, at least 1.
            generator: the random generator for the draw (None: the global one).
            device: where the batch goes.
            split: the split it is drawn from.

        Returns:
            The batch, with its mask, scale and positions.

        Raises:
            KeyError: no such split.
            ValueError: ``batch_size`` below 1, or a SIMO split without rows.
            RuntimeError: ``device`` names no valid device.
        """
        check_int("batch_size", batch_size, 1)
        device = torch.device(device)
        pad = self.padded(split, device)
        T = self.num_tasks
        n = pad.n
        if self.simo:
            N = int(n[0])
            if N == 0:
                raise ValueError(f"split {split!r} of {self.name!r} has no rows to draw a batch from")
            B = min(batch_size, N)
            perm = torch.randperm(N, generator=generator, device="cpu")[:B].to(device)
            rows = pad.index[0, perm]
            x, y = pad.x[rows], pad.y[:, rows]
            pos = perm.expand(T, B)
            mask = torch.ones(T, B, dtype=torch.bool, device=device)
            scale = torch.full((T, 1), N / B, device=device)
            batch = Batch(x=x, y=y, mask=mask, scale=scale, index=pos, simo=True, split=split)
            batch.unmasked = True
            return batch
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
        scale = (n / taken.clamp(min=1)).to(torch.float32)[:, None]  # a task without rows: 0, not 0/0
        return Batch(x=x, y=y, mask=mask, scale=scale, index=pos, simo=False, split=split)

    def eval_batches(self, split: str, device: torch.device | str, batch_size: int = 4096) -> Iterator[Batch]:
        """Yield the whole split in padded, masked chunks (``scale = 1``).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            device: where the batches go.
            batch_size: positions per chunk.

        Yields:
            The split's batches, in order.

        Raises:
            ValueError: no such split (raised by the first ``next``, as for any generator).
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        device = torch.device(device)
        pad = self.padded(split, device)
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
            yield Batch(
                x=x, y=y, mask=mask, scale=torch.ones(T, 1, device=device), index=pos, simo=self.simo, split=split
            )

    def split_arrays(self, split: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per-task ``(x, y)`` numpy arrays of one split (targets standardised).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Returns:
            Two lists, inputs and targets, one array per task.

        Raises:
            KeyError: no such split.
        """
        xs, ys = [], []
        for t in range(self.num_tasks):
            i = self.splits[split][t]
            x = self.x if self.simo else self.x[t]
            xs.append(x[i].numpy())
            ys.append(self.y[t][i].numpy())
        return xs, ys

    def __repr__(self) -> str:
        """Name, setting, input shape and every task's type and train/val/test sizes; no tensors."""
        tasks = [f"{self._task_kind(t)} {self._task_sizes(t)}" for t in range(min(self.num_tasks, _REPR_TASKS))]
        if self.num_tasks > _REPR_TASKS:
            tasks.append(f"... {self.num_tasks - _REPR_TASKS} more")
        few = f", fraction={self.fraction}" if self.fraction is not None else ""
        return (
            f"MultiTaskData({self.name!r}, {self.setting.upper()}, input {self.input_shape}{few}, "
            f"{self.num_tasks} tasks (train/val/test): {'; '.join(tasks)})"
        )

    def _task_kind(self, t: int) -> str:
        """``name: type`` of task ``t``, with the class count of a classification task."""
        kind = self.task_types[t]
        extra = f" ({self.num_classes[t]} classes)" if kind == "classification" else ""
        return f"{self.task_names[t]}: {kind}{extra}"

    def _task_sizes(self, t: int) -> str:
        """``train/val/test`` sizes of task ``t``."""
        return "/".join(str(self.splits[s][t].numel()) for s in SPLITS)

    def summary(self) -> str:
        """One line per task: type, classes and split sizes.

        Returns:
            A header line (name, setting, task count, input shape), then one line per task.
        """
        lines = [f"{self.name}: {self.setting.upper()}, {self.num_tasks} tasks, input {self.input_shape}"]
        lines += [f"  {self._task_kind(t)}, train/val/test = {self._task_sizes(t)}" for t in range(self.num_tasks)]
        return "\n".join(lines)


#: Tasks ``repr`` lists before it only counts the rest (CIFAR-MTL has 40).
_REPR_TASKS = 12


def _stratified_take(labels: np.ndarray | None, n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Positions of a stratified ``fraction`` of ``n`` items (at least one per class)."""
    if labels is None:
        k = max(1, round(fraction * n))
        return rng.permutation(n)[:k]
    picked = []
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        k = max(1, round(fraction * len(pos)))
        picked.append(rng.permutation(pos)[:k])
    return np.concatenate(picked)


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(int(seed))


def _finest(labels: list[np.ndarray]) -> np.ndarray | None:
    """The label array with the most distinct values (first on ties), or None if there is none."""
    if not labels:
        return None
    return max(labels, key=lambda lab: len(np.unique(lab)))


def _random_splits(ys, types, names, simo, val_fraction, test_fraction, seed) -> dict[str, list[torch.Tensor]]:
    fractions_ok = all(
        isinstance(f, (int, float, np.integer, np.floating)) and not isinstance(f, bool)
        for f in (val_fraction, test_fraction)
    )
    if not (fractions_ok and 0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            "val_fraction and test_fraction must be in [0, 1) and sum below 1, "
            f"got {val_fraction!r} and {test_fraction!r}"
        )
    rng = _rng(seed)
    out: dict[str, list[torch.Tensor]] = {s: [] for s in SPLITS}
    tasks = [0] if simo else range(len(ys))
    for t in tasks:
        n = ys[t].numel()
        if simo:  # one split for all tasks: stratify on the task with the most classes
            labels = _finest([y.numpy() for y, k in zip(ys, types) if k != "regression"])
        else:
            labels = ys[t].numpy() if types[t] != "regression" else None
        groups = [np.flatnonzero(labels == c) for c in np.unique(labels)] if labels is not None else [np.arange(n)]
        parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        for g in groups:
            g = rng.permutation(g)
            n_test = round(test_fraction * len(g))
            n_val = round(val_fraction * len(g))
            parts["test"].append(g[:n_test])
            parts["val"].append(g[n_test : n_test + n_val])
            parts["train"].append(g[n_test + n_val :])
        for s in SPLITS:
            out[s].append(torch.as_tensor(np.sort(np.concatenate(parts[s])), dtype=torch.long))
    if simo:
        out = {s: out[s] * len(ys) for s in SPLITS}
    for t, idx in enumerate(out["train"]):
        if idx.numel() == 0:
            raise ValueError(
                f"task {names[t]!r}: the train split is empty; give more samples or smaller val/test fractions"
            )
    return out


def _check_splits(splits, ys, names, simo) -> dict[str, list[torch.Tensor]]:
    if not isinstance(splits, Mapping):
        raise ValueError(f"splits: expected a mapping of split name to indices, got {type(splits).__name__}")
    unknown = set(map(str, splits)) - set(SPLITS)
    if unknown:
        raise ValueError(f"splits: unknown split names {sorted(unknown)}; use {list(SPLITS)}")
    if "train" not in splits:
        raise ValueError("splits: a 'train' split is required")
    out: dict[str, list[torch.Tensor]] = {}
    T = len(names)
    for s in SPLITS:
        given = splits.get(s, [np.zeros(0, dtype=int)] * T if not simo else np.zeros(0, dtype=int))
        try:
            per_task = [given] * T if simo else list(given)
        except TypeError:  # not iterable
            raise ValueError(f"splits[{s!r}]: expected one index array per task, got {given!r}") from None
        if len(per_task) != T:
            raise ValueError(f"splits[{s!r}]: expected {T} index arrays (one per task), got {len(per_task)}")
        idx_list = []
        for t, idx in enumerate(per_task):
            bad = ValueError(f"splits[{s!r}] for task {names[t]!r}: expected a 1-d integer index array")
            try:
                a = np.asarray(idx)
            except (TypeError, ValueError, OverflowError):
                raise bad from None
            if a.size and (a.ndim != 1 or not np.issubdtype(a.dtype, np.integer)):
                raise bad
            a = a.astype(np.int64)
            n = ys[t].numel()
            if a.size and (a.min() < 0 or a.max() >= n):
                raise ValueError(f"splits[{s!r}] for task {names[t]!r}: index out of range [0, {n})")
            idx_list.append(torch.as_tensor(a))
        out[s] = idx_list
    for t in range(T):
        if out["train"][t].numel() == 0:
            raise ValueError(f"splits['train'] for task {names[t]!r} is empty")
        # a row listed twice, or in two splits, would leak between training and evaluation
        every = np.concatenate([out[s][t].numpy() for s in SPLITS])
        if len(np.unique(every)) != len(every):
            raise ValueError(f"splits for task {names[t]!r}: an index appears twice (within or across splits)")
    return out
