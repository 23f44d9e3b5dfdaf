"""The dataset registry and the embedded datasets: documented shapes, construction, few-shot splits."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from pyromtl import datasets
from pyromtl.data import MultiTaskData

EMBEDDED = [
    "digits-domains",
    "digits-rotation",
    "digits-binary",
    "digits-mixed",
    "digits-grouped",
    "synthetic-clusters",
    "digits-regression",
    "digits-overlay",
    "digits-conflict",
]

# name: (setting, task count, task types, class counts, total samples per task)
FACTS = {
    "digits-domains": ("mimo", 4, {"classification"}, {10}, None),
    "digits-rotation": ("mimo", 10, {"regression"}, {0}, None),
    "digits-binary": ("simo", 10, {"binary"}, {2}, 1797),
    "digits-mixed": ("simo", 3, {"regression", "binary", "classification"}, {0, 2, 10}, 1797),
    "digits-grouped": ("simo", 6, {"classification"}, {4, 5}, 1797),
    "synthetic-clusters": ("mimo", 8, {"classification"}, {4}, 120),
    "digits-regression": ("simo", 5, {"regression"}, {0}, 1797),
    "digits-overlay": ("simo", 2, {"classification"}, {10}, 1797),
    "digits-conflict": ("simo", 4, {"classification", "binary"}, {10, 2}, 1797),
}
INPUT_SHAPE = {"synthetic-clusters": (16,), "digits-overlay": (144,)}


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    """Builds in this module go to a temporary dataset cache, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYROMTL_CACHE", str(tmp_path_factory.mktemp("pyromtl-cache")))
        yield


def _total(data: MultiTaskData, t: int) -> int:
    return sum(data.split_sizes(s)[t] for s in ("train", "val", "test"))


# ------------------------------------------------------------------------------- registry
def test_available_lists_the_embedded_datasets_first():
    assert datasets.available()[: len(EMBEDDED)] == EMBEDDED
    for name in EMBEDDED:
        line = datasets.describe(name)
        settings = {"MIMO", "SIMO", "MIMO regression", "SIMO regression", "MIMO or SIMO"}
        assert line and "\n" not in line and line.split(",")[0] in settings


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_dataset_matches_its_documented_facts(name):
    setting, T, types, classes, total = FACTS[name]
    data = datasets.load(name)
    assert data.name == name and data.setting == setting and data.num_tasks == T
    assert set(data.task_types) == types and set(data.num_classes) == classes
    assert data.input_shape == INPUT_SHAPE.get(name, (64,))
    assert data.description.startswith(datasets.describe(name))
    for t in range(T):
        x = data.x if data.simo else data.x[t]
        assert x.dtype.is_floating_point and x.isfinite().all()
        if name.startswith("digits"):
            assert float(x.min()) >= 0 and float(x.max()) <= 1
        if total is not None:
            assert _total(data, t) == total
        n_test = data.split_sizes("test")[t] / _total(data, t)
        assert abs(n_test - 0.25) < 0.03  # val 0.15, test 0.25 of every task
    if name in ("digits-domains", "digits-rotation"):  # MIMO over all digits: every image in exactly one task
        assert sum(_total(data, t) for t in range(T)) == 1797


def test_loads_are_deterministic_and_seeds_move_only_the_split():
    a, b, c = (
        datasets.load("digits-domains", seed=0),
        datasets.load("digits-domains", seed=0),
        datasets.load("digits-domains", seed=1),
    )
    assert a is not b  # every call gets its own object ...
    assert all((p == q).all() for p, q in zip(a.x, b.x))  # ... with the same content
    assert all((p == q).all() for p, q in zip(a.splits["test"], b.splits["test"]))
    assert all((p == q).all() for p, q in zip(a.x, c.x))  # construction does not depend on the seed
    assert not all(p.shape == q.shape and (p == q).all() for p, q in zip(a.splits["test"], c.splits["test"]))


