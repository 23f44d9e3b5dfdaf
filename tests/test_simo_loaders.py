"""SIMO benchmark loaders on tiny fixture files written in each benchmark's on-disk format."""

from __future__ import annotations

import csv
import os
import pickle
import sys

import numpy as np
import pytest
from PIL import Image

from pyromtl import datasets
from pyromtl.data.chestxray import FINDINGS, load_chestxray14
from pyromtl.data.cifar import load_cifar_mtl
from pyromtl.data.faces import load_mtfl, load_utkface
from pyromtl.data.mnist import load_grouped_mnist, load_multi_mnist
from pyromtl.data.qm9 import QM9_TARGETS, load_qm9, molecule_features
from pyromtl.data.safe_pickle import load_pickle
from tests.test_loaders import digit_image, write_idx

COARSE = [f"coarse_{k:02d}" for k in range(20)]


def sets(data) -> list[set[int]]:
    return [set(data.splits[s][0].tolist()) for s in ("train", "val", "test")]


def assert_partition(data, n: int) -> None:
    train, val, test = sets(data)
    assert not (train & val or train & test or val & test) and len(train | val | test) == n
    assert all(
        data.splits[s][t].tolist() == data.splits[s][0].tolist()
        for s in ("train", "val", "test")
        for t in range(data.num_tasks)
    )  # SIMO: one split


# ------------------------------------------------------------------------------- CIFAR-100
def write_cifar(root, protocol: int, per_class=(2, 1)) -> None:
    """CIFAR-100 python files: pickled dicts with bytes keys; pixel 0 encodes the coarse label."""
    root.mkdir(parents=True, exist_ok=True)
    for name, n in zip(("train", "test"), per_class):
        coarse = [k for k in range(20) for _ in range(n)]
        data = np.zeros((len(coarse), 3072), dtype=np.uint8)
        data[:, 0] = np.asarray(coarse) * 10
        table = {
            b"batch_label": name.encode(),
            b"coarse_labels": coarse,
            b"fine_labels": [5 * c for c in coarse],
            b"filenames": [f"img{i}.png".encode() for i in range(len(coarse))],
            b"data": data,
        }
        with open(root / name, "wb") as fh:
            pickle.dump(table, fh, protocol=protocol)
    with open(root / "meta", "wb") as fh:
        pickle.dump(
            {
                b"coarse_label_names": [c.encode() for c in COARSE],
                b"fine_label_names": [f"f{k}".encode() for k in range(100)],
            },
            fh,
            protocol=protocol,
        )


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_mtl_is_20_one_vs_rest_tasks_over_the_coarse_labels(tmp_path, protocol):
    write_cifar(tmp_path / "cifar-100-python", protocol)
    data = load_cifar_mtl(tmp_path, seed=1)
    assert data.setting == "simo" and data.task_names == COARSE and data.task_types == ["binary"] * 20
    assert data.input_shape == (3, 32, 32)
    coarse = np.round(data.x[:, 0, 0, 0].numpy() * 255 / 10).astype(int)  # every image with its own labels
    y = np.stack([t.numpy() for t in data.y])
    assert np.array_equal(y.argmax(0), coarse) and (y.sum(0) == 1).all()
    assert_partition(data, 60)
    _train, val, test = sets(data)
    assert test == set(range(40, 60)) and len(val) == 4  # the official test file; 10% of train for val


def test_cifar_refuses_a_crafted_pickle_without_running_it(tmp_path):
    write_cifar(tmp_path, 2)
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with open(tmp_path / "train", "wb") as fh:
        pickle.dump({b"data": Exploit()}, fh)
    with pytest.raises(ValueError, match=r"train: cannot read this pickle safely \(refused to load .*system"):
        load_cifar_mtl(tmp_path)
    assert not marker.exists()
    with open(tmp_path / "meta", "wb") as fh:  # a plain callable from the standard library is refused too
        pickle.dump({b"coarse_label_names": print}, fh)
    with pytest.raises(ValueError, match=r"meta: .*refused to load builtins\.print"):
        load_pickle(tmp_path / "meta")


def test_cifar_errors_name_the_file(tmp_path):
    write_cifar(tmp_path, 2)
    (tmp_path / "meta").unlink()
    with pytest.raises(ValueError, match=r"CIFAR-100 python files \['meta'\] not found"):
        load_cifar_mtl(tmp_path)
    write_cifar(tmp_path, 2)
    with open(tmp_path / "test", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 10), dtype=np.uint8), b"coarse_labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match=r"test: 'data' must be uint8 \[N, 3072\]"):
        load_cifar_mtl(tmp_path)
    with open(tmp_path / "test", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), dtype=np.uint8)}, fh)
    with pytest.raises(ValueError, match=r"test: missing field 'coarse_labels'"):
        load_cifar_mtl(tmp_path)
    (tmp_path / "test").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="test: cannot read this pickle safely"):
        load_cifar_mtl(tmp_path)


