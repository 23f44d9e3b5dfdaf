"""The collectives of one multi-process run (:mod:`pyromtl.distributed`): a process's shard of a
global batch, and the all-reduces and all-gathers that make its step the global batch's."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from pyromtl.data.core import Batch


def world_size(cfg: Mapping[str, Any]) -> int:
    """The number of processes of a run: ``devices × num_nodes``."""
    return int(cfg["devices"]) * int(cfg["num_nodes"])


def node_rank() -> int:
    """This machine's rank among ``num_nodes``: Lightning's ``NODE_RANK`` (0 when unset)."""
    value = os.environ.get("NODE_RANK", "0")
    if not value.isdigit():
        raise ValueError(f"NODE_RANK must be a machine's index 0, 1, ..., got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Group:
    """This process's place among the ``world_size`` processes of a run (rank 0 writes)."""

    rank: int
    world_size: int

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def rows(self, size: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows of a global batch of ``size`` rows, and which of them are real.

        Shards are consecutive slices of ``ceil(size / W)`` rows; the last ones are padded to that
        length with the first row (not real), so every process draws per-example noise of one
        shape and the RNGs of all processes stay in step."""
        length = -(-size // self.world_size)
        start = min(self.rank * length, size)
        rows = torch.arange(start, start + length, device=device)
        real = rows < size
        return torch.where(real, rows, 0), real

    def shard(self, batch: Batch) -> Batch:
        """This process's shard of a global batch (its :meth:`rows` of every task, the padding
        masked), scaled by W (the scaling rule of the module doc)."""
        rows, real = self.rows(batch.size, batch.y.device)
        return dataclasses.replace(
            batch,
            x=batch.x[rows] if batch.simo else batch.x[:, rows],
            y=batch.y[:, rows],
            mask=batch.mask[:, rows] & real,
            index=batch.index[:, rows],
            scale=batch.scale * self.world_size,
        )

    def mean_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the processes, in one all-reduce."""
        tensors = list(tensors)
        if not tensors:
            return
        flat = _flatten_dense_tensors(tensors)
        dist.all_reduce(flat)
        flat /= self.world_size
        for t, reduced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
            t.copy_(reduced)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over the processes (a new tensor)."""
        out = tensor.detach().clone()
        self.mean_([out])
        return out

    def global_value(self, local: torch.Tensor) -> torch.Tensor:
        """``local`` with the processes' mean as its value and its own gradient: a nonlinear function
        of it then back-propagates the global batch's derivative into each shard's graph."""
        return local + (self.mean(local) - local.detach())

    def gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every process's ``tensor`` concatenated along ``dim`` in rank order: the global batch's rows
        when ``tensor`` holds a shard's (shards are consecutive slices)."""
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim)

    def mean_gradients(self, params: Iterable[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Average the gradients of ``params`` and the step's ``loss`` over the processes, in one
        all-reduce; return the global loss.

        A parameter keeps no gradient only if it has none on any process (an optimiser treats
        a missing gradient and a zero one differently); one that has none on some processes (a
        non-finite local loss is not back-propagated) counts as zero there, so every process
        reduces the same tensors."""
        params = list(params)
        loss = loss.detach().reshape(1)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        present = torch.tensor([float(p.grad is not None) for p in params], device=loss.device, dtype=loss.dtype)
        reduced = [*grads, present, loss]
        self.mean_(reduced)
        for p, grad, seen in zip(params, grads, present.tolist()):
            p.grad = grad if seen > 0 else None
        return reduced[-1][0]