def test_unknown_names_options_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; available: digits-domains"):
        datasets.load("mnist")
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.describe("mnist")
    with pytest.raises(ValueError, match=r"no option 'num_task'.*num_tasks"):
        datasets.load("synthetic-clusters", num_task=4)
    with pytest.raises(ValueError, match="no option 'setting'"):
        datasets.load("digits-domains", setting="simo")
    for bad in (0, -0.1, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="fraction"):
            datasets.load("digits-binary", fraction=bad)
    for bad in (-1, 1.5, None):
        with pytest.raises(ValueError, match="seed"):
            datasets.load("digits-binary", seed=bad)
    with pytest.raises(ValueError, match="setting"):
        datasets.load("synthetic-clusters", setting="both")
    with pytest.raises(ValueError, match="num_clusters"):
        datasets.load("synthetic-clusters", num_clusters=9)


def test_register_adds_a_loader_that_needs_a_root(tmp_path):
    calls = []

    @datasets.register("test-files")
    def files(*, root, seed: int = 0, scale: float = 1.0) -> MultiTaskData:
        """MIMO, 2 tasks: a tiny test loader."""
        calls.append((root, seed, scale))
        x = [np.full((20, 2), scale), np.zeros((20, 2))]
        return MultiTaskData.from_arrays(x, [np.arange(20) % 2] * 2, "binary", name="test-files", seed=seed)

    try:
        assert "test-files" in datasets.available()
        assert datasets.describe("test-files") == "MIMO, 2 tasks: a tiny test loader."
        with pytest.raises(ValueError, match=r"test-files.*root"):
            datasets.load("test-files")
        data = datasets.load("test-files", root=tmp_path, seed=3, scale=2.0)
        assert calls == [(tmp_path, 3, 2.0)] and float(data.x[0][0, 0]) == 2.0
        datasets.load("test-files", root=tmp_path, seed=3, scale=2.0)
        assert len(calls) == 1  # the construction is cached
        with pytest.raises(ValueError, match="already registered"):
            datasets.register("test-files")(len)
    finally:
        datasets._REGISTRY.pop("test-files", None)
        datasets._build_cached.cache_clear()


def test_benchmark_loaders_are_registered_and_need_a_root():
    names = datasets.available()
    assert {"office-home", "rotated-mnist"} <= set(names[len(EMBEDDED) :])
    with pytest.raises(ValueError, match="'office-home' reads its files from a folder: pass root"):
        datasets.load("office-home")


def test_root_is_refused_by_datasets_that_read_no_files(tmp_path):
    with pytest.raises(ValueError, match="dataset 'digits-binary' is built in and reads no files"):
        datasets.load("digits-binary", root=tmp_path)


def test_returned_objects_do_not_share_splits():
    a = datasets.load("digits-binary")
    a.splits["train"][0] = a.splits["train"][0][:5]
    assert datasets.load("digits-binary").split_sizes("train")[0] > 5


# ------------------------------------------------------------------------------- construction
def test_digits_domains_tasks_are_disjoint_images_under_their_shift():
    data = datasets.load("digits-domains")
    assert data.task_names == ["original", "blurred", "shifted", "thick"]
    assert data.class_names == [str(d) for d in range(10)]
    x = [xt.numpy().reshape(-1, 8, 8) for xt in data.x]
    assert [len(xt) for xt in x] == [450, 449, 449, 449]
    # match every task image to a bundled image under the task's shift, using each bundled image once
    pool = (load_digits().images / 16.0).astype(np.float32)  # as built, so the shifts match bit for bit
    shifted = [
        pool,
        ndimage.gaussian_filter(pool, sigma=(0, 1, 1)),
        np.roll(pool, 1, axis=2),
        ndimage.grey_dilation(pool, size=(1, 2, 2)),
    ]
    unused = set(range(len(pool)))
    for t in range(4):
        lookup: dict[bytes, list[int]] = {}
        for i in sorted(unused):
            lookup.setdefault(np.round(shifted[t][i], 4).astype(np.float32).tobytes(), []).append(i)
        for im in x[t]:
            matches = lookup.get(np.round(im, 4).astype(np.float32).tobytes())
            assert matches, f"an image of task {data.task_names[t]} is no shifted bundled image left unused"
            unused.discard(matches.pop())
    assert not unused  # the four tasks partition the 1,797 images
    assert all(set(y.long().tolist()) == set(range(10)) for y in data.y)