# ------------------------------------------------------------------------------- UTKFace
def write_jpeg(path, value: int, size=(20, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path, quality=95)


def test_utkface_reads_age_gender_race_from_names_and_skips_malformed(tmp_path):
    rows = [(age, g, r) for age in (10, 30, 50, 70) for g in (0, 1) for r in range(5)]
    for i, (age, g, r) in enumerate(rows):
        write_jpeg(tmp_path / "UTKFace" / f"{age}_{g}_{r}_2017011617452{i:04d}.jpg.chip.jpg", 2 * age)
    write_jpeg(tmp_path / "UTKFace" / "39_1_20170116174525125.jpg.chip.jpg", 0)  # no race field
    write_jpeg(tmp_path / "UTKFace" / "61_3_20170109150557335.jpg", 0)  # gender 3
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\)"):
        data = load_utkface(tmp_path, size=8, seed=2)
    assert "skipped 2" in data.description
    assert data.task_names == ["age", "gender", "race"] and data.input_shape == (3, 8, 8)
    assert data.task_types == ["regression", "binary", "classification"] and data.num_classes[2] == 5
    mean, std = data.target_stats[0]
    age = data.y[0].numpy() * std + mean
    assert np.allclose(data.x.numpy().mean(axis=(1, 2, 3)), 2 * age / 255, atol=3 / 255)  # image and name agree
    found = sorted(zip(np.round(age).astype(int), data.y[1].long().tolist(), data.y[2].long().tolist()))
    assert found == sorted(rows)
    assert_partition(data, len(rows))
    assert len(sets(data)[2]) == 8  # 20% of 40, stratified by race
    (tmp_path / "other").mkdir()
    write_jpeg(tmp_path / "other" / "face.jpg", 0)
    with pytest.raises(ValueError, match=r"no UTKFace images named .*e\.g\. 'face\.jpg'"):
        load_utkface(tmp_path / "other")


# ------------------------------------------------------------------------------- ChestX-ray14
HEADER = [
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
    "",
]


def write_chestxray(root, findings: list[str], csv_name="Data_Entry_2017.csv") -> list[str]:
    """Two images per patient in the release's images_001/images folder; pixel value = row number."""
    names = []
    rows = []
    for i, found in enumerate(findings):
        patient = i // 2 + 1
        name = f"{patient:08d}_{i % 2:03d}.png"
        folder = root / "images_001" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("L", (16, 16), 10 * i).save(folder / name)
        names.append(name)
        rows.append([name, found, i % 2, patient, 50, "M", "PA", 2500, 2048, 0.14, 0.14, ""])
    with open(root / csv_name, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return names


def test_chestxray14_findings_and_patient_wise_splits(tmp_path):
    findings = ["Cardiomegaly|Effusion", "No Finding", "Hernia", "Mass|Nodule|Pneumonia"] * 5
    write_chestxray(tmp_path, findings, csv_name="Data_Entry_2017_v2020.csv")
    data = load_chestxray14(tmp_path, size=8, val_fraction=0.2, test_fraction=0.2, seed=3)
    assert data.task_names == list(FINDINGS) and data.task_types == ["binary"] * 14
    assert data.input_shape == (1, 8, 8)
    row = np.round(data.x[:, 0, 0, 0].numpy() * 255 / 10).astype(int)
    assert np.array_equal(row, np.arange(20))
    y = np.stack([t.numpy() for t in data.y], axis=1)
    for i, found in enumerate(findings):
        assert {FINDINGS[k] for k in np.flatnonzero(y[i])} == set(found.split("|")) - {"No Finding"}
    assert_partition(data, 20)
    patient = np.arange(20) // 2
    parts = [set(patient[list(p)].tolist()) for p in sets(data)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])  # no patient in two splits
    assert len(parts[2]) == 2 and len(parts[1]) == 2  # 20% of 10 patients, then 20% of the other 8


def test_chestxray14_official_lists_and_errors(tmp_path):
    names = write_chestxray(tmp_path, ["No Finding", "Edema"] * 4)
    (tmp_path / "train_val_list.txt").write_text("\n".join(names[:6]) + "\n")
    (tmp_path / "test_list.txt").write_text("\n".join(names[6:]) + "\n")
    data = load_chestxray14(tmp_path, size=4, val_fraction=0.34)
    train, val, test = sets(data)
    assert test == {6, 7} and len(val) == 2 and train | val == set(range(6))
    (tmp_path / "test_list.txt").unlink()
    with pytest.raises(ValueError, match="found only one of"):
        load_chestxray14(tmp_path)
    (tmp_path / "train_val_list.txt").unlink()
    (tmp_path / "images_001" / "images" / names[3]).unlink()
    with pytest.raises(ValueError, match=rf"1 image\(s\) listed in Data_Entry_2017\.csv not found.*{names[3]}"):
        load_chestxray14(tmp_path)
    write_chestxray(tmp_path, ["No Finding", "Flu"])
    with pytest.raises(ValueError, match=r"Data_Entry_2017\.csv:3: unknown finding \['Flu'\]"):
        load_chestxray14(tmp_path)
    (tmp_path / "Data_Entry_2017.csv").unlink()
    with pytest.raises(ValueError, match="label file not found"):
        load_chestxray14(tmp_path)


