"""VMTL: variational multi-task learning with Gumbel-Softmax priors (Shen et al., NeurIPS 2021).

The model is the baseline latent model (``models/baselines.py``) with conditional priors
that mix the other tasks' variational posteriors:

* classifier (eq. 6–7): ``p(w_t) = sum_{i != t} alpha_ti q(w_i)``; the components are the other
  tasks' current posteriors with gradients stopped (they act as "the previous iteration");
* representation (eq. 9–10): ``p(z_tn | x_tn) = sum_{i != t} beta_ti q_phi(z | f(x_tn, D_i))``
  where ``f`` is cross-attention of ``x_tn`` over task i's training samples of the same class,
  encoded by the same inference network ``phi`` as the guide.

The mixing weights and the KL treatment come from the prior specs (``task_mixture`` with
``weights = gumbel_softmax | learned | uniform`` and ``kl = upper_bound | monte_carlo``), so the
paper's ablations (Tables 1–2) are configuration, not code paths.
"""

from __future__ import annotations

import torch

from pyromtl.data.core import Batch, MultiTaskData
from pyromtl.models.baselines import LatentMTLModel
from pyromtl.nn import cross_attention


class ClassAttention:
    """Precomputed ``f(x_tn, D_i)`` of eq. 10 for every training sample and every task i.

    ``f`` lives in input space, so it is computed once per dataset, one class at a time (a
    class's queries only attend over keys of that class, which bounds the memory of the
    score matrices even with DomainNet's 345 classes). The result ``[T, N, T, D]`` stays on the
    model's device unless it exceeds ``max_device_mb``; then it stays in host memory and each
    batch's rows are copied over. Regression tasks have no classes, so their queries attend
    over all of task i's training samples.
    """

    def __init__(self, data: MultiTaskData, device: torch.device, max_device_mb: float = 1024.0):
        if data.simo:
            raise ValueError("VMTL's representation prior needs MIMO data (each task has its own inputs)")
        xs, ys = [], []
        for t in range(data.num_tasks):  # data preparation: flatten each task's training split once
            idx = data.splits["train"][t]
            xs.append(data.x[t][idx].reshape(len(idx), -1))
            y = data.y[t][idx]
            # regression has no classes: every sample of task i is a key (one group)
            ys.append(torch.zeros(len(idx), dtype=torch.long) if data.task_types[t] == "regression" else y.long())
        T, D = data.num_tasks, xs[0].shape[1]
        n_max = max(len(x) for x in xs)
        out = torch.zeros(T, n_max, T, D)
        for c in torch.unique(torch.cat(ys)).tolist():
            members = [torch.nonzero(y == c).squeeze(1) for y in ys]
            # A task without class c falls back to all of its samples, so every component exists.
            members = [m if m.numel() else torch.arange(len(ys[i])) for i, m in enumerate(members)]
            n_c = max(m.numel() for m in members)
            keys = torch.zeros(T, n_c, D)
            mask = torch.zeros(T, n_c, dtype=torch.bool)
            for i, m in enumerate(members):
                keys[i, : m.numel()] = xs[i][m]
                mask[i, : m.numel()] = True
            for t in range(T):
                q_idx = torch.nonzero(ys[t] == c).squeeze(1)
                if q_idx.numel():
                    out[t, q_idx] = cross_attention(xs[t][q_idx], keys, mask)
        on_device = out.numel() * 4 / 2**20 <= max_device_mb
        self.device = device
        self.attended = out.to(device) if on_device else out.pin_memory() if device.type == "cuda" else out

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        """Rows of a training batch (``index [T, B]``): ``[T, B, T, D]``."""
        rows = torch.arange(index.shape[0], device=index.device)[:, None]
        if self.attended.device != index.device:
            return self.attended[rows.cpu(), index.cpu()].to(self.device, non_blocking=True)
        return self.attended[rows, index]


class VMTLModel(LatentMTLModel):
    """VMTL's generative model: eq. 5 with the mixture priors of eq. 6 and 9."""

    def __init__(self, *args, attention: ClassAttention, **kwargs):
        super().__init__(*args, **kwargs)
        self.attention = attention

    def w_components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every task's ``q(w_i)`` as a mixture component, ``[1, 1, T, K, d]``, gradients stopped (eq. 6)."""
        with torch.no_grad():  # no graph through VMTL-AC's network
            loc, scale = self.w_post()
        # no_grad() alone does not stop gradients here: ClassifierPosterior returns its loc
        # Parameter itself, a leaf that requires grad.
        return loc.detach().squeeze(1)[None, None], scale.detach().squeeze(1)[None, None]

    def z_components(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``q_phi(z | f(x_tn, D_i))`` for every task i, ``[T, B, T, d]`` (eq. 9–10).

        Outside training the labels of a batch are not used: every component is then the
        sample's own ``q_phi(z | x)``, which leaves predictions untouched (they use the guide).
        """
        T, B = batch.num_tasks, batch.size
        if batch.split != "train":
            loc, scale = self.encoder(batch.x, batch.simo)
            return loc.unsqueeze(-2).expand(T, B, T, -1), scale.unsqueeze(-2).expand(T, B, T, -1)
        attended = self.attention(batch.index)  # [T, B, T, D]
        loc, scale = self.encoder(attended.reshape(T, B * T, -1), False)
        return loc.reshape(T, B, T, -1), scale.reshape(T, B, T, -1)
