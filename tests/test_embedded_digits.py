"""Structure of the digits datasets added for the papers' other benchmarks, and digits-grouped's options."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from pyromtl import datasets
from pyromtl.data.embedded import GROUPS

DIGITS = load_digits()


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    """Builds in this module go to a temporary dataset cache, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYROMTL_CACHE", str(tmp_path_factory.mktemp("pyromtl-cache")))
        yield


def _raw(data, t: int) -> np.ndarray:
    """Task ``t``'s targets on their original scale."""
    mean, std = data.target_stats[t]
    return data.y[t].numpy().astype(np.float64) * std + mean


def test_digits_regression_targets_are_properties_of_the_input():
    data = datasets.load("digits-regression")
    assert data.task_names == ["angle", "scale", "ink", "row", "col"] and data.task_types == ["regression"] * 5
    x = data.x.numpy().reshape(-1, 8, 8).astype(np.float64)
    angle, scale, ink, row, col = (_raw(data, t) for t in range(5))
    assert -30 <= angle.min() < -28 and 28 < angle.max() <= 30
    assert 0.8 <= scale.min() < 0.82 and 1.18 < scale.max() <= 1.2
    assert np.allclose(ink, x.sum(axis=(1, 2)), rtol=1e-4)
    assert np.allclose(row, (x.sum(axis=2) @ np.arange(8)) / ink, atol=1e-4)
    assert np.allclose(col, (x.sum(axis=1) @ np.arange(8)) / ink, atol=1e-4)
    for t in range(5):  # standardised on train
        train = data.y[t][data.splits["train"][t]]
        assert abs(float(train.mean())) < 1e-4 and abs(float(train.std()) - 1) < 1e-3
    assert abs(np.corrcoef(scale, ink)[0, 1]) > 0.3  # a bigger digit has more ink: the targets are related


def test_digits_overlay_places_the_first_digit_top_left_and_the_second_bottom_right():
    data = datasets.load("digits-overlay")
    assert data.task_names == ["first", "second"] and data.num_classes == [10, 10]
    first, second = (data.y[t].numpy().astype(int) for t in range(2))
    assert np.array_equal(first, DIGITS.target)  # image i is the first digit of sample i
    assert np.array_equal(np.bincount(second), np.bincount(DIGITS.target))  # a permutation of the labels
    assert (first != second).mean() > 0.8
    frames = data.x.numpy().reshape(-1, 12, 12)
    images = (DIGITS.images / 16.0).astype(np.float32)
    # rows and columns 0-2 are covered by the first digit only (the second starts at 3 or 4)
    corner = np.stack([np.pad(images, ((0, 0), (r, 4 - r), (c, 4 - c)))[:, :3, :3] for r in (0, 1) for c in (0, 1)])
    assert np.all(np.abs(corner - frames[None, :, :3, :3]).max(axis=(2, 3)).min(axis=0) < 1e-6)
    # the last two rows and columns hold the second digit only, and are not empty
    assert frames[:, 10:, :].sum() > 0 and frames[:, :, 10:].sum() > 0
    assert frames.min() >= 0 and frames.max() <= 1


def test_digits_conflict_direction_is_balanced_within_every_digit():
    data = datasets.load("digits-conflict")
    assert data.task_names == ["digit", "even", "large", "clockwise"]
    assert data.task_types == ["classification", "binary", "binary", "binary"]
    digit, even, large, clockwise = (data.y[t].numpy().astype(int) for t in range(4))
    assert np.array_equal(digit, DIGITS.target)
    assert np.array_equal(even, digit % 2 == 0) and np.array_equal(large, digit >= 5)
    for d in range(10):
        n = int((digit == d).sum())
        assert clockwise[digit == d].sum() == n // 2
    # every image was rotated: none equals its bundled original
    x = data.x.numpy().reshape(-1, 8, 8)
    assert np.abs(x - DIGITS.images / 16.0).max(axis=(1, 2)).min() > 0.05


def test_digits_grouped_defaults_are_unchanged():
    explicit = datasets.load("digits-grouped", group_size=None, num_clusters=2, tasks_per_cluster=3)
    assert explicit.task_names == list(GROUPS) == ["d012", "d1234", "d024", "d567", "d6789", "d579"]


@pytest.mark.parametrize(("size", "clusters", "per"), [(4, 2, 3), (3, 2, 4), (3, 3, 1), (3, 2, 1)])
def test_digits_grouped_options_build_clusters_of_the_given_group_size(size, clusters, per):
    data = datasets.load("digits-grouped", group_size=size, num_clusters=clusters, tasks_per_cluster=per)
    assert data.num_tasks == clusters * per == len(set(data.task_names))
    blocks = np.array_split(np.arange(10), clusters)
    cluster = np.repeat(np.arange(clusters), per)
    digit = DIGITS.target
    for t, name in enumerate(data.task_names):
        digits = [int(c) for c in name[1:]]
        assert len(digits) == size and set(digits) <= set(blocks[cluster[t]].tolist())
        assert data.num_classes[t] == size + 1
        expected = np.array([digits.index(d) if d in digits else size for d in digit])
        assert np.array_equal(data.y[t].numpy(), expected)
    assert np.array_equal(data.relatedness, np.kron(np.eye(clusters), np.ones((per, per))))


def test_digits_grouped_refuses_impossible_groups():
    with pytest.raises(ValueError, match="group_size must be 3 or 4"):
        datasets.load("digits-grouped", group_size=5)
    with pytest.raises(ValueError, match=r"cluster 1 holds digits \[4, 5, 6\].*tasks_per_cluster=3"):
        datasets.load("digits-grouped", num_clusters=3)
    with pytest.raises(ValueError, match=r"cluster 1 holds digits \[4, 5, 6\], which give 0 distinct groups of 4"):
        datasets.load("digits-grouped", group_size=4, num_clusters=3, tasks_per_cluster=1)
    with pytest.raises(ValueError, match="num_clusters"):
        datasets.load("digits-grouped", num_clusters=1)
