"""Benchmark loaders on tiny fixture files written in the exact on-disk formats."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from pyromtl.data.loaders import (
    BENCHMARK_DOMAINS,
    BENCHMARK_FRACTIONS,
    BENCHMARKS,
    IDX_IMAGES_MAGIC,
    load_feature_benchmark,
    load_npz_domains,
    load_office_caltech,
    load_rotated_mnist,
    read_idx,
)

DIM = 8
CLASS_FOLDERS = ("apple", "bottle", "chair")


def feature(label: int, domain: int, serial: int, is_test: bool) -> np.ndarray:
    """A feature that encodes where it came from, so tests can check labels and splits."""
    return np.array([label, domain, serial, float(is_test)] + [0.5] * (DIM - 4), dtype=np.float32)


def write_feature_benchmark(
    root: Path,
    domains=("dom_a", "dom_b"),
    *,
    n_train: int = 10,
    n_test: int = 3,
    pattern: str = "{domain}_{split}.txt",
    feature_root: Path | None = None,
    list_prefix: str = "",
) -> None:
    """VMTL layout: ``<domain>_<split>.txt`` lists and ``<domain>/<class>/<i>.npy`` features."""
    feature_root = feature_root or root
    root.mkdir(parents=True, exist_ok=True)
    for d, domain in enumerate(domains):
        splits = {"train": n_train, "test": n_test} if n_test else {"train": n_train}
        for split, per_class in splits.items():
            lines = []
            for c, folder in enumerate(CLASS_FOLDERS):
                for i in range(per_class):
                    serial = 1000 * (split == "test") + 10 * c + i
                    rel = f"{domain}/{folder}/{serial:04d}.jpg"
                    npy = feature_root / rel.replace(".jpg", ".npy")
                    npy.parent.mkdir(parents=True, exist_ok=True)
                    np.save(npy, feature(c, d, serial, split == "test"))
                    lines.append(f"{list_prefix}{rel} {c}")
            list_file = root / pattern.format(domain=domain, split=split)
            list_file.parent.mkdir(parents=True, exist_ok=True)
            list_file.write_text("\n".join(lines) + "\n")


def split_x(data, split: str, t: int) -> np.ndarray:
    return data.x[t][data.splits[split][t]].numpy()


# ---------------------------------------------------------------------------- feature lists
def test_feature_benchmark_layout_labels_and_splits(tmp_path):
    write_feature_benchmark(tmp_path)
    data = load_feature_benchmark(tmp_path, ["dom_a", "dom_b"], name="tiny")
    assert data.setting == "mimo" and data.name == "tiny"
    assert data.task_names == ["dom_a", "dom_b"]
    assert data.num_classes == [3, 3] and data.input_shape == (DIM,)
    assert data.class_names == list(CLASS_FOLDERS)
    for t in range(2):
        x = data.x[t].numpy()
        assert np.array_equal(x[:, 0], data.y[t].numpy())  # every feature sits with its own label
        assert np.all(x[:, 1] == t)
        assert len(np.unique(x[:, 2] + 1e4 * x[:, 3])) == len(x)
        # test is exactly the test list; val comes out of the train list, stratified
        assert np.all(split_x(data, "test", t)[:, 3] == 1) and len(data.splits["test"][t]) == 9
        val = split_x(data, "val", t)
        assert np.all(val[:, 3] == 0) and sorted(val[:, 0]) == [0, 1, 2]
        parts = [set(data.splits[s][t].tolist()) for s in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert len(parts[0]) == 27 and len(parts[1]) == 3


def test_feature_benchmark_uses_a_val_list_when_present(tmp_path):
    write_feature_benchmark(tmp_path)
    train = tmp_path / "dom_a_train.txt"
    lines = train.read_text().splitlines()
    (tmp_path / "dom_a_val.txt").write_text("\n".join(lines[:2] + lines[-2:]) + "\n")
    train.write_text("\n".join(lines[2:-2]) + "\n")
    data = load_feature_benchmark(tmp_path, ["dom_a"])
    assert [len(data.splits[s][0]) for s in ("train", "val", "test")] == [26, 4, 9]
    assert sorted(split_x(data, "val", 0)[:, 2]) == [0, 1, 28, 29]


def test_feature_benchmark_val_depends_on_seed_only(tmp_path):
    write_feature_benchmark(tmp_path)
    val = lambda seed: load_feature_benchmark(tmp_path, ["dom_a"], seed=seed).splits["val"][0].tolist()  # noqa: E731
    assert val(0) == val(0)
    assert any(val(0) != val(s) for s in range(1, 5))


def test_feature_benchmark_fraction_is_stratified(tmp_path):
    write_feature_benchmark(tmp_path, n_train=20)
    full = load_feature_benchmark(tmp_path, ["dom_a", "dom_b"], seed=3)
    few = load_feature_benchmark(tmp_path, ["dom_a", "dom_b"], fraction=0.2, seed=3)
    assert few.fraction == 0.2
    for t in range(2):
        train = split_x(few, "train", t)
        assert np.all(np.bincount(train[:, 0].astype(int)) == 4)  # round(0.2 * 18) per class
        assert set(few.splits["train"][t].tolist()) <= set(full.splits["train"][t].tolist())
        for s in ("val", "test"):
            assert np.array_equal(few.splits[s][t], full.splits[s][t])


def test_feature_benchmark_without_test_list_carves_test(tmp_path):
    write_feature_benchmark(tmp_path, n_train=10, n_test=0)
    data = load_feature_benchmark(tmp_path, ["dom_a"], test_fraction=0.2, val_fraction=0.1)
    sizes = [len(data.splits[s][0]) for s in ("train", "val", "test")]
    assert sizes == [21, 3, 6]
    assert sorted(set().union(*(data.splits[s][0].tolist() for s in ("train", "val", "test")))) == list(range(30))
    assert np.all(np.bincount(split_x(data, "test", 0)[:, 0].astype(int)) == 2)


def test_single_list_pattern_and_small_lists_still_get_val(tmp_path):
    write_feature_benchmark(tmp_path, n_train=3, n_test=0, pattern="{domain}_list.txt")
    data = load_feature_benchmark(tmp_path, ["dom_a", "dom_b"], split_pattern="{domain}_list.txt", val_fraction=0.2)
    for t in range(2):
        assert len(data.splits["val"][t]) >= 1 and len(data.splits["test"][t]) >= 1
        assert set(split_x(data, "train", t)[:, 0]) == {0, 1, 2}  # every class keeps a training sample


def test_feature_root_and_strip_prefix(tmp_path):
    lists, feats = tmp_path / "split", tmp_path / "features"
    write_feature_benchmark(
        lists, feature_root=feats, pattern="{domain}/{split}_5.txt", list_prefix="/data/office-home/"
    )
    data = load_feature_benchmark(
        lists, ["dom_a"], feature_root=feats, split_pattern="{domain}/{split}_5.txt", strip_prefix="office-home/"
    )
    assert np.array_equal(data.x[0][:, 0].numpy(), data.y[0].numpy())


def test_benchmark_wrappers_and_registry(tmp_path):
    domains, ncls = BENCHMARK_DOMAINS["office-caltech"]
    write_feature_benchmark(tmp_path, domains, n_train=5, n_test=2)
    data = BENCHMARKS["office-caltech"](str(tmp_path), 0)
    assert data.task_names == list(domains) and data.num_classes == [ncls] * 4 == [10] * 4
    assert data.name == "office-caltech" and data.fraction is None
    sub = load_office_caltech(tmp_path, domains=["dslr", "amazon"], fraction=0.5)
    assert sub.task_names == ["dslr", "amazon"] and sub.fraction == 0.5
    assert set(BENCHMARKS) == {"office-home", "office-caltech", "imageclef", "domainnet", "npz", "rotated-mnist"}
    assert BENCHMARK_FRACTIONS["office-home"] == (0.05, 0.1, 0.2)
    assert BENCHMARK_FRACTIONS["domainnet"] == (0.01, 0.02, 0.04)
    assert BENCHMARK_DOMAINS["office-home"] == (("Art", "Clipart", "Product", "Real_World"), 65)
    assert BENCHMARK_DOMAINS["domainnet"][1] == 345 and len(BENCHMARK_DOMAINS["domainnet"][0]) == 6


def test_feature_errors_name_the_file(tmp_path):
    write_feature_benchmark(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"dom_c_train\.txt.*expected lines"):
        load_feature_benchmark(tmp_path, ["dom_a", "dom_c"])
    with pytest.raises(FileNotFoundError, match="benchmark root"):
        load_feature_benchmark(tmp_path / "nope", ["dom_a"])

    train = tmp_path / "dom_a_train.txt"
    good = train.read_text()
    lines = good.splitlines()
    train.write_text("\n".join(lines[:2] + ["dom_a/apple/0000.jpg"] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=r"dom_a_train\.txt:3: expected"):
        load_feature_benchmark(tmp_path, ["dom_a"])
    train.write_text(good.replace("0000.jpg 0", "0000.jpg zero"))
    with pytest.raises(ValueError, match=r"dom_a_train\.txt:1: label 'zero' is not an integer"):
        load_feature_benchmark(tmp_path, ["dom_a"])
    train.write_text(good)
    with pytest.raises(ValueError, match=r"dom_a_train\.txt:\d+: label 2 out of range"):
        load_feature_benchmark(tmp_path, ["dom_a"], num_classes=2)

    np.save(tmp_path / "dom_b" / "bottle" / "0011.npy", np.zeros(DIM + 1, dtype=np.float32))
    with pytest.raises(ValueError, match=r"dom_b/bottle/0011\.npy: feature vector has 9 values, expected 8"):
        load_feature_benchmark(tmp_path, ["dom_a", "dom_b"])
    (tmp_path / "dom_b" / "bottle" / "0011.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"0011\.npy: feature file .*dom_b_train\.txt:12"):
        load_feature_benchmark(tmp_path, ["dom_b"])
    np.save(tmp_path / "dom_b" / "bottle" / "0011.npy", np.full(DIM, np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match=r"0011\.npy: .*NaN"):
        load_feature_benchmark(tmp_path, ["dom_b"])


# ---------------------------------------------------------------------------- .npz domains
def test_npz_domains(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)
    x = np.c_[y, rng.normal(size=(40, 5))]
    split = np.array(["train"] * 20 + ["val"] * 8 + ["test"] * 12)[rng.permutation(40)]
    np.savez(tmp_path / "b_second.npz", features=x, labels=y, split=split)
    np.savez(tmp_path / "a_first.npz", features=x[:30], labels=y[:30])  # no split: carved
    data = load_npz_domains(tmp_path, seed=1)
    assert data.task_names == ["a_first", "b_second"] and data.num_classes == [4, 4]
    for t in range(2):
        assert np.array_equal(data.x[t][:, 0].numpy(), data.y[t].numpy())
    for s in ("train", "val", "test"):
        assert np.array_equal(data.splits[s][1].numpy(), np.flatnonzero(split == s))
    assert [len(data.splits[s][0]) for s in ("train", "val", "test")] == [21, 3, 6]

    np.savez(tmp_path / "b_second.npz", features=x, labels=y, split=(split == "test").astype(int) * 2)
    carved = load_npz_domains(tmp_path, domains=["b_second"])
    assert np.array_equal(carved.splits["test"][0].numpy(), np.flatnonzero(split == "test"))
    assert len(carved.splits["val"][0]) == 3  # no val in the file: 10% of train

    few = load_npz_domains(tmp_path, fraction=0.5, num_classes=6)
    assert few.num_classes == [6, 6] and few.fraction == 0.5


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no <domain>.npz"):
        load_npz_domains(tmp_path)
    np.savez(tmp_path / "d.npz", features=np.zeros((4, 2)), target=np.zeros(4))
    with pytest.raises(ValueError, match=r"d\.npz: missing arrays \['labels'\]"):
        load_npz_domains(tmp_path)
    np.savez(tmp_path / "d.npz", features=np.zeros((4, 2)), labels=np.arange(4), split=np.array([0, 1, 5, 2]))
    with pytest.raises(ValueError, match=r"d\.npz: 'split' value 5"):
        load_npz_domains(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"e\.npz: file for domain 'e'"):
        load_npz_domains(tmp_path, domains=["e"])


# ---------------------------------------------------------------------------- Rotated MNIST
def digit_image(digit: int) -> np.ndarray:
    """An asymmetric 28x28 uint8 pattern per digit (an L and a digit-dependent dot)."""
    img = np.zeros((28, 28), dtype=np.uint8)
    img[5:20, 8:11] = 255
    img[17:20, 8:20] = 200
    img[7 + digit, 18:21] = 120
    return img


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def write_mnist(root: Path, gz: bool = False) -> None:
    """20 images, two identical copies of each digit's pattern."""
    root.mkdir(parents=True, exist_ok=True)
    labels = np.tile(np.arange(10), 2)
    images = np.stack([digit_image(d) for d in labels])
    ext = ".gz" if gz else ""
    write_idx(root / f"train-images-idx3-ubyte{ext}", images, 2051)
    write_idx(root / f"train-labels-idx1-ubyte{ext}", labels, 2049)


