"""The on-disk cache of built dataset arrays: keyed, atomic, pickle-free, and rebuilt when damaged."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from pyromtl import datasets
from pyromtl.data import cache, digit_arrays, embedded
from tests.conftest import scaled


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("PYROMTL_CACHE", str(folder))
    return folder


def counting_builder(calls: list):
    def build():
        calls.append(1)
        return {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "name": np.array("abc")}

    return build


def test_second_call_reads_the_entry_instead_of_building(cache_dir):
    calls = []
    first = cache.cached_arrays("toy", counting_builder(calls), version="1", options={"k": 2})
    again = cache.cached_arrays("toy", counting_builder(calls), version="1", options={"k": 2})
    assert len(calls) == 1 and set(again) == {"x", "name"}
    assert np.array_equal(first["x"], again["x"]) and again["x"].dtype == np.float32 and str(again["name"]) == "abc"
    assert [p.name for p in cache_dir.iterdir()] == [cache.cache_path("toy", "1", {"k": 2}).name]
    # a new version or new options are new entries
    cache.cached_arrays("toy", counting_builder(calls), version="2", options={"k": 2})
    cache.cached_arrays("toy", counting_builder(calls), version="1", options={"k": 3})
    assert len(calls) == 3 and len(list(cache_dir.iterdir())) == 3


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickled", "other key"])
def test_a_damaged_entry_is_rebuilt_not_an_error(cache_dir, damage):
    calls = []
    cache.cached_arrays("toy", counting_builder(calls), version="1")
    path = cache.cache_path("toy", "1", {})
    if damage == "garbage":
        path.write_bytes(b"not a zip file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "pickled":  # an object array would need pickle, which is never allowed
        with open(path, "wb") as fh:
            np.savez(fh, x=np.array([{"a": 1}], dtype=object), __key__=np.asarray(cache.cache_key("toy", "1", {})))
    else:
        with open(path, "wb") as fh:
            np.savez(fh, x=np.zeros(1), __key__=np.asarray("something else"))
    out = cache.cached_arrays("toy", counting_builder(calls), version="1")
    assert len(calls) == 2 and np.array_equal(out["x"], np.arange(6).reshape(2, 3))
    assert cache.cached_arrays("toy", counting_builder(calls), version="1") and len(calls) == 2  # rewritten


def test_writes_leave_no_temporary_files_and_an_unwritable_folder_only_warns(tmp_path, monkeypatch, cache_dir):
    cache.cached_arrays("toy", counting_builder([]), version="1")
    assert [p.suffix for p in cache_dir.iterdir()] == [".npz"]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PYROMTL_CACHE", str(blocker / "sub"))
    calls = []
    with pytest.warns(UserWarning, match="cannot write the dataset cache"):
        out = cache.cached_arrays("toy", counting_builder(calls), version="1")
    assert len(calls) == 1 and out["x"].shape == (2, 3)


def test_cache_folder_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("PYROMTL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "pyromtl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "pyromtl"
    monkeypatch.setenv("PYROMTL_CACHE", "off")
    calls = []
    cache.cached_arrays("toy", counting_builder(calls), version="1")
    cache.cached_arrays("toy", counting_builder(calls), version="1")
    assert len(calls) == 2 and not (tmp_path / "home").exists()


@pytest.mark.parametrize("kind", ["domains", "overlay"])
def test_cached_digits_arrays_equal_a_fresh_build_exactly(cache_dir, kind):
    fresh = getattr(digit_arrays, kind)()
    embedded._arrays(kind)  # builds and writes
    cached = embedded._arrays(kind)  # reads
    assert set(cached) == set(fresh)
    for k in fresh:
        assert cached[k].dtype == fresh[k].dtype and np.array_equal(cached[k], fresh[k])


def test_a_cached_load_equals_a_fresh_one(cache_dir, monkeypatch):
    embedded._arrays("conflict")
    assert list(cache_dir.glob("digits-conflict-*.npz"))
    cached = datasets._build("digits-conflict", {"seed": 2})
    monkeypatch.setenv("PYROMTL_CACHE", "off")
    fresh = datasets._build("digits-conflict", {"seed": 2})
    assert np.array_equal(cached.x.numpy(), fresh.x.numpy())
    for t in range(fresh.num_tasks):
        assert np.array_equal(cached.y[t].numpy(), fresh.y[t].numpy())
        for s in ("train", "val", "test"):
            assert np.array_equal(cached.splits[s][t].numpy(), fresh.splits[s][t].numpy())


def test_a_warm_cache_loads_without_importing_scikit_learn(cache_dir):
    embedded._arrays("domains")
    code = (
        "import sys, pyromtl.datasets as d; d.load('digits-domains', fraction=0.05); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'pyromtl'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYROMTL_CACHE": str(cache_dir)},
        timeout=scaled(120),
    )
    assert out.stdout.split("\n")[-2] == "['pyromtl']"
