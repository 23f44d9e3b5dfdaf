"""Building blocks of HIB, compressed hierarchical representations (Machado de Freitas et al., IJCNN 2022).

Pure torch / numpy / scipy pieces that a Pyro model and guide for ``hib`` are assembled from.
Equation numbers refer to the paper.

* :func:`channel_kl`: the per-sample, per-task KL of eq. 7-8, the upper bound on ``I(X; W_j)``
  for the noise channels ``W_j = Z + N_j`` of eq. 1.
* :func:`noise_distance`: the task dissimilarity of eq. 11.
* :func:`cluster_tasks`, :func:`clustering_margin`, :func:`clustering_success`: hierarchical task
  clustering and the success criterion of the paper's ablation (Section V-B, Table V).
* :func:`gaussian_optimal_precisions`: the optimal noise precisions of the Gaussian analysis
  (Section IV, eq. 10), and :func:`two_task_gaussian`, a jointly Gaussian two-task problem on
  which the analysis can be checked.

Everything a training step calls (:func:`channel_kl`, :func:`noise_distance`) broadcasts over a
leading task dimension and runs on the device of its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

__all__ = [
    "TwoTaskGaussian",
    "channel_kl",
    "cluster_tasks",
    "clustering_margin",
    "clustering_success",
    "gaussian_optimal_precisions",
    "noise_distance",
    "two_task_gaussian",
]

#: Linkage rules that are meaningful for an arbitrary (non-Euclidean) dissimilarity.
LINKAGE_METHODS = ("single", "complete", "average", "weighted")


# --------------------------------------------------------------------------- eq. 7-8 and eq. 11


def _check_task_param(name: str, value: torch.Tensor, num_tasks: int, dim: int) -> None:
    if value.shape not in ((num_tasks, dim), (dim,)):
        raise ValueError(f"{name}: expected shape ({num_tasks}, {dim}) or ({dim},), got {tuple(value.shape)}")


def channel_kl(
    z: torch.Tensor,
    log_var: torch.Tensor,
    prior_loc: torch.Tensor,
    prior_log_var: torch.Tensor,
) -> torch.Tensor:
    """``KL(N(z_b, diag σ_j²) ‖ N(ν_j, diag ξ_j²))`` for every sample b and task j (eq. 7-8).

    Averaged over the samples, this is the variational upper bound on ``I(X; W_j)`` of eq. 7
    for the channel ``W_j = Z + N_j`` (eq. 1), with ``z = f_θ(x)`` the task-agnostic
    representation and ``q_j = N(ν_j, diag ξ_j²)`` the learned marginal.

    This is the exact KL between the two diagonal Gaussians, summed over the D dimensions::

        ½ Σ_i [ log(ξ²_ji / σ²_ji) + (σ²_ji + (z_bi − ν_ji)²) / ξ²_ji − 1 ]

    Eq. 8 as printed has ``log(ξ²/σ²)`` without the factor ½; the other two terms agree. The
    authors' code keeps the ½, as here; only this form is the Gaussian KL. The printed form
    exceeds it by ``½ Σ_i log(ξ²_ji / σ²_ji)``. Minimised over ``ξ_j`` (as eq. 8 is), the printed
    bound is twice the KL bound plus the constant ``D (½ − log 2)``, so training with it amounts
    to doubling β: its optimum is eq. 10 at 2β, not at β.

    Args:
        z: ``[B, D]`` representations ``f_θ(x)``.
        log_var: ``[T, D]`` log noise variances ``log σ²_j`` of the channels.
        prior_loc: ``[T, D]`` or ``[D]`` (shared by the tasks) means ``ν_j``; the paper freezes
            them at 0.
        prior_log_var: ``[T, D]`` or ``[D]`` log variances ``log ξ²_j``.

    Returns:
        ``[B, T]``: the KL of sample b's channel output under task j's marginal, in nats.

    Raises:
        ValueError: when a shape does not fit the others.
    """
    if z.dim() != 2:
        raise ValueError(f"z: expected shape [B, D], got {tuple(z.shape)}")
    if log_var.dim() != 2:
        raise ValueError(f"log_var: expected shape [T, D], got {tuple(log_var.shape)}")
    num_tasks, dim = log_var.shape
    if z.shape[1] != dim:
        raise ValueError(f"z has {z.shape[1]} dimensions but log_var has {dim}")
    _check_task_param("prior_loc", prior_loc, num_tasks, dim)
    _check_task_param("prior_log_var", prior_log_var, num_tasks, dim)
    prior_precision = torch.exp(-prior_log_var)
    # [T, D]: the part that does not depend on the sample
    per_task = prior_log_var - log_var + torch.exp(log_var) * prior_precision - 1.0
    # [B, T, D] -> [B, T]: the Mahalanobis term, the only one that needs every (b, j) pair
    mahalanobis = ((z.unsqueeze(-2) - prior_loc).square() * prior_precision).sum(-1)
    return 0.5 * (per_task.sum(-1) + mahalanobis)


def noise_distance(log_var: torch.Tensor) -> torch.Tensor:
    """Task dissimilarity of eq. 11: ``d(a, b) = Σ_i |log σ²_{a,i} − log σ²_{b,i}|``.

    Args:
        log_var: ``[T, D]`` log noise variances, one row per task.

    Returns:
        ``[T, T]`` symmetric, zero on the diagonal, differentiable in ``log_var``.

    Raises:
        ValueError: when ``log_var`` is not a ``[T, D]`` matrix.
    """
    if log_var.dim() != 2:
        raise ValueError(f"log_var: expected shape [T, D], got {tuple(log_var.shape)}")
    return torch.cdist(log_var, log_var, p=1.0)


# --------------------------------------------------------------------------- task clustering


def _distance_matrix(distance: ArrayLike | torch.Tensor) -> np.ndarray:
    """``distance`` as a float64 array, checked to be a dissimilarity between at least 2 tasks."""
    if isinstance(distance, torch.Tensor):
        distance = distance.detach().cpu().numpy()
    d = np.asarray(distance, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"distance: expected a square [T, T] matrix, got shape {d.shape}")
    if d.shape[0] < 2:
        raise ValueError("distance: need at least 2 tasks")
    if not np.isfinite(d).all():
        raise ValueError("distance: contains NaN or inf")
    if (d < 0).any():
        raise ValueError("distance: contains negative entries")
    scale = max(1.0, float(d.max()))
    if not np.allclose(d, d.T, rtol=0.0, atol=1e-9 * scale):
        raise ValueError("distance: not symmetric")
    if np.abs(np.diag(d)).max() > 1e-9 * scale:
        raise ValueError("distance: the diagonal is not zero")
    return d


def cluster_tasks(distance: ArrayLike | torch.Tensor, method: str = "average") -> np.ndarray:
    """Agglomerative clustering of the tasks from a dissimilarity such as eq. 11.

    Args:
        distance: ``[T, T]`` symmetric, non-negative, zero diagonal (e.g. :func:`noise_distance`).
        method: the linkage rule, one of ``single``, ``complete``, ``average``, ``weighted``
            (those defined for any dissimilarity, not only Euclidean ones).

    Returns:
        The ``[T − 1, 4]`` linkage matrix of ``scipy.cluster.hierarchy``, usable with its
        ``fcluster`` and ``dendrogram`` and with :func:`pyromtl.plots.plot_dendrogram`.

    Raises:
        ValueError: for an invalid matrix or an unknown method.
    """
    if method not in LINKAGE_METHODS:
        raise ValueError(f"method: expected one of {LINKAGE_METHODS}, got {method!r}")
    d = _distance_matrix(distance)
    # the symmetric average removes rounding asymmetry, which squareform rejects
    return hierarchy.linkage(squareform(0.5 * (d + d.T), checks=False), method=method)


def _same_group(groups: ArrayLike | torch.Tensor, num_tasks: int) -> np.ndarray:
    """``[T, T]`` boolean same-group matrix from labels ``[T]`` or a 0/1 matrix ``[T, T]``."""
    if isinstance(groups, torch.Tensor):
        groups = groups.detach().cpu().numpy()
    g = np.asarray(groups)
    if g.shape == (num_tasks,):
        return g[:, None] == g[None, :]
    if g.shape == (num_tasks, num_tasks):
        if not np.isin(g, (0, 1)).all():
            raise ValueError("groups: a [T, T] same-group matrix must hold only 0 and 1")
        if not (g == g.T).all():
            raise ValueError("groups: the same-group matrix is not symmetric")
        return g.astype(bool)
    raise ValueError(
        f"groups: expected labels of shape ({num_tasks},) or a 0/1 matrix "
        f"({num_tasks}, {num_tasks}), got shape {g.shape}"
    )


def clustering_margin(distance: ArrayLike | torch.Tensor, groups: ArrayLike | torch.Tensor) -> float:
    """Smallest distance between tasks of different groups minus largest distance within a group.

    Positive exactly when the clustering succeeds in the sense of the paper's ablation
    (Section V-B): every pair from different groups is farther apart than every pair from the
    same group. Its size says by how much, in the units of ``distance``.

    Args:
        distance: ``[T, T]`` dissimilarity (e.g. :func:`noise_distance`).
        groups: the true grouping, as a label per task ``[T]`` or as a ``[T, T]`` 0/1 matrix with
            1 for tasks in the same group (as ``MultiTaskData.relatedness`` holds). The diagonal
            of the matrix is ignored.

    Returns:
        The margin, in the units of ``distance``.

    Raises:
        ValueError: for invalid input, or a grouping without both a within-group pair and an
            across-group pair (the criterion is then undefined).
    """
    d = _distance_matrix(distance)
    same = _same_group(groups, d.shape[0])
    off_diagonal = ~np.eye(d.shape[0], dtype=bool)
    within, across = d[same & off_diagonal], d[~same & off_diagonal]
    if within.size == 0 or across.size == 0:
        raise ValueError("groups: need at least one pair of tasks in the same group and one in different groups")
    return float(across.min() - within.max())


def clustering_success(distance: ArrayLike | torch.Tensor, groups: ArrayLike | torch.Tensor) -> bool:
    """The paper's success criterion (Section V-B): largest within-group distance < smallest across.

    Same arguments as :func:`clustering_margin`, which gives the margin as a number.

    Args:
        distance: ``[T, T]`` dissimilarity (e.g. :func:`noise_distance`).
        groups: the true grouping, a label per task or a ``[T, T]`` 0/1 matrix.

    Returns:
        Whether the margin is positive.

    Raises:
        ValueError: as :func:`clustering_margin`.
    """
    return clustering_margin(distance, groups) > 0.0


# --------------------------------------------------------------------------- Gaussian theory (Section IV)


def _square(name: str, value: ArrayLike | torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(value)
    if not m.is_floating_point():
        m = m.to(torch.float64)
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{name}: expected a square matrix, got shape {tuple(m.shape)}")
    if not torch.allclose(m, m.T, rtol=1e-6, atol=1e-9 * max(1.0, float(m.abs().max()))):
        raise ValueError(f"{name}: not symmetric")
    return m


def _cholesky(name: str, m: torch.Tensor) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(m)
    if int(info) != 0:
        raise ValueError(f"{name}: not positive definite")
    return factor


def gaussian_optimal_precisions(
    cov_x: ArrayLike | torch.Tensor,
    cov_xy: ArrayLike | torch.Tensor,
    cov_y: ArrayLike | torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimal channel ``W = A X + N``, ``N ~ N(0, diag σ²)``, for jointly Gaussian (X, Y) (eq. 9-10).

    The channel minimises the IB functional ``−I(Y; W) + β I(X; W)`` of eq. 9 (equivalently eq. 2
    for one task, since ``H(Y|W) = H(Y) − I(Y; W)``). Its rows are the left eigenvectors ``v_i``
    of ``C_{X|Y} C_X⁻¹`` with eigenvalues ``λ_i``, and its noise precisions are eq. 10::

        1/σ_i² = max(0, (1 − λ_i)/β − 1) / (λ_i v_iᵀ C_X v_i)

    Dimension i is open (finite noise) exactly when ``β < 1 − λ_i``: the critical value is
    ``β_i = 1 − λ_i``, and as β decreases the dimensions open in order of increasing λ. Where
    the paper's text differs, the formula is what the optimum satisfies (the tests minimise
    eq. 9 numerically):

    * it gives the threshold as ``β > 1/(1 − λ_i)``, the critical value of Chechik et al. (2005),
      whose β weighs ``I(Y; W)`` rather than ``I(X; W)``;
    * it calls ``v_i, λ_i`` left singular vectors and values, in descending order. They are left
      eigenvectors and eigenvalues (the matrix is not symmetric): only those make ``A C_X Aᵀ``
      and ``A C_{X|Y} Aᵀ`` both diagonal, so that eq. 9 splits into one problem per dimension.
      In ascending order the open dimensions come first.

    The left eigenvectors solve ``C_{X|Y} v = λ C_X v``; they are scaled to ``v_iᵀ C_X v_i = 1``
    (unit-variance coordinates ``v_iᵀ X``). Eq. 10 is invariant to that choice: scaling ``v_i``
    by c scales ``σ_i²`` by c².

    Args:
        cov_x: ``[D, D]`` covariance of X, positive definite.
        cov_xy: ``[D, Dy]`` cross-covariance of X and Y.
        cov_y: ``[Dy, Dy]`` covariance of Y, positive definite.
        beta: the Lagrange multiplier of ``I(X; W)`` in eq. 9, > 0.

    Returns:
        ``(precisions [D], directions [D, D], lambdas [D])``, ordered by increasing λ (most
        informative first): ``precisions[i] = 1/σ_i²`` (0 for a closed dimension, inf where
        ``λ_i = 0``, i.e. Y determines ``v_iᵀ X``), ``directions[i] = v_i`` (so ``A = directions``
        and ``W = X @ directions.T + N``), and the eigenvalues ``λ_i ∈ [0, 1]``.

    Raises:
        ValueError: for mismatched shapes, a non-positive β, or covariances that do not form a
            valid joint covariance.
    """
    if not beta > 0 or not np.isfinite(beta):
        raise ValueError(f"beta: expected a positive finite number, got {beta!r}")
    c_x, c_y = _square("cov_x", cov_x), _square("cov_y", cov_y)
    c_xy = torch.as_tensor(cov_xy).to(device=c_x.device, dtype=c_x.dtype)
    c_y = c_y.to(device=c_x.device, dtype=c_x.dtype)
    if c_xy.shape != (c_x.shape[0], c_y.shape[0]):
        raise ValueError(f"cov_xy: expected shape ({c_x.shape[0]}, {c_y.shape[0]}), got {tuple(c_xy.shape)}")
    l_x, l_y = _cholesky("cov_x", c_x), _cholesky("cov_y", c_y)
    # C_{X|Y} = C_X − C_XY C_Y⁻¹ C_YX, formed as C_X − GᵀG with G = L_Y⁻¹ C_YX
    g = torch.linalg.solve_triangular(l_y, c_xy.T, upper=False)
    c_x_given_y = c_x - g.T @ g
    # C_{X|Y} v = λ C_X v  <=>  S u = λ u  with  S = L_X⁻¹ C_{X|Y} L_X⁻ᵀ,  v = L_X⁻ᵀ u
    s = torch.linalg.solve_triangular(l_x, c_x_given_y, upper=False)
    s = torch.linalg.solve_triangular(l_x, s.T, upper=False)
    lambdas, u = torch.linalg.eigh(0.5 * (s + s.T))
    tol = max(1e-6, 1e3 * torch.finfo(lambdas.dtype).eps)  # rounding, looser in float32
    if lambdas.min() < -tol or lambdas.max() > 1 + tol:
        raise ValueError("cov_x, cov_xy, cov_y do not form a positive semi-definite joint covariance")
    lambdas = lambdas.clamp(0.0, 1.0)
    directions = torch.linalg.solve_triangular(l_x.T, u, upper=True).T
    spread = torch.einsum("id,de,ie->i", directions, c_x, directions)  # v_iᵀ C_X v_i (eq. 10)
    gain = torch.clamp((1.0 - lambdas) / beta - 1.0, min=0.0)
    precisions = torch.where(gain > 0, gain / (lambdas * spread), torch.zeros_like(gain))
    return precisions, directions, lambdas


