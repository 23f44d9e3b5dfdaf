"""Dense prediction: the NYUv2 and CityScapes loaders on tiny fake folders, the dense metrics by
hand, the conv generalisation of the SMTL pieces, and ``examples/smtl_dense.py`` end to end."""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pyromtl import metrics as M
from pyromtl.data.dense import DENSE_DATASETS, DenseTaskData, load_cityscapes, load_nyuv2, write_fake
from pyromtl.models.smtl import TaskStack, mix_encoders, straight_through_gate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "smtl_dense.py"


@pytest.fixture
def nyu(tmp_path: Path) -> Path:
    return write_fake(tmp_path / "nyuv2", "nyuv2")


@pytest.fixture
def city(tmp_path: Path) -> Path:
    return write_fake(tmp_path / "cityscapes", "cityscapes")


# ----------------------------------------------------------------------------- loaders
def test_nyuv2_reads_the_layout_channels_first_with_val_carved_from_train(nyu: Path) -> None:
    data = load_nyuv2(nyu, seed=3)
    assert data.name == "nyuv2" and data.task_names == ["segmentation", "depth", "normal"] and data.num_classes == 13
    assert data.images.shape == (9, 3, 16, 24) and data.images.dtype == torch.float32
    seg, depth, normal = (data.targets[t] for t in data.task_names)
    assert seg.shape == (9, 16, 24) and seg.dtype == torch.int64
    assert depth.shape == (9, 1, 16, 24) and normal.shape == (9, 3, 16, 24)
    # rows 0-5 are train/<i>.npy, rows 6-8 val/<i>.npy, moved from HWC to CHW
    np.testing.assert_array_equal(data.images[7].numpy(), np.load(nyu / "val" / "image" / "1.npy").transpose(2, 0, 1))
    np.testing.assert_array_equal(seg[4].numpy(), np.load(nyu / "train" / "label" / "4.npy"))
    np.testing.assert_array_equal(normal[2].numpy(), np.load(nyu / "train" / "normal" / "2.npy").transpose(2, 0, 1))
    assert (seg == -1).any() and (depth == 0).any()  # the missing pixels survive as markers
    # the given val is test; 10% of the 6 train images (at least one) is val, drawn with the seed
    assert data.splits["test"].tolist() == [6, 7, 8]
    train, val = set(data.splits["train"].tolist()), set(data.splits["val"].tolist())
    assert len(val) == 1 and train | val == set(range(6)) and not train & val
    again = load_nyuv2(nyu, seed=3)
    assert all(torch.equal(again.splits[s], data.splits[s]) for s in data.splits)
    assert len({load_nyuv2(nyu, seed=s).splits["val"].item() for s in range(10)}) > 1


def test_numbering_may_have_gaps_when_every_folder_agrees(nyu: Path) -> None:
    for folder in ("image", "label", "depth", "normal"):
        (nyu / "val" / folder / "1.npy").unlink()
    data = load_nyuv2(nyu)
    assert data.splits["test"].tolist() == [6, 7]
    np.testing.assert_array_equal(data.images[7].numpy(), np.load(nyu / "val" / "image" / "2.npy").transpose(2, 0, 1))


def test_nyuv2_tasks_and_limit_pick_what_is_read(nyu: Path) -> None:
    shutil.rmtree(nyu / "train" / "normal")  # not needed without the normal task
    data = load_nyuv2(nyu, tasks=("depth", "segmentation"), limit=4, val_fraction=0.25)
    assert data.task_names == ["depth", "segmentation"] and len(data.images) == 7
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [3, 1, 3]
    np.testing.assert_array_equal(data.images[4].numpy(), np.load(nyu / "val" / "image" / "0.npy").transpose(2, 0, 1))
    assert "train / val / test 3 / 1 / 3" in data.summary()
    assert len(load_nyuv2(nyu, tasks=["depth"], val_fraction=0).splits["val"]) == 0


def test_cityscapes_reads_label_7_or_label_19(city: Path) -> None:
    for classes in (7, 19):
        data = load_cityscapes(city, num_classes=classes)
        assert data.task_names == ["segmentation", "depth"] and data.num_classes == classes
        np.testing.assert_array_equal(
            data.targets["segmentation"][1].numpy(), np.load(city / "train" / f"label_{classes}" / "1.npy")
        )
        assert data.targets["segmentation"].max() == classes - 1
    assert DENSE_DATASETS["cityscapes"] is load_cityscapes and DENSE_DATASETS["nyuv2"] is load_nyuv2


