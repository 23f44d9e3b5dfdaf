"""MultiTaskData: batches, splits, few-shot fractions, and input validation (with a hypothesis fuzz)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyromtl.data import MultiTaskData

D = 5  # input width of the hand-built sets


def _ids_mimo(sizes=(80, 40, 6), classes: int = 3, seed: int = 0) -> MultiTaskData:
    """MIMO set whose first feature is a global sample id, so a batch shows which rows it holds."""
    rng = np.random.default_rng(seed)
    xs, ys, start = [], [], 0
    for n in sizes:
        x = rng.normal(size=(n, D))
        x[:, 0] = np.arange(start, start + n)
        start += n
        xs.append(x)
        ys.append(np.arange(n) % classes)
    return MultiTaskData.from_arrays(xs, ys, "classification", ["big", "mid", "tiny"], seed=seed)


def _ids_simo(n: int = 100, seed: int = 0) -> MultiTaskData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D))
    x[:, 0] = np.arange(n)
    digit = np.arange(n) % 10
    y = {"digit": digit, "is3": (digit == 3).astype(int), "reg": rng.normal(size=n) * 5 + 2}
    return MultiTaskData.from_arrays(x, y, ["classification", "binary", "regression"], seed=seed)


def _train_ids(data: MultiTaskData, t: int) -> set[int]:
    x = data.x if data.simo else data.x[t]
    return set(x[data.splits["train"][t], 0].long().tolist())


# ------------------------------------------------------------------------------- batches
def test_mimo_train_batch_shapes_scale_and_mask():
    data = _ids_mimo()
    n = data.split_sizes("train")
    b = data.train_batch(16, torch.Generator().manual_seed(0), "cpu")
    assert b.x.shape == (3, 16, D) and b.y.shape == (3, 16) and b.mask.shape == (3, 16)
    assert not b.simo and b.num_tasks == 3 and b.size == 16
    taken = [min(16, k) for k in n]
    assert b.mask.sum(1).tolist() == taken  # the tiny task fills only part of its row
    assert torch.allclose(b.scale[:, 0], torch.tensor([k / m for k, m in zip(n, taken)]))
    assert n[2] < 16 and float(b.scale[2]) == 1.0


def test_simo_train_batch_shapes_and_scale():
    data = _ids_simo()
    N = data.split_sizes("train")[0]
    b = data.train_batch(16, torch.Generator().manual_seed(0), "cpu")
    assert b.simo and b.x.shape == (16, D) and b.y.shape == (3, 16)
    assert b.mask.all() and torch.allclose(b.scale, torch.full((3, 1), N / 16))
    # every task's targets belong to the same inputs
    rows = b.x[:, 0].long()
    assert torch.equal(b.y[0], data.y[0][rows]) and torch.equal(b.y[2], data.y[2][rows])


def test_batch_larger_than_train_split_takes_everything_once():
    data = _ids_simo(n=30)
    N = data.split_sizes("train")[0]
    b = data.train_batch(1000, torch.Generator().manual_seed(0), "cpu")
    assert b.size == N and float(b.scale[0]) == 1.0
    assert sorted(b.x[:, 0].long().tolist()) == sorted(_train_ids(data, 0))


@pytest.mark.parametrize("build", [_ids_mimo, _ids_simo])
def test_train_batches_hold_only_train_rows(build):
    data = build()
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        b = data.train_batch(16, g, "cpu")
        for t in range(data.num_tasks):
            ids = (b.x if b.simo else b.x[t])[:, 0].long().tolist()
            # padded (masked) entries too: they must not carry val/test inputs either
            assert set(ids) <= _train_ids(data, t)
            rows = data.splits["train"][t][b.index[t][b.mask[t]]]
            x_t = data.x if data.simo else data.x[t]
            assert torch.equal(x_t[rows, 0], (b.x if b.simo else b.x[t])[b.mask[t], 0])


@pytest.mark.parametrize("build", [_ids_mimo, _ids_simo])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_eval_batches_cover_each_split_sample_once(build, split):
    data = build()
    seen: list[list[int]] = [[] for _ in range(data.num_tasks)]
    for b in data.eval_batches(split, "cpu", batch_size=7):
        assert b.split == split and torch.all(b.scale == 1)
        for t in range(data.num_tasks):
            x_t = b.x if b.simo else b.x[t]
            seen[t] += x_t[b.mask[t], 0].long().tolist()
    for t in range(data.num_tasks):
        x_t = data.x if data.simo else data.x[t]
        expected = x_t[data.splits[split][t], 0].long().tolist()
        assert sorted(seen[t]) == sorted(expected) and len(set(seen[t])) == len(seen[t])


def test_eval_batches_rejects_unknown_split():
    with pytest.raises(ValueError, match="unknown split"):
        next(_ids_mimo().eval_batches("validation", "cpu"))


# ------------------------------------------------------------------------------- splits
def test_splits_are_disjoint_and_cover_every_sample():
    data = _ids_mimo()
    for t, n in enumerate([80, 40, 6]):
        parts = [data.splits[s][t].numpy() for s in ("train", "val", "test")]
        every = np.concatenate(parts)
        assert len(every) == n and len(np.unique(every)) == n


def test_same_seed_same_split_and_other_seed_differs():
    a, b = _ids_mimo(seed=0), _ids_mimo(seed=0)
    c = MultiTaskData.from_arrays([x.numpy() for x in a.x], [y.numpy() for y in a.y], "classification", seed=5)
    for s in ("train", "val", "test"):
        assert all(torch.equal(p, q) for p, q in zip(a.splits[s], b.splits[s]))
    assert not all(torch.equal(p, q) for p, q in zip(a.splits["test"], c.splits["test"]))


def test_regression_targets_are_standardised_on_train_with_stats_kept():
    data = _ids_simo()
    t = data.task_index("reg")
    mean, std = data.target_stats[t]
    train = data.y[t][data.splits["train"][t]]
    assert abs(float(train.mean())) < 1e-5 and abs(float(train.std()) - 1) < 1e-5
    assert abs(mean - 2) < 2 and 3 < std < 7
    assert data.target_stats[data.task_index("digit")] == (0.0, 1.0)


def test_given_splits_are_used_and_overlaps_refused():
    x, y = [np.ones((10, 2))], [np.arange(10) % 2]
    data = MultiTaskData.from_arrays(x, y, "binary", splits={"train": [range(6)], "test": [range(6, 10)]})
    assert data.split_sizes("train") == [6] and data.split_sizes("val") == [0]
    with pytest.raises(ValueError, match="appears twice"):
        MultiTaskData.from_arrays(x, y, "binary", splits={"train": [range(6)], "test": [range(5, 10)]})
    with pytest.raises(ValueError, match="out of range"):
        MultiTaskData.from_arrays(x, y, "binary", splits={"train": [range(11)]})


# ------------------------------------------------------------------------------- few-shot
def test_with_fraction_is_stratified_per_task():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2, 3], [400, 200, 100, 20])  # imbalanced, with a rare class
    xs = [rng.normal(size=(len(labels), D)) for _ in range(2)]
    data = MultiTaskData.from_arrays(xs, [labels, labels], "classification")
    few = data.with_fraction(0.1, seed=0)
    assert few.fraction == 0.1
    for t in range(2):
        full = data.y[t][data.splits["train"][t]].long()
        kept = few.y[t][few.splits["train"][t]].long()
        assert set(few.splits["train"][t].tolist()) <= set(data.splits["train"][t].tolist())
        for c in range(4):
            n_full, n_kept = int((full == c).sum()), int((kept == c).sum())
            assert n_kept >= 1 and abs(n_kept - 0.1 * n_full) <= 1  # every class, in proportion
        for s in ("val", "test"):
            assert torch.equal(few.splits[s][t], data.splits[s][t])


def test_with_fraction_simo_keeps_every_class_of_every_task():
    n = 400
    digit = np.arange(n) % 10
    y = {f"is{d}": (digit == d).astype(int) for d in range(10)}
    data = MultiTaskData.from_arrays(np.random.default_rng(0).normal(size=(n, D)), y, "binary")
    for seed in range(5):
        few = data.with_fraction(0.02, seed=seed)
        idx = few.splits["train"][0]
        assert all(torch.equal(i, idx) for i in few.splits["train"])  # one shared split
        assert all(set(few.y[t][idx].tolist()) == {0.0, 1.0} for t in range(10))


def test_with_fraction_seeds_and_bounds():
    data = _ids_mimo()
    a, b, c = (data.with_fraction(0.25, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(p, q) for p, q in zip(a.splits["train"], b.splits["train"]))
    assert not all(torch.equal(p, q) for p, q in zip(a.splits["train"], c.splits["train"]))
    assert data.with_fraction(None) is data and data.with_fraction(1.0) is data
    for bad in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            data.with_fraction(bad)


def test_info_describes_heads():
    data = MultiTaskData.from_arrays(
        np.zeros((12, 3)),
        {"a": np.arange(12) % 4, "b": np.arange(12) % 2, "c": np.arange(12.0)},
        ["classification", "binary", "regression"],
    )
    info = data.info
    assert info.out_dim == 4 and info.simo and info.input_dim == 3 and info.num_tasks == 3
    assert info.class_mask.sum(1).tolist() == [4, 1, 1]
    assert info.num_classes == (4, 2, 0)


# ------------------------------------------------------------------------------- validation
def _mimo(**over):
    """Keyword arguments for a valid two-task MIMO call, with some replaced."""
    args = dict(
        x=[np.zeros((6, 3)), np.ones((5, 3))],
        y=[np.arange(6) % 3, np.arange(5) % 3],
        task_types="classification",
        task_names=["alpha", "beta"],
    )
    args.update(over)
    return args


def _with(values: list, i: int, v) -> list:
    out = list(values)
    out[i] = v
    return out


_Y = [np.arange(6) % 3, np.arange(5) % 3]
_X = [np.zeros((6, 3)), np.ones((5, 3))]
_BAD = {
    "length mismatch": (_mimo(y=_with(_Y, 1, np.arange(4) % 3)), "beta.*5 samples but y has 4"),
    "nan in x": (_mimo(x=_with(_X, 1, np.full((5, 3), np.nan))), "beta.*NaN"),
    "inf in y": (_mimo(task_types="regression", y=_with(_Y, 0, np.array([1, 2, np.inf, 0, 0, 1.0]))), "alpha.*inf"),
    "nan in y": (_mimo(y=_with(_Y, 0, np.array([0, 1, np.nan, 0, 0, 1.0]))), "alpha.*NaN"),
    "label too big": (_mimo(num_classes=3, y=_with(_Y, 1, np.array([0, 1, 2, 3, 0]))), "beta.*label 3 out of range"),
    "negative label": (_mimo(y=_with(_Y, 0, np.array([0, -1, 2, 0, 1, 2]))), "alpha.*label -1"),
    "fractional label": (_mimo(y=_with(_Y, 0, np.array([0, 0.5, 2, 0, 1, 2]))), "alpha.*integers"),
    "binary label 2": (_mimo(task_types="binary", y=[np.arange(6) % 2, np.array([0, 1, 2, 0, 1])]), "beta.*0 or 1"),
    "empty task": (_mimo(x=_with(_X, 1, np.zeros((0, 3))), y=_with(_Y, 1, np.zeros(0))), "beta.*empty"),
    "unknown type": (_mimo(task_types=["classification", "ranking"]), "beta.*unknown task type 'ranking'"),
    "type count": (_mimo(task_types=["classification"] * 3), "task_types: expected 2 entries"),
    "duplicate names": (_mimo(task_names=["alpha", "alpha"]), "unique"),
    "name count": (_mimo(task_names=["alpha"]), "task_names: expected 2 names"),
    "names a string": (_mimo(task_names="ab"), "task_names"),
    "input shape": (_mimo(x=_with(_X, 1, np.ones((5, 4)))), "beta.*input shape"),
    "x and y task count": (_mimo(y=_Y[:1]), "2 tasks but y has 1"),
    "mimo y a dict": (_mimo(y={"alpha": _Y[0], "beta": _Y[1]}), "MIMO.*list"),
    "strings as x": (_mimo(x=_with(_X, 0, [["a", "b", "c"]] * 6)), "alpha.*expected real numbers"),
    "ragged x": (_mimo(x=_with(_X, 0, [[1, 2, 3], [1, 2]])), "alpha.*cannot be read"),
    "y 2-d": (_mimo(y=_with(_Y, 0, np.zeros((6, 2)))), "alpha.*1-d"),
    "x 1-d": (_mimo(x=_with(_X, 0, np.zeros(6))), "alpha.*shape"),
    "no features": (_mimo(x=[np.zeros((6, 0)), np.zeros((5, 0))]), "alpha.*no features"),
    "huge value": (_mimo(x=_with(_X, 0, np.full((6, 3), 1e300))), "alpha.*float32"),
    "one class": (_mimo(y=[np.zeros(6), np.zeros(5)]), "alpha.*at least 2 classes"),
    "num_classes not int": (_mimo(num_classes="3"), "num_classes"),
    "simo y not a dict": (dict(x=np.zeros((6, 3)), y=[np.arange(6) % 2], task_types="binary"), "SIMO.*dict"),
    "simo length": (dict(x=np.zeros((6, 3)), y={"gamma": np.arange(5) % 2}, task_types="binary"), "gamma.*6 samples"),
    "simo no tasks": (dict(x=np.zeros((6, 3)), y={}, task_types="binary"), "no tasks"),
    "simo names": (
        dict(x=np.zeros((6, 3)), y={"a": np.arange(6) % 2}, task_types="binary", task_names=["b"]),
        "do not match",
    ),
    "bad seed": (_mimo(seed=-1), "seed"),
    "bad fractions": (_mimo(val_fraction=0.5, test_fraction=0.6), "sum below 1"),
    "relatedness shape": (_mimo(relatedness=np.eye(3)), "relatedness"),
}


@pytest.mark.parametrize("case", list(_BAD), ids=list(_BAD))
def test_bad_input_raises_value_error_naming_task_and_problem(case):
    kwargs, pattern = _BAD[case]
    with pytest.raises(ValueError, match=pattern):
        MultiTaskData.from_arrays(**kwargs)


def test_torch_inputs_of_any_real_dtype_are_accepted():
    x = [torch.zeros(6, 3, dtype=torch.bfloat16), torch.ones(5, 3, dtype=torch.int32)]
    y = [torch.arange(6) % 3, torch.tensor([0, 1, 2, 0, 1], dtype=torch.uint8)]
    data = MultiTaskData.from_arrays(x, y, "classification")
    assert data.x[0].dtype == torch.float32 and data.num_classes == [3, 3]
    with pytest.raises(ValueError, match="real numbers"):
        MultiTaskData.from_arrays([torch.zeros(6, 3, dtype=torch.complex64)], y[:1], "classification")


def test_unscaled_inputs_warn_naming_the_task_and_their_magnitude():
    with pytest.warns(UserWarning, match=r"task 'beta': x: inputs reach 3e\+07 in magnitude.*standardise"):
        MultiTaskData.from_arrays(**_mimo(x=_with(_X, 1, np.full((5, 3), 3e7))))
    with warnings.catch_warnings(record=True) as caught:  # SIMO: one input, one warning
        warnings.simplefilter("always")
        MultiTaskData.from_arrays(np.full((6, 3), -2e6), {"a": np.arange(6) % 2, "b": np.arange(6) % 2}, "binary")
    assert [str(w.message).split(";")[0] for w in caught] == ["x: inputs reach 2e+06 in magnitude"]
    with warnings.catch_warnings():  # up to the threshold, and on invalid data, nothing is said
        warnings.simplefilter("error")
        MultiTaskData.from_arrays(**_mimo(x=_with(_X, 1, np.full((5, 3), 1e6))))
        with pytest.raises(ValueError, match="label 3 out of range"):
            MultiTaskData.from_arrays(
                **_mimo(x=_with(_X, 1, np.full((5, 3), 1e9)), num_classes=3, y=_with(_Y, 1, np.array([0, 1, 2, 3, 0])))
            )


# ------------------------------------------------------------------------------- fuzz
_junk = st.one_of(
    st.none(),
    st.text(max_size=3),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.one_of(st.integers(-2, 3), st.text(max_size=1), st.none()), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
_values = st.one_of(
    st.integers(-2, 4).map(float),
    st.just(0.5),
    st.just(np.nan),
    st.just(np.inf),
    st.just(-np.inf),
    st.just(1e39),
    st.just(1e12),
    st.floats(-1e6, 1e6, allow_nan=False),
)


@st.composite
def _array(draw, n: int | None = None):
    """A numeric array (often well-formed, sometimes with NaN/inf/huge values), or junk."""
    kind = draw(st.sampled_from(["ok", "ok", "ok", "shape", "junk", "nested", "tensor"]))
    n = draw(st.integers(0, 6)) if n is None or kind == "shape" else n
    if kind == "junk":
        return draw(_junk)
    if kind == "nested":  # ragged or mixed python lists
        return draw(st.lists(st.one_of(st.lists(_values, max_size=3), _values, st.text(max_size=1)), max_size=4))
    shape = (n,) + tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    a = np.array(draw(st.lists(_values, min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))), dtype=float)
    a = a.reshape(shape)
    if kind == "tensor":
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.float64]))
        return torch.tensor(np.nan_to_num(a, posinf=9, neginf=-9).clip(-1e4, 1e4)).to(dtype)
    return a


_TYPES = ["classification", "binary", "regression"]


def _targets(draw, kind: str, n: int) -> np.ndarray:
    if kind == "regression":
        return np.array(draw(st.lists(st.floats(-1e3, 1e3), min_size=n, max_size=n)))
    top = 1 if kind == "binary" else draw(st.integers(1, 4))
    return np.array(draw(st.lists(st.integers(0, top), min_size=n, max_size=n)))


@st.composite
def _inputs(draw) -> dict:
    """A valid MIMO or SIMO call, then up to three random corruptions of its arguments."""
    T, n, d = draw(st.integers(1, 3)), draw(st.integers(2, 8)), draw(st.integers(1, 3))
    types = [draw(st.sampled_from(_TYPES)) for _ in range(T)]
    names = [f"t{t}" for t in range(T)]
    simo = draw(st.booleans())
    if simo:
        x = np.array(draw(st.lists(st.floats(-5, 5), min_size=n * d, max_size=n * d))).reshape(n, d)
        y = {name: _targets(draw, k, n) for name, k in zip(names, types)}
    else:
        sizes = [draw(st.integers(1, n)) for _ in range(T)]
        x = [np.array(draw(st.lists(st.floats(-5, 5), min_size=m * d, max_size=m * d))).reshape(m, d) for m in sizes]
        y = [_targets(draw, k, m) for k, m in zip(types, sizes)]
    kwargs = dict(x=x, y=y, task_types=types if draw(st.booleans()) else types[0], task_names=names)
    for _ in range(draw(st.integers(0, 3))):
        what = draw(
            st.sampled_from(
                [
                    "x",
                    "y",
                    "task_types",
                    "task_names",
                    "num_classes",
                    "splits",
                    "seed",
                    "val_fraction",
                    "relatedness",
                    "class_names",
                    "setting",
                ]
            )
        )
        t = draw(st.integers(0, T - 1))
        if what == "x" and simo:
            kwargs["x"] = draw(_array(n))
        elif what == "x":
            kwargs["x"] = _with(x, t, draw(_array(len(y[t]))))
        elif what == "y" and simo:
            kwargs["y"] = {**y, names[t]: draw(_array(n))} if draw(st.booleans()) else draw(_junk)
        elif what == "y":
            kwargs["y"] = _with(y, t, draw(_array(len(y[t])))) if draw(st.booleans()) else draw(_junk)
        elif what == "task_types":
            kwargs["task_types"] = draw(
                st.one_of(_junk, st.lists(st.one_of(st.sampled_from(_TYPES), _junk), min_size=T - 1, max_size=T + 1))
            )
        elif what == "task_names":
            kwargs["task_names"] = draw(st.one_of(_junk, st.lists(st.sampled_from(["t0", "t1", "t2", 1]), max_size=4)))
        elif what == "num_classes":
            kwargs["num_classes"] = draw(st.one_of(_junk, st.integers(-1, 6), st.lists(st.integers(-1, 6), max_size=4)))
        elif what == "splits":
            index = st.lists(st.integers(-1, n), max_size=n)
            kwargs["splits"] = draw(
                st.one_of(
                    _junk,
                    st.fixed_dictionaries(
                        {"train": index if simo else st.lists(index, min_size=T, max_size=T)},
                        optional={"test": st.one_of(_junk, index if simo else st.lists(index, min_size=T, max_size=T))},
                    ),
                )
            )
        elif what == "seed":
            kwargs["seed"] = draw(st.one_of(_junk, st.integers(-2, 2**40)))
        elif what == "val_fraction":
            kwargs["val_fraction"] = draw(st.one_of(_junk, st.floats(-1, 1.5)))
        elif what == "relatedness":
            kwargs["relatedness"] = draw(st.one_of(_junk, _array(T)))
        elif what == "class_names":
            kwargs["class_names"] = draw(_junk)
        else:  # SIMO arguments in MIMO shape and back
            kwargs["y"] = list(y.values()) if simo else dict(zip(names, y))
    return kwargs


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_inputs())
def test_fuzz_from_arrays_succeeds_or_raises_value_error(kwargs):
    """Malformed input of any kind is a ValueError, never a TypeError, IndexError or torch error."""
    try:
        data = MultiTaskData.from_arrays(**kwargs)
    except ValueError:
        return
    # what was accepted must be usable: heads, a training batch and every evaluation split
    info = data.info
    assert info.num_tasks == data.num_tasks >= 1
    b = data.train_batch(4, torch.Generator().manual_seed(0), "cpu")
    assert torch.isfinite(b.x).all() and torch.isfinite(b.y[b.mask]).all()
    for split in ("val", "test"):
        for b in data.eval_batches(split, "cpu"):
            assert torch.isfinite(b.x).all()
    data.summary()
