"""VMTL's training loss written by hand in plain PyTorch (no Pyro), as the speed reference.

It computes the same objective as ``pyromtl``'s ``vmtl`` method (model ``models/vmtl.py``,
guide ``guides/vmtl.py``, ``TraceMeanField_ELBO``), term by term:

* ``q_phi(z | x) = N(mu(x), diag sigma(x)^2)`` from one shared MLP encoder (VMTL eq. 3);
* ``q(w_t) = prod_c N(mu_tc, diag sigma_tc^2)`` (eq. 8);
* the classifier prior ``p(w_t) = sum_{i != t} alpha_ti sg[q(w_i)]`` with Gumbel-Softmax weights
  ``alpha_t ~ RelaxedOneHotCategorical(tau, logits=pi_t)`` (eq. 6-7), and the representation prior
  ``p(z_tn | x_tn) = sum_{i != t} beta_ti q_phi(z | f(x_tn, D_i))`` whose attention ``f`` over task
  i's same-class training inputs is precomputed once (eq. 9-10); its components are encoded
  without a graph (the previous phi) and their scales floored at ``min_scale``;
* both KLs replaced by the closed-form upper bound ``sum_i alpha_ti KL(q_t || q_i)`` (eq. 11);
  for z, each sample evaluates ``k = z_components`` other tasks drawn uniformly without
  replacement (all T-1 when ``k >= T-1``) and weights them ``beta_ti (T-1)/k``, an unbiased
  estimate of the bound;
* the likelihood averaged over L x M reparameterised draws of z and w (eq. 11), each subsampled
  task scaled by ``N_t / B_t`` and padded rows masked.

The random draws are taken in the order Pyro takes them (guide: w then z; model: alpha, the
z components' tasks, then beta), so with the same parameters and seed both losses agree to rounding
(``vmtl_step.py --check``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def precompute_attention(x: torch.Tensor, y: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``f(x_tn, D_i)`` (eq. 10) for every padded training row and every task: ``[T, N, T, D]``.

    ``x [T, N, D]`` padded training inputs, ``y [T, N]`` labels, ``n [T]`` valid rows per task.
    Queries of class c attend over task i's rows of class c (all of task i's rows when it has
    none). One-off data preparation, so plain loops are fine here.
    """
    T, N, D = x.shape
    valid = torch.arange(N)[None, :] < n[:, None]
    out = torch.zeros(T, N, T, D, dtype=x.dtype)
    for c in torch.unique(y[valid]).tolist():
        key_sets = []
        for i in range(T):
            m = valid[i] & (y[i] == c)
            key_sets.append(x[i][m] if m.any() else x[i][valid[i]])
        for t in range(T):
            rows = torch.nonzero(valid[t] & (y[t] == c)).squeeze(1)
            if rows.numel() == 0:
                continue
            q = x[t][rows]
            for i, keys in enumerate(key_sets):
                attn = torch.softmax(q @ keys.T / math.sqrt(D), dim=-1)
                out[t, rows, i] = attn @ keys
    return out


def _others_index(T: int, device) -> torch.Tensor:
    j = torch.arange(T - 1, device=device)
    t = torch.arange(T, device=device)[:, None]
    return j + (j >= t).long()