def test_digits_domains_are_different_yet_learnable():
    data = datasets.load("digits-domains")
    (xs, ys), (xt, yt) = data.split_arrays("train"), data.split_arrays("test")
    model = LogisticRegression(max_iter=500).fit(xs[0], ys[0])  # trained on "original"
    own = model.score(xt[0], yt[0])
    assert own > 0.85
    for t in (1, 2, 3):
        assert model.score(xt[t], yt[t]) < own - 0.1  # a real domain shift ...
        assert LogisticRegression(max_iter=500).fit(xs[t], ys[t]).score(xt[t], yt[t]) > 0.8  # ... of a learnable task


def test_digits_rotation_targets_are_angles_of_one_digit_per_task():
    data = datasets.load("digits-rotation")
    assert data.task_names == [f"digit{d}" for d in range(10)]
    assert sum(_total(data, t) for t in range(10)) == 1797
    angles = set()
    for t in range(10):
        mean, std = data.target_stats[t]
        deg = data.y[t].numpy() * std + mean
        assert np.allclose(deg, np.round(deg / 10) * 10, atol=1e-3)
        angles |= set(np.round(deg).astype(int).tolist())
        train = data.y[t][data.splits["train"][t]]
        assert abs(float(train.mean())) < 1e-4  # standardised on train
    assert angles == set(range(0, 91, 10))


def test_digits_binary_is_one_vs_rest():
    data = datasets.load("digits-binary")
    assert data.task_names == [f"is{d}" for d in range(10)]
    y = np.stack([yt.numpy() for yt in data.y])
    assert (y.sum(0) == 1).all()  # exactly one positive task per image
    assert np.allclose(y.mean(1), 0.1, atol=0.015)


def test_digits_mixed_tasks_agree_with_each_other():
    data = datasets.load("digits-mixed")
    assert data.task_names == ["angle", "even", "digit"]
    assert data.task_types == ["regression", "binary", "classification"]
    mean, std = data.target_stats[0]
    deg = data.y[0].numpy() * std + mean
    assert -45 <= deg.min() < -40 and 40 < deg.max() <= 45
    digit, even = data.y[2].numpy(), data.y[1].numpy()
    assert ((digit % 2 == 0) == (even == 1)).all()


def test_digits_mixed_angle_is_the_rotation_of_the_input_and_independent_of_the_digit():
    """The SMTL demonstration's conflict (docs/methods/smtl.md, "Results"): ``angle`` needs what the
    digit tasks must ignore, so it has to be the input's own rotation and carry nothing of the digit."""
    data = datasets.load("digits-mixed")
    mean, std = data.target_stats[0]
    deg = data.y[0].numpy().astype(np.float64) * std + mean
    digit = data.y[2].numpy()
    raw = load_digits()
    assert np.array_equal(digit, raw.target)  # the bundled images, in order
    for i in range(0, len(digit), 97):
        turned = np.clip(ndimage.rotate(raw.images[i] / 16.0, deg[i], reshape=False, order=1), 0, 1)
        assert np.allclose(data.x[i].numpy().reshape(8, 8), turned, atol=1e-4)
    assert all(abs(deg[digit == d].mean()) < 8 for d in range(10))  # no digit leans either way


def test_digits_grouped_targets_and_clusters():
    data = datasets.load("digits-grouped")
    groups = {
        "d012": (0, 1, 2),
        "d1234": (1, 2, 3, 4),
        "d024": (0, 2, 4),
        "d567": (5, 6, 7),
        "d6789": (6, 7, 8, 9),
        "d579": (5, 7, 9),
    }
    assert data.task_names == list(groups)
    digit = datasets.load("digits-mixed").y[2].numpy()  # same images, same order
    for t, digits in enumerate(groups.values()):
        y = data.y[t].numpy()
        expected = np.array([digits.index(d) if d in digits else len(digits) for d in digit])
        assert (y == expected).all() and data.num_classes[t] == len(digits) + 1
    assert np.array_equal(data.relatedness, np.kron(np.eye(2), np.ones((3, 3))))


