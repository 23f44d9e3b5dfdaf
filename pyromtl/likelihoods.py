"""The observation model shared by every method: one distribution over all tasks at once.

Tasks of different types (classification, binary, regression) sit in one ``[..., T, B]``
batch, so a step never loops over tasks. Heads emit ``out_dim`` channels per task:
class logits (padded classes masked out), one logit for binary tasks, or the predictive mean
for regression tasks (on standardised targets).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution
from pyro.distributions.util import broadcast_shape
from torch.distributions import constraints

from pyromtl.data.core import TYPE_CODE, TaskInfo

_CLS, _BIN, _REG = TYPE_CODE["classification"], TYPE_CODE["binary"], TYPE_CODE["regression"]


def masked_logits(outputs: torch.Tensor, info: TaskInfo) -> torch.Tensor:
    """Set the logits of classes a task does not have to a large negative number."""
    if info.all_classes:
        return outputs
    mask = info.class_mask[:, None, :]  # [T, 1, K] broadcasts over [..., T, B, K]
    return outputs.masked_fill(~mask, -1e9)


class MultiTaskOutput(TorchDistribution):
    """``p(y | outputs)`` for every task and sample; ``batch_shape = outputs.shape[:-1]``.

    ``noise`` (``[T]``) is the Gaussian observation scale of regression tasks (None without
    regression tasks). Only the task types present are evaluated, so single-type datasets pay
    for one likelihood.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {}
    support = constraints.real
    has_rsample = False

    def __init__(self, outputs: torch.Tensor, info: TaskInfo, noise: torch.Tensor | None, validate_args=None):
        self.outputs = outputs
        self.info = info
        self.noise = noise
        self._types = set(info.types)
        super().__init__(outputs.shape[:-1], torch.Size(), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) == self.batch_shape and _instance is None:
            return self  # already at the plates' shape
        new = self._get_checked_instance(MultiTaskOutput, _instance)
        shape = torch.Size(batch_shape) + self.outputs.shape[-1:]
        new.outputs = self.outputs.expand(shape)
        new.info, new.noise, new._types = self.info, self.noise, self._types
        super(MultiTaskOutput, new).__init__(torch.Size(batch_shape), torch.Size(), validate_args=False)
        return new

    def _select(
        self, cls: Callable[[], torch.Tensor], binary: Callable[[], torch.Tensor], reg: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """Combine per-type tensors by each task's type (``[T, 1]`` broadcasts over samples)."""
        if len(self._types) == 1:
            return {"classification": cls, "binary": binary, "regression": reg}[next(iter(self._types))]()
        code = self.info.type_code[:, None]
        parts = {
            k: f() for k, f in (("classification", cls), ("binary", binary), ("regression", reg)) if k in self._types
        }
        # two or more types are present here: the base is the first of regression, binary, classification
        out = next(parts[k] for k in ("regression", "binary", "classification") if k in parts)
        if "binary" in parts:
            out = torch.where(code == _BIN, parts["binary"], out)
        if "classification" in parts:
            out = torch.where(code == _CLS, parts["classification"], out)
        return out

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        out = self.outputs

        def cls():
            logp = torch.log_softmax(masked_logits(out, self.info), dim=-1)
            shape = torch.Size(broadcast_shape(logp.shape[:-1], value.shape))
            labels = value.long().clamp(0, out.shape[-1] - 1).expand(shape).unsqueeze(-1)
            return torch.gather(logp.expand(shape + logp.shape[-1:]), -1, labels).squeeze(-1)

        def binary():
            return -F.binary_cross_entropy_with_logits(out[..., 0], value.expand_as(out[..., 0]), reduction="none")

        def reg():
            assert self.noise is not None  # set whenever the data has regression tasks
            scale = self.noise[:, None]
            return -0.5 * ((value - out[..., 0]) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)

        return self._select(cls, binary, reg)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        out = self.outputs.expand(torch.Size(sample_shape) + self.outputs.shape)
        with torch.no_grad():

            def cls():
                return torch.distributions.Categorical(logits=masked_logits(out, self.info)).sample().to(out.dtype)

            def binary():
                return torch.bernoulli(torch.sigmoid(out[..., 0]))

            def reg():
                assert self.noise is not None
                return out[..., 0] + self.noise[:, None] * torch.randn_like(out[..., 0])

            return self._select(cls, binary, reg)


def predictive_probs(outputs: torch.Tensor, info: TaskInfo) -> torch.Tensor:
    """Per-draw predictive quantities, ``[..., T, B, K]``.

    Class probabilities for classification, ``P(y=1)`` in channel 0 for binary tasks and the
    mean in channel 0 for regression. Averaging these over posterior draws gives the
    Monte-Carlo predictive (VMTL eq. 12).
    """
    probs = torch.softmax(masked_logits(outputs, info), dim=-1)
    sig = torch.sigmoid(outputs)
    code = info.type_code[:, None, None]
    return torch.where(code == _CLS, probs, torch.where(code == _BIN, sig, outputs))