def gumbel_softmax_weights(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``[T, T]`` mixing weights with a zero diagonal: a relaxed one-hot draw over the other tasks."""
    T = logits.shape[0]
    rows = torch.distributions.RelaxedOneHotCategorical(
        torch.full((), tau, device=logits.device, dtype=logits.dtype), logits=logits
    ).rsample()
    rows = rows / rows.sum(-1, keepdim=True)
    return torch.zeros(T, T, device=logits.device, dtype=logits.dtype).scatter(1, _others_index(T, logits.device), rows)


def kl_normal_bound(q_loc, q_scale, p_loc, p_scale, weights, event_dims: int) -> torch.Tensor:
    """``sum_i weights_i KL(N(q) || N(p_i))`` summed over the last ``event_dims`` dims.

    ``q_*`` lack the component dim, which sits just left of the event dims in ``p_*``.
    """
    comp = -(event_dims + 1)
    q_loc, q_scale = q_loc.unsqueeze(comp), q_scale.unsqueeze(comp)
    ratio = (q_scale / p_scale) ** 2
    kl = 0.5 * (ratio + ((q_loc - p_loc) / p_scale) ** 2 - 1.0 - ratio.log())
    return (weights * kl.sum(dim=tuple(range(-event_dims, 0)))).sum(-1)


class PlainVMTL(nn.Module):
    """All of VMTL's trainable state and its loss, for MIMO classification tasks."""

    def __init__(
        self,
        num_tasks: int,
        num_classes: int,
        input_dim: int,
        hidden: list[int],
        latent_dim: int,
        attended: torch.Tensor,
        class_mask: torch.Tensor,
        mc_z: int = 10,
        mc_w: int = 10,
        z_components: int = 8,
        min_scale: float = 0.5,
    ):
        super().__init__()
        T, K, d = num_tasks, num_classes, latent_dim
        dims = [input_dim, *hidden, 2 * d]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.ELU())
        self.encoder = nn.Sequential(*layers)
        self.latent_dim = d
        self.w_loc = nn.Parameter(torch.randn(T, 1, K, d) / d**0.5)
        self.w_raw_scale = nn.Parameter(torch.full((T, 1, K, d), 0.1).expm1().log())
        self.bias = nn.Parameter(torch.zeros(T, 1, K))
        self.logits_w = nn.Parameter(torch.zeros(T, T - 1))
        self.logits_z = nn.Parameter(torch.zeros(T, T - 1))
        self.register_buffer("attended", attended)
        self.register_buffer("class_mask", class_mask)
        self.mc_z, self.mc_w = mc_z, mc_w
        self.z_components, self.min_scale = z_components, min_scale
        self.register_buffer("others", _others_index(T, "cpu"))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self.encoder(x).split(self.latent_dim, dim=-1)
        return loc, F.softplus(raw) + 1e-3

    def forward(self, x, y, mask, scale, index, tau: float, kl_w: float, kl_z: float) -> torch.Tensor:
        """The negative ELBO of one task-stacked batch (``x [T, B, D]``, the rest ``[T, B]``, ``scale [T, 1]``).

        ``kl_w`` and ``kl_z`` weight the two KL terms (annealed weight times the site's own weight).
        """
        T, B = y.shape
        L, M = self.mc_z, self.mc_w
        # q(w) and q(z|x), reparameterised (the guide's draws, in its order)
        w_loc, w_scale = self.w_loc, F.softplus(self.w_raw_scale) + 1e-5
        w = w_loc + torch.randn((M,) + w_loc.shape, device=w_loc.device) * w_scale  # [M, T, 1, K, d]
        z_loc, z_scale = self.encode(x.reshape(T, B, -1))  # [T, B, d]
        z = z_loc + torch.randn((L, 1) + z_loc.shape, device=z_loc.device) * z_scale  # [L, 1, T, B, d]
        weight = (mask * scale).to(z.dtype)  # [T, B]: N_t / B_t, 0 on padding

        # classifier prior: the other tasks' q(w_i), gradients stopped (eq. 6-7)
        alpha = gumbel_softmax_weights(self.logits_w, tau)
        kl_bound_w = kl_normal_bound(
            w_loc, w_scale, w_loc.detach().squeeze(1), w_scale.detach().squeeze(1), alpha[:, None, :], 2
        ).sum()

        # representation prior: q_phi(z | f(x_tn, D_i)) for k other tasks i per sample (eq. 9-10)
        k = min(self.z_components, T - 1)
        if k == T - 1:  # every other task: the exact bound
            tasks, inclusion = self.others[:, None, :], 1.0
        else:  # k distinct other tasks per sample, uniformly: the top k of uniform keys
            picked = torch.rand(T, B, T - 1, device=index.device).topk(k, dim=-1, sorted=False).indices
            tasks, inclusion = self.others[:, None, :].expand(T, B, T - 1).gather(-1, picked), k / (T - 1)
        rows = torch.arange(T, device=index.device)[:, None, None]
        with torch.no_grad():  # the previous phi (eq. 9): forward only
            c_loc, c_scale = self.encode(self.attended[rows, index[:, :, None], tasks].reshape(T, B * k, -1))
        c_loc, c_scale = c_loc.reshape(T, B, k, -1), c_scale.clamp_min(self.min_scale).reshape(T, B, k, -1)
        beta = gumbel_softmax_weights(self.logits_z, tau)
        beta = beta[:, None, :].expand(T, tasks.shape[1], T).gather(-1, tasks)  # beta_ti of each component
        if inclusion < 1.0:
            beta = beta / inclusion  # Horvitz-Thompson weights: unbiased for the sum over every task
        kl_bound_z = (kl_normal_bound(z_loc, z_scale, c_loc, c_scale, beta, 1) * weight).sum()

        # likelihood of every (l, m) pair of draws (eq. 11)
        # one batched product per task over (L B) x (M K), without copying z M times
        logits = torch.einsum("ltbd,mtkd->lmtbk", z.squeeze(1), w.squeeze(-3)) + self.bias  # [L, M, T, B, K]
        logp = torch.log_softmax(logits.masked_fill(~self.class_mask[:, None, :], -1e9), dim=-1)
        labels = y.long().expand(L, M, T, B).unsqueeze(-1)
        loglik = (torch.gather(logp, -1, labels).squeeze(-1) * weight).sum() / (L * M)
        return kl_w * kl_bound_w + kl_z * kl_bound_z - loglik