# ------------------------------------------------------------------------------- QM9
def molecule(rng, n: int):
    z = rng.choice([1, 6, 7, 8, 9], size=n)
    return z, rng.normal(size=(n, 3)) * 1.5


def test_molecule_features_are_invariant_to_atom_order_and_rigid_motion():
    rng = np.random.default_rng(0)
    z, pos = molecule(rng, 7)
    f = molecule_features(z, pos)
    q = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    perm = rng.permutation(7)
    assert f.shape == (34,) and np.allclose(f, molecule_features(z[perm], pos[perm] @ q.T + 2.0))
    assert np.array_equal(f[:5], [(z == e).sum() for e in (1, 6, 7, 8, 9)])
    assert not np.allclose(f, molecule_features(z, pos * 1.3))  # geometry matters


def test_qm9_without_torch_geometric_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_geometric", None)
    monkeypatch.setitem(sys.modules, "torch_geometric.data", None)
    with pytest.raises(ValueError, match=r"needs torch_geometric: pip install 'pyromtl\[qm9\]'"):
        load_qm9(tmp_path)


def test_qm9_reads_torch_geometric_processed_file(tmp_path):
    pytest.importorskip("torch_geometric")
    import torch
    from torch_geometric.data import Data, InMemoryDataset

    rng = np.random.default_rng(1)
    mols, ys = [], []
    for i in range(12):
        z, pos = molecule(rng, 3 + i % 5)
        y = rng.normal(size=(1, 19)).astype(np.float32)
        ys.append(y[0])
        mols.append(Data(z=torch.as_tensor(z), pos=torch.as_tensor(pos, dtype=torch.float32), y=torch.as_tensor(y)))
    (tmp_path / "processed").mkdir()
    InMemoryDataset.save(mols, str(tmp_path / "processed" / "data_v3.pt"))
    data = load_qm9(tmp_path, targets=["homo", "gap", "Cv"], val_fraction=0.25, test_fraction=0.25)
    assert data.task_names == ["homo", "gap", "Cv"] and data.input_shape == (34,)
    for t, name in enumerate(data.task_names):
        mean, std = data.target_stats[t]
        assert np.allclose(data.y[t].numpy() * std + mean, np.array(ys)[:, QM9_TARGETS.index(name)], atol=1e-5)
    assert np.array_equal(data.x[:, :5].sum(1).numpy(), [3 + i % 5 for i in range(12)])
    assert_partition(data, 12)
    with pytest.raises(ValueError, match=r"unknown QM9 targets \['energy'\]"):
        load_qm9(tmp_path, targets=["energy"])
    with pytest.raises(ValueError, match=r"processed/data_v3\.pt: torch_geometric's processed QM9 file not found"):
        load_qm9(tmp_path / "processed")


