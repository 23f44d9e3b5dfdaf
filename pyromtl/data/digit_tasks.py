"""Task constructions shared by the 8x8 digits sets and their full-size MNIST counterparts.

Pure numpy: Grouped-MNIST's digit subsets and targets, and MultiMNIST's overlaid pairs.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from pyromtl.data.validate import check_int

#: digits-grouped's default tasks: each task's digit subset, and the cluster it belongs to.
GROUPS: dict[str, tuple[tuple[int, ...], int]] = {
    "d012": ((0, 1, 2), 0),
    "d1234": ((1, 2, 3, 4), 0),
    "d024": ((0, 2, 4), 0),
    "d567": ((5, 6, 7), 1),
    "d6789": ((6, 7, 8, 9), 1),
    "d579": ((5, 7, 9), 1),
}
_GROUPS_SEED = 1008


def digit_groups(
    group_size: int | None = None, num_clusters: int = 2, tasks_per_cluster: int = 3
) -> dict[str, tuple[tuple[int, ...], int]]:
    """:data:`GROUPS` for the default options, else ``tasks_per_cluster`` drawn subsets per cluster.

    ``group_size`` (3 or 4; 3 when ``None`` but another option is set) digits per task;
    ``num_clusters`` contiguous blocks of the digits 0-9 (``np.array_split``); each cluster gets
    ``tasks_per_cluster`` distinct subsets of its block, drawn with a fixed seed. Impossible
    combinations raise ``ValueError``.
    """
    if group_size is None and num_clusters == 2 and tasks_per_cluster == 3:
        return GROUPS
    size = 3 if group_size is None else group_size
    if isinstance(size, bool) or size not in (3, 4):
        raise ValueError(f"group_size must be 3 or 4 (digits per task), got {group_size!r}")
    check_int("num_clusters", num_clusters, 2)
    check_int("tasks_per_cluster", tasks_per_cluster, 1)
    rng = np.random.default_rng(_GROUPS_SEED)
    groups: dict[str, tuple[tuple[int, ...], int]] = {}
    for c, block in enumerate(np.array_split(np.arange(10), num_clusters)):
        subsets = list(combinations(block.tolist(), size))
        if len(subsets) < tasks_per_cluster:
            raise ValueError(
                f"digit groups: cluster {c} holds digits {block.tolist()}, which give {len(subsets)} distinct "
                f"groups of {size}, fewer than tasks_per_cluster={tasks_per_cluster}; use fewer clusters or tasks"
            )
        for k in sorted(rng.choice(len(subsets), tasks_per_cluster, replace=False)):
            digits = subsets[k]
            groups["d" + "".join(map(str, digits))] = (digits, c)
    return groups


def group_targets(
    labels: np.ndarray, groups: dict[str, tuple[tuple[int, ...], int]]
) -> tuple[dict[str, np.ndarray], list[int], np.ndarray]:
    """Per task the digit's position in its subset, or ``len(subset)`` ("none"); class counts; relatedness."""
    y, ncls, cluster = {}, [], []
    for name, (digits, c) in groups.items():
        position = np.full(len(labels), len(digits), dtype=np.int64)  # "none" by default
        for k, d in enumerate(digits):
            position[labels == d] = k
        y[name] = position
        ncls.append(len(digits) + 1)
        cluster.append(c)
    cluster_arr = np.asarray(cluster)
    return y, ncls, (cluster_arr[:, None] == cluster_arr[None, :]).astype(float)


def overlay_pairs(images: np.ndarray, partner: np.ndarray, near: np.ndarray, far: np.ndarray, frame: int) -> np.ndarray:
    """``[N, frame, frame]``: image ``i`` at offset ``near[i]`` and ``images[partner[i]]`` at ``far[i]``.

    Offsets are ``(row, col)`` of the top-left corner; where the two overlap the brighter pixel wins.
    """
    n, h, w = images.shape
    out = np.zeros((n, frame, frame), dtype=np.float32)
    for i in range(n):  # data preparation, once per build
        (r1, c1), (r2, c2) = near[i], far[i]
        out[i, r1 : r1 + h, c1 : c1 + w] = images[i]
        out[i, r2 : r2 + h, c2 : c2 + w] = np.maximum(out[i, r2 : r2 + h, c2 : c2 + w], images[partner[i]])
    return out


#: The clustered MIMO problems of :func:`clustered_tasks` (VMTL's relatedness study).
CLUSTER_KINDS = ("grouped", "permuted", "inverted")
_CLUSTERED_SEED = 1030


def clustered_tasks(
    x: np.ndarray, digits: np.ndarray, kind: str, tasks_per_cluster: int = 3
) -> tuple[list[np.ndarray], list[np.ndarray], list[str], list[int], np.ndarray]:
    """MIMO tasks in 2 known clusters, each task on its own disjoint share of the images.

    ``x [N, D]`` are the images (pixels in [0, 1]) and ``digits [N]`` their digits. The images
    are shuffled with a fixed seed and cut into ``2 * tasks_per_cluster`` disjoint parts, one per
    task; tasks ``0 .. tasks_per_cluster-1`` form cluster 0, the rest cluster 1. ``kind``:

    * ``grouped``: :data:`GROUPS`'s digit-subset tasks (``tasks_per_cluster = 3``), MIMO: task
      ``dABC`` labels its part's digits by their position in ``(A, B, C)``, "none" otherwise;
    * ``permuted``: the tasks share their classes within a cluster and not across: cluster c
      labels digit d as ``(d + 5c) mod 10``, the same inputs carry other labels across;
    * ``inverted``: the tasks share an input transform within a cluster and not across: cluster
      1's images are inverted (``1 - x``), every task labels the digit itself.

    Returns ``(xs, ys, names, num_classes, relatedness)``, ``relatedness`` the ``[T, T]`` cluster
    indicator (1 within a cluster and on the diagonal, 0 across).
    """
    if kind not in CLUSTER_KINDS:
        raise ValueError(f"kind must be one of {list(CLUSTER_KINDS)}, got {kind!r}")
    check_int("tasks_per_cluster", tasks_per_cluster, 1)
    if kind == "grouped" and tasks_per_cluster != 3:
        raise ValueError(f"kind 'grouped' has 3 tasks per cluster (GROUPS), got tasks_per_cluster={tasks_per_cluster}")
    T = 2 * tasks_per_cluster
    parts = np.array_split(np.random.default_rng(_CLUSTERED_SEED).permutation(len(digits)), T)
    cluster = np.arange(T) // tasks_per_cluster
    xs = [np.asarray(x[p], dtype=np.float32) for p in parts]
    if kind == "grouped":
        names = list(GROUPS)
        ys, ncls = [], []
        for name, p in zip(names, parts):
            targets, counts, _ = group_targets(digits[p], {name: GROUPS[name]})
            ys.append(targets[name])
            ncls.append(counts[0])
    else:
        names = [f"c{c}t{t % tasks_per_cluster}" for t, c in enumerate(cluster)]
        shift = 5 if kind == "permuted" else 0
        ys = [(digits[p] + shift * c) % 10 for p, c in zip(parts, cluster)]
        ncls = [10] * T
        if kind == "inverted":
            xs = [1.0 - xi if c == 1 else xi for xi, c in zip(xs, cluster)]
    return xs, ys, names, ncls, (cluster[:, None] == cluster[None, :]).astype(float)