@pytest.mark.parametrize("setting", ["mimo", "simo"])
def test_synthetic_clusters_relatedness_is_block_structured(setting):
    data = datasets.load("synthetic-clusters", setting=setting, num_tasks=6, num_clusters=3)
    assert data.setting == setting and data.num_tasks == 6
    assert np.array_equal(data.relatedness, np.kron(np.eye(3), np.ones((2, 2))))
    for t in range(6):
        assert set(data.y[t].long().tolist()) == {0, 1, 2, 3}


def test_synthetic_clusters_same_cluster_tasks_are_more_similar():
    data = datasets.load("synthetic-clusters")
    (xs, ys), (xt, yt) = data.split_arrays("train"), data.split_arrays("test")
    T, rel = data.num_tasks, data.relatedness
    acc = np.array(
        [[LogisticRegression(max_iter=500).fit(xs[a], ys[a]).score(xt[b], yt[b]) for b in range(T)] for a in range(T)]
    )
    off = ~np.eye(T, dtype=bool)
    same, other = acc[(rel == 1) & off], acc[rel == 0]
    assert same.mean() > 0.5 and other.mean() < 0.35  # chance is 0.25
    for a in range(T):  # row by row: a same-cluster task always beats the best other-cluster one on average
        assert acc[a, (rel[a] == 1) & off[a]].mean() > acc[a, rel[a] == 0].max()


def test_synthetic_clusters_options():
    data = datasets.load(
        "synthetic-clusters", num_tasks=5, num_clusters=5, samples_per_task=40, dim=6, num_classes=3, task_noise=0.0
    )
    assert data.num_tasks == 5 and data.input_shape == (6,) and set(data.num_classes) == {3}
    assert [_total(data, t) for t in range(5)] == [40] * 5
    assert np.array_equal(data.relatedness, np.eye(5))


# ------------------------------------------------------------------------------- few-shot
def test_fraction_on_digits_domains_keeps_five_percent_with_every_class():
    full, few = datasets.load("digits-domains"), datasets.load("digits-domains", fraction=0.05)
    assert few.fraction == 0.05
    for t in range(4):
        n_full, n_few = full.split_sizes("train")[t], few.split_sizes("train")[t]
        assert 0.035 <= n_few / n_full <= 0.065
        assert set(few.y[t][few.splits["train"][t]].long().tolist()) == set(range(10))
        assert set(few.splits["train"][t].tolist()) <= set(full.splits["train"][t].tolist())
        assert few.split_sizes("test")[t] == full.split_sizes("test")[t]  # evaluation stays whole


@pytest.mark.parametrize("name", ["digits-binary", "digits-mixed", "digits-grouped", "digits-conflict"])
def test_fraction_on_simo_keeps_every_class_of_every_task(name):
    for seed in range(3):
        few = datasets.load(name, fraction=0.05, seed=seed)
        idx = few.splits["train"][0]
        for t, kind in enumerate(few.task_types):
            if kind != "regression":
                assert len(set(few.y[t][idx].tolist())) == few.num_classes[t]


def test_fraction_one_or_none_keeps_the_whole_train_split():
    a, b = datasets.load("digits-rotation"), datasets.load("digits-rotation", fraction=1.0)
    assert a.split_sizes("train") == b.split_sizes("train")


@pytest.mark.parametrize(
    ("name", "fraction", "expected"),
    [
        ("digits-domains", 0.0, 0.05),  # the config's 0: the dataset's few-shot default
        ("digits-domains", 1.0, 1.0),  # 1: always the whole train split
        ("digits-binary", 0.0, 1.0),  # no default: the whole train split
    ],
)
def test_runs_take_the_dataset_default_fraction(name, fraction, expected):
    import pyromtl
    from tests.conftest import TINY

    fit = pyromtl.fit("stl", name, fraction=fraction, steps=1, device="cpu", **TINY)
    assert fit.config["fraction"] == expected
    assert fit.data.split_sizes("train") == datasets.load(name, fraction=expected).split_sizes("train")
