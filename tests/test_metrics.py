"""Tests for pyromtl.metrics: hand-computed values, reference implementations, sign
conventions of Δm / Δ_I / η̂, and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyromtl import metrics as M
from pyromtl.tables import width


# ----------------------------------------------------------------------------- helpers
def brute_auc(score: np.ndarray, pos: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2."""
    s_pos, s_neg = score[pos], score[~pos]
    wins = sum((a > b) + 0.5 * (a == b) for a in s_pos for b in s_neg)
    return wins / (len(s_pos) * len(s_neg))


def loop_ece(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Textbook ECE: explicit bins ((m-1)/M, m/M], weighted |acc - conf|."""
    conf = probs.max(axis=1)
    pred = probs.argmax(axis=1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if lo == 0.0:
            inside |= conf == 0.0
        if inside.any():
            total += inside.mean() * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    return total


def random_probs(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    logits = rng.normal(size=(n, c)) * 2
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- accuracy
def test_accuracy_multiclass_and_binary():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    assert M.accuracy(probs, [0, 1, 2, 1]) == pytest.approx(0.75)
    assert M.accuracy(np.array([0.9, 0.2, 0.6, 0.4]), np.array([1, 0, 0, 0])) == pytest.approx(0.75)


def test_accuracy_binary_tie_predicts_zero_like_argmax():
    assert M.accuracy([0.5], [0]) == 1.0
    assert M.accuracy([[0.5, 0.5]], [0]) == 1.0


def test_accuracy_accepts_float_labels_and_torch_tensors():
    torch = pytest.importorskip("torch")
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7]], requires_grad=True)
    assert M.accuracy(probs, torch.tensor([0.0, 1.0])) == 1.0


# ----------------------------------------------------------------------------- AUC
def test_auc_binary_matches_pairwise_count_with_ties():
    score = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.9, 0.2])
    y = np.array([0, 0, 1, 1, 1, 0, 0])
    assert M.auc(score, y) == pytest.approx(brute_auc(score, y == 1))


def test_auc_perfect_and_reversed():
    y = np.array([0, 0, 1, 1])
    assert M.auc([0.1, 0.2, 0.8, 0.9], y) == 1.0
    assert M.auc([0.9, 0.8, 0.2, 0.1], y) == 0.0


def test_auc_multiclass_is_macro_ovr_over_present_classes():
    rng = np.random.default_rng(0)
    probs = random_probs(rng, 40, 4)
    y = rng.integers(0, 3, size=40)  # class 3 never occurs
    expected = np.mean([brute_auc(probs[:, c], y == c) for c in range(3)])
    assert M.auc(probs, y) == pytest.approx(expected)


def test_auc_single_class_is_nan_without_error():
    assert math.isnan(M.auc([0.2, 0.7, 0.4], [1, 1, 1]))
    assert math.isnan(M.auc(np.full((3, 3), 1 / 3), [2, 2, 2]))


# ----------------------------------------------------------------------------- ECE
def test_ece_perfectly_calibrated_is_zero():
    # binary: confidence 0.8 on ten samples, eight of them right; confidence 0.6 on five, three right
    p = np.r_[np.full(10, 0.8), np.full(5, 0.4)]  # 0.4 for class 1 = confidence 0.6 in class 0
    y = np.r_[np.ones(8), np.zeros(2), np.zeros(3), np.ones(2)]
    assert M.ece(p, y) == pytest.approx(0.0, abs=1e-12)
    # multiclass: always 1/2 on the predicted class, right half the time
    probs = np.tile([0.5, 0.25, 0.25], (4, 1))
    assert M.ece(probs, [0, 0, 1, 2]) == pytest.approx(0.0, abs=1e-12)


def test_ece_hand_computed_miscalibration():
    # bin of 0.9-confidence: accuracy 1/2 -> gap 0.4, weight 1/2
    # bin of 0.6-confidence: accuracy 1   -> gap 0.4, weight 1/2
    assert M.ece([0.9, 0.9, 0.6, 0.6], [1, 0, 1, 1]) == pytest.approx(0.4)
    # 0.91 and 0.93 share the bin (13/15, 14/15]: mean confidence 0.92, accuracy 1/2;
    # 0.55 alone in (8/15, 9/15]: wrong -> gap 0.55.
    assert M.ece([0.91, 0.93, 0.55], [1, 0, 0]) == pytest.approx((2 / 3) * 0.42 + (1 / 3) * 0.55)


def test_ece_one_bin_is_accuracy_minus_mean_confidence():
    rng = np.random.default_rng(1)
    probs = random_probs(rng, 50, 3)
    y = rng.integers(0, 3, size=50)
    expected = abs(M.accuracy(probs, y) - probs.max(axis=1).mean())
    assert M.ece(probs, y, n_bins=1) == pytest.approx(expected)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60), c=st.integers(2, 5))
def test_ece_matches_textbook_loop(seed, n, c):
    rng = np.random.default_rng(seed)
    probs = random_probs(rng, n, c)
    y = rng.integers(0, c, size=n)
    value = M.ece(probs, y)
    assert value == pytest.approx(loop_ece(probs, y), abs=1e-12)
    assert 0.0 <= value <= 1.0


def test_ece_rejects_bad_bins():
    with pytest.raises(ValueError, match="n_bins"):
        M.ece([0.5], [1], n_bins=0)


# ----------------------------------------------------------------------------- Brier
@pytest.mark.parametrize("c", [2, 3, 5, 10])
def test_brier_perfect_and_uniform(c):
    y = np.arange(2 * c) % c
    assert M.brier(np.eye(c)[y], y) == 0.0
    assert M.brier(np.full((2 * c, c), 1 / c), y) == pytest.approx((c - 1) / c)


def test_brier_binary_is_two_class():
    p = np.array([0.9, 0.3, 0.6])
    y = np.array([1, 0, 0])
    assert M.brier(p, y) == pytest.approx(2 * np.mean((p - y) ** 2))
    assert M.brier(p, y) == pytest.approx(M.brier(np.stack([1 - p, p], axis=1), y))
    assert M.brier([0.5, 0.5], [0, 1]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- regression
def test_regression_metrics_hand_computed():
    pred = np.array([1.0, 2.0, 5.0])
    y = np.array([2.0, 2.0, 2.0 + 1.0])
    assert M.mse(pred, y) == pytest.approx((1 + 0 + 4) / 3)
    assert M.mae(pred, y) == pytest.approx((1 + 0 + 2) / 3)


def test_nmse_of_predicting_the_mean_is_one_and_scale_free():
    rng = np.random.default_rng(2)
    y = rng.normal(3.0, 2.0, size=30)
    assert M.nmse(np.full_like(y, y.mean()), y) == pytest.approx(1.0)
    assert M.nmse(y, y) == 0.0
    pred = y + rng.normal(size=30)
    assert M.nmse(pred, y) == pytest.approx(M.mse(pred, y) / np.var(y))
    assert M.nmse(10 * pred + 7, 10 * y + 7) == pytest.approx(M.nmse(pred, y))


def test_nmse_of_constant_target_is_nan():
    assert math.isnan(M.nmse([1.0, 2.0], [3.0, 3.0]))


# ----------------------------------------------------------------------------- task_metrics
def test_task_metrics_keys_and_values():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5]])
    out = M.task_metrics("classification", probs, [0, 1, 1])
    assert list(out) == ["accuracy", "auc", "ece", "brier", "nll"]
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.8) + math.log(0.3)) / 3)
    assert all(isinstance(v, float) for v in out.values())

    out = M.task_metrics("binary", np.array([0.9, 0.2, 0.7]), np.array([1, 0, 0]))
    assert list(out) == ["accuracy", "auc", "ece", "brier", "nll"]
    assert out["auc"] == pytest.approx(1.0)
    assert M.task_metrics("binary", np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), [1, 0, 0]) == out

    out = M.task_metrics("regression", np.array([0.0, 1.0]), np.array([0.0, 2.0]))
    assert out == {"mse": 0.5, "mae": 0.5, "nmse": pytest.approx(0.5)}
    dense = {key for keys in M.DENSE_METRICS.values() for key in keys}
    assert set(M.HIGHER_IS_BETTER) == set(M.CLASSIFICATION_METRICS) | set(M.REGRESSION_METRICS) | dense


def test_nll_floors_a_zero_probability_and_matches_cross_entropy():
    probs = np.array([[1.0, 0.0], [0.25, 0.75]])
    assert M.nll(probs, [1, 1]) == pytest.approx((-math.log(1e-12) - math.log(0.75)) / 2)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 4))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 4, 50)
    ce = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(y)).item()
    assert M.nll(p, y) == pytest.approx(ce, rel=1e-9)


def test_task_metrics_rejects_wrong_type_and_shape():
    with pytest.raises(ValueError, match="unknown task type 'ordinal'"):
        M.task_metrics("ordinal", [0.5], [1])
    with pytest.raises(ValueError, match=r"classification task needs pred \[N, C\]"):
        M.task_metrics("classification", [0.5, 0.5], [1, 0])
    with pytest.raises(ValueError, match="binary task needs pred"):
        M.task_metrics("binary", np.full((2, 3), 1 / 3), [1, 0])
    with pytest.raises(ValueError, match="pred must be 1-D"):
        M.task_metrics("regression", np.zeros((2, 1)), [1.0, 0.0])


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "fn, args, match",
    [
        (M.accuracy, (np.full((3, 2), 0.5), [0, 1]), "shape mismatch"),
        (M.accuracy, (np.zeros((0, 2)), []), "empty"),
        (M.brier, ([0.2, np.nan], [0, 1]), "NaN"),
        (M.ece, ([0.2, 0.4], [0, np.inf]), "NaN or inf"),
        (M.auc, ([0.2, 1.4], [0, 1]), r"in \[0, 1\]"),
        (M.accuracy, ([0.2, 0.4], [0, 2]), "labels out of range.*binary"),
        (M.accuracy, (np.full((2, 3), 1 / 3), [0, 3]), "labels out of range"),
        (M.accuracy, ([0.2, 0.4], [0, 0.5]), "integer class labels"),
        (M.brier, ([[0.5, 0.6], [0.5, 0.5]], [0, 1]), "row 0 sums to 1.1"),
        (M.accuracy, (np.ones((2, 1)), [0, 0]), "C >= 2"),
        (M.accuracy, (np.ones((2, 2, 2)), [0, 0]), "got shape"),
        (M.mse, ([1.0, 2.0], [1.0]), "shape mismatch"),
        (M.mae, ([], []), "pred is empty"),
        (M.nmse, ([1.0, np.nan], [1.0, 2.0]), "pred contains 1 NaN"),
        (M.mse, ([1.0], [[1.0]]), "y must be 1-D"),
        (M.mse, (["a"], [1.0]), "numeric"),
    ],
)
def test_input_validation(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


# ----------------------------------------------------------------------------- aggregation
def test_primary_metric_and_selection_score():
    assert M.primary_metric("classification") == "accuracy"
    assert M.primary_metric("binary") == "accuracy"
    assert M.primary_metric("regression") == "nmse"
    results = {"a": {"accuracy": 0.8, "auc": 0.9}, "r": {"nmse": 0.4, "mse": 2.0}}
    assert M.selection_score(results, ["classification", "regression"]) == pytest.approx((0.8 - 0.4) / 2)
    better = {"a": {"accuracy": 0.8}, "r": {"nmse": 0.2}}
    assert M.selection_score(better, ["binary", "regression"]) > M.selection_score(results, ["binary", "regression"])
    assert M.selection_score({"a": {"accuracy": 0.5}, "b": {"accuracy": 0.7}}, "binary") == pytest.approx(0.6)
    # NaN tasks are skipped; all-NaN gives NaN
    assert M.selection_score({"r": {"nmse": math.nan}, "s": {"nmse": 0.5}}, "regression") == -0.5
    assert math.isnan(M.selection_score({"r": {"nmse": math.nan}}, "regression"))


def test_selection_score_errors():
    with pytest.raises(ValueError, match="2 task types for 1 tasks"):
        M.selection_score({"a": {"accuracy": 0.5}}, ["binary", "binary"])
    with pytest.raises(ValueError, match=r"task 'r' .* no 'nmse'"):
        M.selection_score({"r": {"mse": 0.5}}, ["regression"])
    with pytest.raises(ValueError, match="unknown task type"):
        M.selection_score({"r": {"mse": 0.5}}, ["count"])


def test_average_is_per_metric_and_nan_aware():
    tasks = {
        "a": {"accuracy": 0.5, "auc": math.nan},
        "b": {"accuracy": 0.7, "auc": 0.8},
        "r": {"nmse": 0.3, "mse": 1.5},
        "s": {"nmse": math.nan},
    }
    out = M.average(tasks)
    assert list(out) == ["accuracy", "auc", "nmse", "mse"]
    assert out == {"accuracy": pytest.approx(0.6), "auc": 0.8, "nmse": 0.3, "mse": 1.5}
    assert math.isnan(M.average({"a": {"auc": math.nan}})["auc"])
    with pytest.raises(ValueError, match="no tasks"):
        M.average({})
    with pytest.raises(ValueError, match="task 'a': metric 'auc' is not a number"):
        M.average({"a": {"auc": "high"}})


# ----------------------------------------------------------------------------- Δm, Δ_I, η̂
STL = {"t1": {"accuracy": 0.50, "ece": 0.10}, "t2": {"accuracy": 0.80, "ece": 0.20}, "r": {"nmse": 0.40}}


def test_better_everywhere_signs():
    better = {"t1": {"accuracy": 0.60, "ece": 0.05}, "t2": {"accuracy": 0.88, "ece": 0.10}, "r": {"nmse": 0.20}}
    assert M.delta_m(better, STL) < 0
    assert M.delta_i(better, STL) > 0
    assert M.eta_hat(better, STL) == 100.0
    all_metrics = ["accuracy", "ece", "nmse"]
    assert M.delta_m(better, STL, all_metrics) < 0
    assert M.delta_i(better, STL, all_metrics) > 0
    assert M.eta_hat(better, STL, all_metrics) == 100.0
    # primary metrics: +20%, +10%, +50% (nmse halves)
    assert M.delta_m(better, STL) == pytest.approx(-(20 + 10 + 50) / 3)
    assert M.delta_i(better, STL) == pytest.approx((20 + 10 + 50) / 3)


def test_identical_runs_are_neutral_and_safe():
    assert M.delta_m(STL, STL) == 0.0
    assert M.delta_i(STL, STL) == 0.0
    assert M.eta_hat(STL, STL) == 100.0  # ties count as "no worse"


def test_worse_on_one_of_two_tasks():
    base = {"a": {"accuracy": 0.5}, "b": {"nmse": 0.5}}
    meth = {"a": {"accuracy": 0.6}, "b": {"nmse": 0.6}}  # +20% on a, -20% on b
    assert M.eta_hat(meth, base) == 50.0
    assert M.delta_m(meth, base) == pytest.approx(0.0, abs=1e-12)
    meth["b"]["nmse"] = 0.55  # -10% on b
    assert M.delta_m(meth, base) == pytest.approx(-5.0)
    assert M.delta_i(meth, base) == pytest.approx(5.0)


def test_delta_m_pairs_vs_delta_i_task_weighting():
    # two metrics on task a (+10% accuracy, ece 0.2 -> 0.1 is +50%), one on task b (-30%)
    base = {"a": {"accuracy": 0.5, "ece": 0.2}, "b": {"accuracy": 0.5, "ece": 0.1}}
    meth = {"a": {"accuracy": 0.55, "ece": 0.1}, "b": {"accuracy": 0.35}}
    metrics = ["accuracy", "ece"]
    with pytest.raises(ValueError, match="task 'b': method has no 'ece'"):
        M.delta_m(meth, base, metrics)
    base["b"].pop("ece")
    # Δm averages the three pairs equally; Δ_I averages within a task first
    assert M.delta_m(meth, base, metrics) == pytest.approx(-(10 + 50 - 30) / 3)
    assert M.delta_i(meth, base, metrics) == pytest.approx(((10 + 50) / 2 - 30) / 2)
    # η̂: task a safe on both metrics, task b unsafe
    assert M.eta_hat(meth, base, metrics) == 50.0
    meth["a"]["ece"] = 0.3
    assert M.eta_hat(meth, base, metrics) == 25.0


def test_single_metric_delta_i_is_minus_delta_m():
    rng = np.random.default_rng(3)
    base = {f"t{i}": {"accuracy": float(v)} for i, v in enumerate(rng.uniform(0.3, 0.9, 6))}
    meth = {t: {"accuracy": d["accuracy"] + float(rng.normal(0, 0.05))} for t, d in base.items()}
    assert M.delta_i(meth, base) == pytest.approx(-M.delta_m(meth, base))


@pytest.mark.parametrize("fn", [M.delta_m, M.delta_i, M.eta_hat])
def test_relative_metric_errors_name_the_task(fn):
    base = {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.5}}
    with pytest.raises(ValueError, match="missing from method: 'b'"):
        fn({"a": {"accuracy": 0.6}}, base)
    with pytest.raises(ValueError, match="missing from baseline: 'c'"):
        fn({**base, "c": {"accuracy": 0.1}}, base)
    with pytest.raises(ValueError, match="task 'b': baseline's 'accuracy' is 0"):
        fn(base, {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.0}})
    with pytest.raises(ValueError, match="task 'a': method's 'accuracy' is nan"):
        fn({"a": {"accuracy": math.nan}, "b": {"accuracy": 0.5}}, base)
    with pytest.raises(ValueError, match="task 'a': baseline has neither"):
        fn({"a": {"mse": 1.0}}, {"a": {"mse": 1.0}})
    with pytest.raises(ValueError, match="task 'a': baseline has none of the metrics"):
        fn(base, base, ["nmse"])
    with pytest.raises(ValueError, match="unknown metric"):
        fn(base, base, ["f1"])


# ----------------------------------------------------------------------------- table
def test_compare_table_layout_and_deltas():
    stl = {"a": {"accuracy": 0.5, "auc": 0.6}, "r": {"nmse": 0.5, "mse": 1.0}}
    mtl = {"a": {"accuracy": 0.6, "auc": 0.7}, "r": {"nmse": 0.25, "mse": 0.5}}
    partial = {"a": {"accuracy": 0.4}}
    table = M.compare_table({"stl": stl, "mtl": mtl, "partial": partial}, baseline="stl")
    lines = table.splitlines()
    assert lines[0].split("|")[1:-1] == [" task    ", " metric     ", "    stl ", "    mtl ", " partial "]
    rows = {
        tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]] for line in lines[2:]
    }
    assert rows[("a", "accuracy ↑")] == ["0.5000", "0.6000", "0.4000"]
    assert rows[("r", "nmse ↓")] == ["0.5000", "0.2500", "–"]
    assert rows[("average", "accuracy ↑")] == ["0.5000", "0.6000", "0.4000"]
    assert rows[("average", "nmse ↓")] == ["0.5000", "0.2500", "–"]
    assert rows[("Δm% ↓", "vs stl")] == ["—", "-35.00", "n/a"]  # (+20% and +50%) / 2
    assert rows[("Δ_I% ↑", "vs stl")] == ["—", "+35.00", "n/a"]
    assert rows[("η̂ ↑", "vs stl")] == ["—", "100.0", "n/a"]
    # every line has the same display width (η̂ carries a combining mark)
    assert len({width(line) for line in lines}) == 1


def test_compare_table_without_baseline_and_errors():
    table = M.compare_table({"x": {"a": {"accuracy": 0.5}}}, baseline=None)
    assert "Δm" not in table and "0.5000" in table
    with pytest.raises(ValueError, match="baseline 'stl' is not one of the runs"):
        M.compare_table({"x": {"a": {"accuracy": 0.5}}}, baseline="stl")
    with pytest.raises(ValueError, match="no runs"):
        M.compare_table({}, baseline=None)
