"""``benchmarks/gpu.py``: its logic on the CPU (``--smoke``), and its one-line skip without CUDA."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import scaled

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
#: The benchmarks that must each give at least one timed ratio against their baseline.
REQUIRED = ("vmtl", "bayesagg", "hib", "smtl")


def run_script(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYROMTL_CACHE": str(tmp_path / "cache"), **env}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=scaled(300),
        env=environ,
        check=False,
    )


@pytest.mark.slow
def test_a_smoke_run_on_the_cpu_records_a_time_and_a_ratio_for_every_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    done = run_script("--device", "cpu", "--smoke", "--threads", "1", "--json", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["smoke"] is True
    assert doc["errors"] == [] and doc["skipped"] == []
    for name in (*REQUIRED, "weighting"):
        entries = [e for e in doc["entries"] if e["benchmark"] == name]
        assert entries, f"no entry for {name}"
        for e in entries:
            assert e["subject_ms"] > 0 and e["baseline_ms"] > 0, e
            assert math.isfinite(e["ratio"]) and e["ratio"] > 0, e
            # one round: each benchmark's ratio (a median of per-round ratios, or of medians) is the times' ratio
            assert e["ratio"] == pytest.approx(e["subject_ms"] / e["baseline_ms"], rel=1e-6), e
            assert e["peak_mb"] is None  # no CUDA allocator on the CPU
    assert {u["benchmark"] for u in doc["units"]} == {*REQUIRED, "weighting"}
    assert doc["checks"]["vmtl"]["T=4"]["loss_relative_gap"] < 1e-4
    # the table names every benchmark
    for name in REQUIRED:
        assert f"| {name} |" in done.stdout


def test_without_cuda_and_without_smoke_it_skips_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU machine too
    done = run_script("--json", str(out), tmp_path=tmp_path, CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu.py: skipped:"), done.stdout
    assert not out.exists()
    # a CPU run asked for without --smoke skips too: the measurements are for a GPU
    done = run_script("--device", "cpu", tmp_path=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().startswith("gpu.py: skipped:"), done.stdout