# ------------------------------------------------------------------------------- MNIST
def write_full_mnist(root) -> None:
    """train: 20 images (digits 0-9 twice); t10k: 10 images; each digit's own pattern."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, reps in (("train", 2), ("t10k", 1)):
        labels = np.tile(np.arange(10), reps)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", np.stack([digit_image(d) for d in labels]), 2051)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)


def test_grouped_mnist_tasks_and_official_test_split(tmp_path):
    write_full_mnist(tmp_path)
    data = load_grouped_mnist(tmp_path, group_size=4, num_clusters=2, tasks_per_cluster=2)
    assert data.num_tasks == 4 and data.input_shape == (784,) and data.name == "grouped-mnist"
    assert np.array_equal(data.relatedness, np.kron(np.eye(2), np.ones((2, 2))))
    digit = np.concatenate([np.tile(np.arange(10), 2), np.arange(10)])
    for t, name in enumerate(data.task_names):
        digits = [int(c) for c in name[1:]]
        expected = [digits.index(d) if d in digits else 4 for d in digit]
        assert data.y[t].long().tolist() == expected
    assert sets(data)[2] == set(range(20, 30)) and len(sets(data)[1]) == 2
    assert datasets.load("grouped-mnist", root=tmp_path).task_names == [
        "d012",
        "d1234",
        "d024",
        "d567",
        "d6789",
        "d579",
    ]


def test_multi_mnist_overlays_pairs_within_each_split(tmp_path):
    write_full_mnist(tmp_path)
    data = load_multi_mnist(tmp_path, val_fraction=0.2)
    assert data.task_names == ["first", "second"] and data.input_shape == (1, 36, 36)
    first, second = (t.long().numpy() for t in data.y)
    assert np.array_equal(first, np.concatenate([np.tile(np.arange(10), 2), np.arange(10)]))
    assert sorted(second[20:]) == list(range(10)) and sorted(second[:20]) == sorted(first[:20])
    frames = data.x[:, 0].numpy()
    # the top-left 4x4 corner is the first digit's alone (the second starts at 4 or more)
    for i in range(30):
        pattern = digit_image(first[i]) / 255.0
        assert any(
            np.allclose(frames[i, :4, :4], np.pad(pattern, ((r, 8 - r), (c, 8 - c)))[:4, :4])
            for r in range(5)
            for c in range(5)
        )
    assert sets(data)[2] == set(range(20, 30)) and len(sets(data)[1]) == 4


# ------------------------------------------------------------------------------- MTFL
def write_mtfl(root) -> list[list]:
    """training.txt (8 faces) and testing.txt (2), Windows paths, images 50x40 pixels."""
    rows = []
    for split, folder, n in (("training", "lfw_5590", 8), ("testing", "net_7876", 2)):
        lines = []
        for i in range(n):
            rel = f"{folder}\\face_{i:04d}.jpg"
            write_jpeg(root / folder / f"face_{i:04d}.jpg", 20 * i, size=(50, 40))
            xs, ys = [10 + i, 30, 25, 15, 35], [12, 12, 20, 30 + i % 3, 30]
            attrs = [1 + i % 2, 1 + (i // 2) % 2, 2, 1 + i % 5]
            rows.append([xs, ys, attrs])
            lines.append(" " + " ".join([rel, *map(str, xs + ys), *map(str, attrs)]))
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return rows


def test_mtfl_attributes_landmarks_and_test_file(tmp_path):
    rows = write_mtfl(tmp_path)
    data = load_mtfl(tmp_path, size=8, landmarks=True, val_fraction=0.25)
    assert data.task_names[:4] == ["male", "smiling", "glasses", "pose"] and data.num_tasks == 14
    assert data.task_types == ["binary"] * 3 + ["classification"] + ["regression"] * 10
    attrs = np.array([r[2] for r in rows])
    assert data.y[0].long().tolist() == (attrs[:, 0] == 1).astype(int).tolist()
    assert data.y[1].long().tolist() == (attrs[:, 1] == 1).astype(int).tolist()
    assert set(data.y[2].tolist()) == {0.0} and data.y[3].long().tolist() == (attrs[:, 3] - 1).tolist()
    k = data.task_names.index("left_eye_x")
    mean, std = data.target_stats[k]
    assert np.allclose(data.y[k].numpy() * std + mean, [(10 + i % 8) / 50 for i in range(10)], atol=1e-5)
    k = data.task_names.index("mouth_left_y")
    mean, std = data.target_stats[k]
    assert np.allclose(data.y[k].numpy() * std + mean, [(30 + i % 3) / 40 for i in range(8)] + [30 / 40, 31 / 40])
    assert sets(data)[2] == {8, 9} and len(sets(data)[1]) == 2
    assert load_mtfl(tmp_path, size=8).num_tasks == 4


def test_mtfl_errors_name_the_file(tmp_path):
    write_mtfl(tmp_path)
    (tmp_path / "testing.txt").unlink()
    with pytest.raises(ValueError, match=r"testing\.txt: MTFL annotation file not found"):
        load_mtfl(tmp_path)
    write_mtfl(tmp_path)
    with open(tmp_path / "training.txt", "a") as fh:
        fh.write("lfw_5590\\x.jpg 1 2 3\n")
    with pytest.raises(ValueError, match=r"training\.txt:9: expected an image path, 10 landmark .* got 4"):
        load_mtfl(tmp_path)
    write_mtfl(tmp_path)
    (tmp_path / "net_7876" / "face_0001.jpg").unlink()
    with pytest.raises(ValueError, match=r"face_0001\.jpg: image listed in an MTFL annotation file not found"):
        load_mtfl(tmp_path)


def test_simo_benchmarks_are_registered_and_need_a_root():
    for name in ("cifar-mtl", "utkface", "chestxray14", "qm9", "grouped-mnist", "multi-mnist", "mtfl"):
        assert name in datasets.available() and datasets.describe(name).startswith("SIMO")
        with pytest.raises(ValueError, match=f"'{name}' reads its files from a folder"):
            datasets.load(name)