@dataclass(frozen=True)
class TwoTaskGaussian:
    """A jointly Gaussian two-task problem (X, Y_1, Y_2) in which the tasks read different coordinates.

    Latent coordinates ``X'`` are independent with variances ``latent_var``; the features are
    ``X = X' @ mixing.T``. Target component m of task j reads one latent coordinate:
    ``Y_{j,m} = X'_{support[j, m]} + E_{j,m}`` with independent noise of variance
    ``noise_var[j, m]``. So ``X'`` is the eigenbasis of Section IV for both tasks at once: the
    eigenvalue of ``C_{X|Y_j} C_X⁻¹`` for coordinate ``support[j, m]`` is ``lambdas[j, m]`` and
    1 for every coordinate task j does not read.
    """

    mixing: torch.Tensor  # [D, D]
    latent_var: torch.Tensor  # [D]
    support: torch.Tensor  # [2, K] long
    noise_var: torch.Tensor  # [2, K]
    lambdas: torch.Tensor  # [2, K]

    @property
    def dim(self) -> int:
        """``D``, the number of latent coordinates (and of features)."""
        return self.latent_var.shape[0]

    def task_covariances(self, task: int, latent: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(cov_x [D, D], cov_xy [D, K], cov_y [K, K])`` of task 0 or 1, for ``X`` or, with ``latent``, ``X'``.

        Args:
            task: 0 or 1.
            latent: the covariances of the latent ``X'`` instead of the features ``X``.

        Returns:
            ``(cov_x, cov_xy, cov_y)``, as :func:`gaussian_optimal_precisions` takes them.

        Raises:
            ValueError: ``task`` is not 0 or 1.
        """
        if task not in (0, 1):
            raise ValueError(f"task: expected 0 or 1, got {task!r}")
        support = self.support[task]
        read = torch.zeros(self.dim, support.shape[0], dtype=self.latent_var.dtype, device=self.latent_var.device)
        read[support, torch.arange(support.shape[0], device=support.device)] = 1.0
        cov_x = torch.diag(self.latent_var)
        cov_xy = self.latent_var[:, None] * read
        cov_y = torch.diag(self.latent_var[support] + self.noise_var[task])
        if not latent:
            cov_x = self.mixing @ cov_x @ self.mixing.T
            cov_xy = self.mixing @ cov_xy
        return cov_x, cov_xy, cov_y

    def latent_precisions(self, beta: float) -> torch.Tensor:
        """``[2, D]``: eq. 10's noise precisions of the channels ``W_j = X' + N_j``, per task and latent coordinate.

        Computed by :func:`gaussian_optimal_precisions` on the latent covariances. The
        information matrix ``Σ_i (1/σ_i²) v_i v_iᵀ`` of its channel does not depend on how the
        eigenvectors of a repeated eigenvalue are chosen, and in the latent basis it is
        diagonal, so its diagonal holds the precision of each coordinate's channel.

        Args:
            beta: the Lagrange multiplier of ``I(X; W)`` in eq. 9, > 0.

        Returns:
            ``[2, D]`` precisions, 0 where a coordinate's channel is closed.

        Raises:
            ValueError: a β that is not positive and finite.
        """
        rows = []
        for task in (0, 1):
            precisions, directions, _ = gaussian_optimal_precisions(*self.task_covariances(task, latent=True), beta)
            rows.append(torch.einsum("i,id->d", precisions, directions.square()))
        return torch.stack(rows)

    def sample(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` joint draws: ``(x [n, D], x_latent [n, D], y [n, 2, K])``.

        Args:
            n: the number of draws.
            generator: the random generator (None: the global one).

        Returns:
            ``(x, x_latent, y)``, on the CPU.
        """
        x_latent = torch.randn(n, self.dim, generator=generator, dtype=self.latent_var.dtype) * self.latent_var.sqrt()
        noise = torch.randn(n, *self.noise_var.shape, generator=generator, dtype=self.latent_var.dtype)
        y = x_latent[:, self.support] + noise * self.noise_var.sqrt()
        return x_latent @ self.mixing.T, x_latent, y


def two_task_gaussian(
    lambdas: Sequence[Sequence[float]] = ((0.1, 0.85, 0.3), (0.4, 0.15, 0.8)),
    shared: int = 1,
    seed: int = 0,
) -> TwoTaskGaussian:
    """Build a :class:`TwoTaskGaussian` whose tasks have the given eigenvalues of eq. 10.

    Task 0 reads latent coordinates ``0 .. K−1`` and task 1 reads ``K − shared .. 2K − shared − 1``,
    so the last ``shared`` coordinates of task 0 are the first of task 1 and ``D = 2K − shared``.
    At a given β, coordinate k is open for task j iff task j reads it with ``λ < 1 − β``. With the
    defaults and β = 0.3, task 0 uses coordinates {0, 2}, task 1 uses {2, 3}; 1 and 4 are
    read but closed, and the shared coordinate 2 is open for both.

    Args:
        lambdas: ``[2][K]`` eigenvalues in (0, 1), one per coordinate a task reads, in the order
            above (small λ: the target is informative about that coordinate).
        shared: how many coordinates the two tasks both read, ``0 <= shared <= K``.
        seed: for the latent variances and the mixing matrix.

    Returns:
        The problem, in float64.

    Raises:
        ValueError: ``lambdas`` not two sequences of equal length with values in (0, 1), or
            ``shared`` outside ``[0, K]``.
    """
    lam = torch.as_tensor(lambdas, dtype=torch.float64)
    if lam.dim() != 2 or lam.shape[0] != 2:
        raise ValueError(f"lambdas: expected two sequences of equal length, got shape {tuple(lam.shape)}")
    if not ((lam > 0) & (lam < 1)).all():
        raise ValueError("lambdas: every eigenvalue must lie strictly between 0 and 1")
    k = lam.shape[1]
    if not 0 <= shared <= k:
        raise ValueError(f"shared: expected 0 <= shared <= {k}, got {shared}")
    dim = 2 * k - shared
    gen = torch.Generator().manual_seed(seed)
    latent_var = torch.exp(2.0 * torch.rand(dim, generator=gen, dtype=torch.float64) - 1.0)
    # a well-conditioned mixing: a random rotation with moderately unequal scales
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    mixing = rotation * torch.exp(torch.rand(dim, generator=gen, dtype=torch.float64) - 0.5)
    support = torch.stack([torch.arange(k), torch.arange(k - shared, dim)])
    # λ = Var(X'|Y)/Var(X') = noise / (latent + noise) for a target that reads one coordinate
    noise_var = latent_var[support] * lam / (1.0 - lam)
    return TwoTaskGaussian(mixing=mixing, latent_var=latent_var, support=support, noise_var=noise_var, lambdas=lam)