def test_cityscapes_reads_libmtls_label_folder_for_7_classes(city: Path) -> None:
    for split in ("train", "val"):  # LibMTL's cityscapes2: label/ with 7 classes, no label_19/
        (city / split / "label_7").rename(city / split / "label")
        shutil.rmtree(city / split / "label_19")
    data = load_cityscapes(city)
    np.testing.assert_array_equal(data.targets["segmentation"][7].numpy(), np.load(city / "val" / "label" / "1.npy"))
    with pytest.raises(FileNotFoundError, match=r"no 19-class label folder \(label_19\) found"):
        load_cityscapes(city, num_classes=19)
    assert load_cityscapes(city, tasks=["depth"], num_classes=19).task_names == ["depth"]  # no labels needed


def _save(path: Path, arr: np.ndarray) -> None:
    np.save(path, arr.astype(np.float32))


@pytest.mark.parametrize(
    ("breakage", "error", "message"),
    [
        (lambda r: shutil.rmtree(r / "val"), FileNotFoundError, r"val/image: folder not found"),
        (lambda r: shutil.rmtree(r / "train" / "depth"), FileNotFoundError, r"train/depth: folder not found"),
        (
            lambda r: (r / "train" / "depth" / "2.npy").unlink(),
            ValueError,
            r"train/depth: its files do not match .*train/image: missing 2\.npy",
        ),
        (
            lambda r: shutil.copy(r / "val" / "label" / "0.npy", r / "val" / "label" / "9.npy"),
            ValueError,
            r"val/label: its files do not match .*: extra 9\.npy",
        ),
        (
            lambda r: _save(r / "train" / "image" / "x.npy", np.zeros((16, 24, 3))),
            ValueError,
            r"x\.npy: expected files named <i>\.npy",
        ),
        (
            lambda r: _save(r / "val" / "depth" / "1.npy", np.ones((16, 24))),
            ValueError,
            r"val/depth/1\.npy: depth must be shaped \[16, 24, 1\], got \[16, 24\]",
        ),
        (
            lambda r: _save(r / "val" / "image" / "0.npy", np.ones((16, 20, 3))),
            ValueError,
            r"val/image/0\.npy: image must be shaped \[16, 24, 3\], got \[16, 20, 3\]",
        ),
        (
            lambda r: _save(r / "train" / "image" / "0.npy", np.ones((16, 24))),
            ValueError,
            r"train/image/0\.npy: image must be shaped \[H, W, 3\]",
        ),
        (
            lambda r: _save(r / "train" / "normal" / "3.npy", np.full((16, 24, 3), np.nan)),
            ValueError,
            r"train/normal/3\.npy: normal contains NaN values",
        ),
        (
            lambda r: _save(r / "train" / "image" / "1.npy", np.full((16, 24, 3), np.inf)),
            ValueError,
            r"train/image/1\.npy: image contains inf values",
        ),
        (
            lambda r: _save(r / "train" / "label" / "5.npy", np.full((16, 24), 13)),
            ValueError,
            r"train/label/5\.npy: label 13 out of range: expected -1 \(ignored\) or 0\.\.12",
        ),
        (lambda r: _save(r / "train" / "label" / "5.npy", np.full((16, 24), -2)), ValueError, r"label -2 out of range"),
        (
            lambda r: _save(r / "train" / "label" / "0.npy", np.full((16, 24), 0.5)),
            ValueError,
            r"train/label/0\.npy: segmentation labels must be integers",
        ),
        (
            lambda r: _save(r / "val" / "depth" / "0.npy", -np.ones((16, 24, 1))),
            ValueError,
            r"val/depth/0\.npy: depth must be >= 0",
        ),
        (
            lambda r: (r / "train" / "depth" / "4.npy").write_bytes(b"not an array"),
            ValueError,
            r"train/depth/4\.npy: cannot read the \.npy file",
        ),
    ],
)
def test_nyuv2_refuses_bad_files_naming_them(nyu: Path, breakage, error, message) -> None:
    breakage(nyu)
    with pytest.raises(error, match=message):
        load_nyuv2(nyu)