def test_read_idx_plain_and_gzipped(tmp_path):
    write_mnist(tmp_path / "plain")
    write_mnist(tmp_path / "gz", gz=True)
    a = read_idx(tmp_path / "plain" / "train-images-idx3-ubyte", IDX_IMAGES_MAGIC)
    b = read_idx(tmp_path / "gz" / "train-images-idx3-ubyte.gz", IDX_IMAGES_MAGIC)
    assert a.shape == (20, 28, 28) and np.array_equal(a, b) and np.array_equal(a[3], digit_image(3))


def test_rotated_mnist_targets(tmp_path):
    write_mnist(tmp_path)
    data = load_rotated_mnist(tmp_path, samples_per_task=2, val_fraction=0.0, test_fraction=0.0)
    assert data.task_names == [f"digit-{d}" for d in range(10)]
    assert data.task_types == ["regression"] * 10 and data.input_shape == (784,)
    for t in range(10):
        x = data.x[t].numpy()
        assert x.min() >= 0.0 and x.max() <= 1.0
        mean, std = data.target_stats[t]
        angles = data.y[t].numpy() * std + mean
        assert np.allclose(angles, np.round(angles / 10) * 10, atol=1e-4)
        assert angles.min() >= 0 and angles.max() <= 90
        assert sorted(np.round(angles)) == [0, 10]  # two samples: the first two angles, once each


def test_rotated_mnist_rotation_happened(tmp_path):
    write_mnist(tmp_path, gz=True)
    data = load_rotated_mnist(tmp_path, samples_per_task=2, angles=(0, 90), val_fraction=0.0, test_fraction=0.0)
    for t in range(10):
        mean, std = data.target_stats[t]
        for x, y in zip(data.x[t].numpy(), data.y[t].numpy()):
            img = x.reshape(28, 28)
            want = digit_image(t) / 255.0
            if round(float(y * std + mean)) == 90:
                want = np.rot90(want)
            assert np.abs(img - want).max() < 1e-3
            assert np.abs(img - np.rot90(digit_image(t) / 255.0, 2)).max() > 0.1  # the pattern is asymmetric


def test_rotated_mnist_splits_are_stratified_and_seeded(tmp_path):
    write_mnist(tmp_path)
    options = dict(samples_per_task=2, angles=(0, 30), val_fraction=0.0, test_fraction=0.5)
    data = load_rotated_mnist(tmp_path, 0, **options)
    # one sample per angle: each angle group keeps its only sample in train
    assert [len(i) for i in data.splits["test"]] == [0] * 10
    data = load_rotated_mnist(tmp_path, 0, **{**options, "angles": (30,)})
    assert [len(i) for i in data.splits["test"]] == [1] * 10
    again = BENCHMARKS["rotated-mnist"](tmp_path, 0, **{**options, "angles": (30,)})
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(data.x, again.x))
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(data.splits["test"], again.splits["test"]))


def test_mnist_errors(tmp_path):
    write_mnist(tmp_path)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: wrong magic number 2049 .*expected 2051"):
        read_idx(tmp_path / "train-labels-idx1-ubyte", IDX_IMAGES_MAGIC)
    # swap the files: the loader reports the images file's wrong magic number
    images, labels = tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte"
    img_bytes, lab_bytes = images.read_bytes(), labels.read_bytes()
    images.write_bytes(lab_bytes)
    labels.write_bytes(img_bytes)
    with pytest.raises(ValueError, match="wrong magic number"):
        load_rotated_mnist(tmp_path, samples_per_task=2)
    images.write_bytes(img_bytes[:-5])
    with pytest.raises(ValueError, match="header says"):
        read_idx(images, IDX_IMAGES_MAGIC)
    images.write_bytes(img_bytes)
    labels.write_bytes(lab_bytes)
    with pytest.raises(ValueError, match="fewer than samples_per_task=3"):
        load_rotated_mnist(tmp_path, samples_per_task=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_rotated_mnist(tmp_path / "empty")