def test_loaders_refuse_bad_options(tmp_path: Path, nyu: Path, city: Path) -> None:
    with pytest.raises(FileNotFoundError, match="NYUv2 directory not found"):
        load_nyuv2(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['edges'\]"):
        load_nyuv2(nyu, tasks=["segmentation", "edges"])
    with pytest.raises(ValueError, match="non-empty sequence"):
        load_nyuv2(nyu, tasks="depth")
    with pytest.raises(ValueError, match="tasks repeat"):
        load_nyuv2(nyu, tasks=["depth", "depth"])
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['normal'\]"):
        load_cityscapes(city, tasks=["normal"])
    with pytest.raises(ValueError, match="num_classes must be one of"):
        load_cityscapes(city, num_classes=13)
    for limit in (0, 2.5, True):
        with pytest.raises(ValueError, match="limit must be a positive integer"):
            load_nyuv2(nyu, limit=limit)
    with pytest.raises(ValueError, match="val_fraction"):
        load_nyuv2(nyu, val_fraction=1.0)
    with pytest.raises(ValueError, match="1 train image"):
        load_nyuv2(nyu, limit=1)


def test_the_container_checks_its_structure() -> None:
    images = torch.zeros(4, 3, 2, 3)
    splits = {"train": torch.tensor([0, 1]), "val": torch.tensor([2]), "test": torch.tensor([3])}
    ok = {"segmentation": torch.zeros(4, 2, 3, dtype=torch.int64), "depth": torch.ones(4, 1, 2, 3)}
    data = DenseTaskData("toy", images, ok, splits, num_classes=2)
    x, y = data.batch("train", 5, torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 2, 3) and y["depth"].shape == (2, 1, 2, 3)
    bad = [
        ({"images": torch.zeros(4, 3, 2)}, r"images must be a float tensor \[N, C, H, W\]"),
        ({"targets": {"depth": torch.ones(4, 2, 3)}}, r"depth targets must be shaped \[4, 1, 2, 3\]"),
        ({"targets": {"segmentation": torch.zeros(4, 2, 3)}}, "must be int64 labels"),
        ({"targets": {"segmentation": torch.full((4, 2, 3), 2)}}, r"labels must be -1 \(ignored\) or in \[0, 2\)"),
        ({"targets": {"edges": torch.ones(4, 1, 2, 3)}}, "unknown dense task 'edges'"),
        ({"targets": {}}, "no targets"),
        ({"splits": {"train": torch.tensor([0, 1])}}, "splits must be exactly"),
        ({"splits": {**splits, "test": torch.tensor([4])}}, r"split indices must lie in \[0, 4\)"),
        ({"splits": {**splits, "test": torch.tensor([1])}}, "the splits overlap"),
    ]
    fields = {"name": "toy", "images": images, "targets": ok, "splits": splits, "num_classes": 2}
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            DenseTaskData(**{**fields, **change})
    with pytest.raises(ValueError, match="batch size must be a positive integer"):
        data.batch("train", 0)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        data.split("dev")


# ----------------------------------------------------------------------------- metrics
SEG_TARGET = np.array([[[0, 0, 1], [1, -1, 2]]])
SEG_PRED = np.array([[[0, 1, 1], [1, 2, 2]]])


def test_miou_and_pixel_accuracy_by_hand() -> None:
    # labelled pixels (true -> predicted): 0->0, 0->1, 1->1, 1->1, 2->2; the -1 pixel is ignored
    # IoU: class 0 1/2 (one missed), class 1 2/3 (one false positive), class 2 1/1
    assert M.miou(SEG_PRED, SEG_TARGET, 3) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert M.miou(torch.tensor(SEG_PRED), torch.tensor(SEG_TARGET), 5) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert M.pixel_accuracy(SEG_PRED, SEG_TARGET) == pytest.approx(4 / 5)
    # a class only predicted counts (IoU 0); the ignored pixel's prediction never does
    assert M.miou(np.array([3, 0]), np.array([0, 0]), 4) == pytest.approx((1 / 2 + 0) / 2)
    assert M.miou(np.array([3, 0]), np.array([-1, 0]), 4) == 1.0
    assert M.dense_task_metrics("segmentation", SEG_PRED, SEG_TARGET, 3) == {
        "miou": pytest.approx(13 / 18),
        "pixel_acc": pytest.approx(0.8),
    }


def test_depth_errors_and_normal_angle_by_hand() -> None:
    target = torch.tensor([[[[2.0, 0.0], [4.0, 1.0]]]])  # [1, 1, 2, 2]; 0: no reading
    pred = torch.tensor([[[[1.0, 5.0], [5.0, 1.0]]]])
    # errors 1, 1, 0 at depths 2, 4, 1 (the 0 pixel is skipped)
    assert M.depth_errors(pred, target) == {"abs_err": pytest.approx(2 / 3), "rel_err": pytest.approx(0.25)}
    normals = np.array([[0, 0, 1], [1, 0, 0], [0, 0, 0]], dtype=float).T.reshape(1, 3, 1, 3)
    guess = np.array([[0, 0, 2], [0, 1, 0], [1, 1, 1]], dtype=float).T.reshape(1, 3, 1, 3)
    # 0° (pred is not unit length), 90°, and a pixel without a normal
    assert M.normal_angle(guess, normals) == pytest.approx(45.0)
    assert M.dense_task_metrics("normal", -normals, normals) == {"mean_angle": pytest.approx(180.0)}
    assert M.dense_task_metrics("depth", target, target) == {"abs_err": 0.0, "rel_err": 0.0}


def test_dense_metrics_refuse_bad_input() -> None:
    cases = [
        (
            lambda: M.miou(SEG_PRED, SEG_TARGET[:, :1], 3),
            r"shape mismatch: pred is \[1, 2, 3\] but target is \[1, 1, 3\]",
        ),
        (lambda: M.miou(SEG_PRED, SEG_TARGET, 2), r"target labels must be -1 \(ignored\) or in \[0, 2\)"),
        (lambda: M.miou(SEG_PRED - 1, SEG_TARGET, 3), r"pred labels must be in \[0, 3\)"),
        (lambda: M.miou(SEG_PRED, SEG_TARGET, 1), "num_classes must be an integer >= 2"),
        (lambda: M.pixel_accuracy(SEG_PRED, np.full((1, 2, 3), -1)), "no labelled pixels"),
        (lambda: M.pixel_accuracy(SEG_PRED + 0.5, SEG_TARGET), "pred must hold integer class labels"),
        (lambda: M.depth_errors(np.ones(3), np.array([1.0, np.nan, 1.0])), "target contains 1 NaN"),
        (lambda: M.depth_errors(np.ones(2), np.array([1.0, -1.0])), "target depth must be >= 0"),
        (lambda: M.depth_errors(np.ones(2), np.zeros(2)), "no pixel has a depth reading"),
        (lambda: M.normal_angle(np.ones((1, 2, 4)), np.ones((1, 2, 4))), r"normals must be shaped \[N, 3, \.\.\.\]"),
        (lambda: M.normal_angle(np.ones((1, 3, 4)), np.zeros((1, 3, 4))), "no pixel has a normal"),
        (lambda: M.dense_task_metrics("edges", np.ones(2), np.ones(2)), "unknown dense task 'edges'"),
        (lambda: M.depth_errors(np.ones(0), np.ones(0)), "pred is empty"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_dense_metrics_have_directions_for_delta_m() -> None:
    method = {"seg": {"miou": 0.6}, "depth": {"abs_err": 0.4}}
    stl = {"seg": {"miou": 0.5}, "depth": {"abs_err": 0.5}}
    # +20% mIoU (higher is better), −20% error (lower is better): both 20% better
    assert M.delta_m(method, stl, ["miou", "abs_err"]) == pytest.approx(-20.0)
    assert M.eta_hat(method, stl, ["miou", "abs_err"]) == 100.0


# ----------------------------------------------------------------------------- SMTL pieces on feature maps
def test_task_stack_runs_conv_copies_on_a_shared_image_batch() -> None:
    torch.manual_seed(0)
    copies = [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ELU()) for _ in range(3)]
    stack = TaskStack(copies, sample_dims=3)
    x = torch.randn(2, 3, 5, 6)
    out = stack(x)
    assert out.shape == (3, 2, 4, 5, 6)
    for t, net in enumerate(copies):
        torch.testing.assert_close(out[t], net(x))
    # with the task dim, copy t sees its own images
    xs = torch.randn(3, 2, 3, 5, 6)
    torch.testing.assert_close(stack(xs)[1], copies[1](xs[1]))


def test_gates_mix_feature_maps_and_pass_straight_through_gradients() -> None:
    public, private = torch.ones(2, 4, 5, 6), torch.zeros(3, 2, 4, 5, 6)
    mixed = mix_encoders(torch.tensor([0.0, 0.25, 1.0]), public, private)
    assert mixed.shape == (3, 2, 4, 5, 6) and mixed[:, 0, 0, 0, 0].tolist() == [0.0, 0.25, 1.0]
    torch.manual_seed(0)
    logit = torch.tensor([0.3, -0.3, 0.1], requires_grad=True)
    draw = straight_through_gate(logit, torch.tensor(1.0))  # τ = 1: the relaxed sample is far from saturated
    assert set(draw.tolist()) <= {0.0, 1.0}  # hard forward pass
    mix_encoders(draw, public, private).sum().backward()
    assert logit.grad is not None and (logit.grad > 0).all()  # the relaxed sample's gradient: public = 1 > private
    with torch.no_grad():
        assert straight_through_gate(logit, torch.tensor(1.0)).tolist() == [1.0, 0.0, 1.0]  # 1[α ≥ 0.5]


# ----------------------------------------------------------------------------- examples/smtl_dense.py
@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("smtl_dense_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dense_example_learns_on_a_fixed_batch(example, nyu: Path) -> None:
    # 5 train images and batch 8: every step sees the same images, so the loss must go down
    out = example.run(nyu, "nyuv2", steps=30, batch_size=8, lr=1e-2, width=8)
    losses = out["losses"]
    assert len(losses) == 30 and all(map(math.isfinite, losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert out["tasks"] == ["segmentation", "depth", "normal"] and out["alpha"].shape == (3,)
    assert ((out["alpha"] > 0) & (out["alpha"] < 1)).all() and not torch.equal(out["alpha"], torch.full((3,), 0.5))
    for split in ("val", "test"):
        seg, depth, normal = (out["metrics"][split][t] for t in out["tasks"])
        assert 0 <= seg["miou"] <= 1 and 0 <= seg["pixel_acc"] <= 1
        assert depth["abs_err"] >= 0 and depth["rel_err"] >= 0
        assert 0 <= normal["mean_angle"] <= 180


def test_dense_example_lite_gates_are_hard_at_evaluation(example, city: Path) -> None:
    data = load_cityscapes(city, num_classes=19)
    model = example.DenseSMTL(data.task_names, data.num_classes, width=4, lite=True)
    losses = example.train(model, data, steps=3, batch_size=4, lr=1e-2, seed=0)
    assert len(losses) == 3 and model.gate_logit.grad is not None  # the gates learn through the draws
    with torch.no_grad():
        assert set(model.gate().tolist()) <= {0.0, 1.0}
    results = example.evaluate(model, data, "test")
    assert set(results) == {"segmentation", "depth"} and set(results["depth"]) == {"abs_err", "rel_err"}


def test_dense_example_command_line_on_fixtures(example, tmp_path: Path, capsys) -> None:
    # the example's main() in this process: a subprocess would pay torch's import again
    example.main(
        ["--make-fixtures", str(tmp_path / "cs"), "--data", "cityscapes", "--steps", "3", "--lite", "--width", "4"]
    )
    out = capsys.readouterr().out
    assert re.search(r"^\| test\s*\|\s*segmentation \|\s*miou \|\s*[0-9.]+ \|", out, flags=re.M), out
    assert re.search(r"^α_depth = [0-9.]+ \(weight of the public encoder\)$", out, flags=re.M)
    assert (tmp_path / "cs" / "val" / "label_19" / "2.npy").is_file()
    with pytest.raises(SystemExit) as stop:
        example.main([])
    assert stop.value.code == 2 and "exactly one of --root and --make-fixtures" in capsys.readouterr().err
