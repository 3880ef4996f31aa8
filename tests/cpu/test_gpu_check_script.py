"""The non-GPU parts of bench/gpu_check.sh and bench/bench_gpu.py: the script parses, its dry run
lists the steps and the benchmark plan, bad benchmark arguments are caught before a lease is
spent, and the CSV / table helpers work."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "bench"))

import bench_gpu  # noqa: E402


def dry_run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, **env)
    return subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=full, cwd=REPO, timeout=120
    )


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_dry_run_lists_every_step_within_budget(tmp_path):
    out = dry_run(tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "pip install --no-build-isolation --no-deps -e ." in text
    assert "pytest" in text and "tests/gpu" in text and "--timeout=" in text
    assert "bench/bench_gpu.py --out" in text
    for name in ("resnet50", "vgg16", "inception_v3", "densenet121", "hamming", "torch-compile@1"):
        assert name in text
    limits = [int(part.split("s)")[0]) for part in text.split("(limit ")[1:]]
    assert len(limits) == 3 and all(0 < x <= 300 for x in limits)
    # Nothing ran: every step reports "dry-run". The elapsed seconds include planning the benchmark
    # (an import of torch), so they are only bounded, not zero.
    summary = re.search(r"== summary \((\d+)s of 470s\)\n((?:  .*\n)+)", text)
    assert summary is not None, text
    assert int(summary.group(1)) < 120
    steps = dict(line.strip().split(": ", 1) for line in summary.group(2).splitlines())
    assert steps == {"install": "dry-run", "tests": "dry-run", "bench": "dry-run"}
    assert not any((tmp_path / "out").iterdir())  # a dry run writes nothing


def test_dry_run_catches_bad_benchmark_arguments(tmp_path):
    out = dry_run(tmp_path, CBIR_BENCH_ARGS="--networks resnet5O")
    assert "bench plan: FAILED" in out.stdout
    assert "unknown networks" in out.stderr


def test_recorder_ratios_and_table(tmp_path):
    path = tmp_path / "gpu.csv"
    rec = bench_gpu.Recorder(path, "NVIDIA H100", "test")
    rec.add(subject="resnet50", batch=1, impl="torch-eager", precision="fp16", ms=2.0, items_per_s=500.0)
    rec.add(subject="resnet50", batch=1, impl="ours-triton", precision="fp16", ms=1.0, items_per_s=1000.0)
    rec.add(
        subject="resnet50",
        batch=1,
        impl="torch-compile",
        precision="fp16",
        ms="",
        items_per_s="",
        note="max-autotune compile did not finish in 150 s",
    )
    bench_gpu.fill_ratios(rec.rows)
    assert [r["vs_eager"] for r in rec.rows] == [1.0, 2.0, ""]
    rows = list(csv.DictReader(path.open()))
    assert [r["impl"] for r in rows] == ["torch-eager", "ours-triton", "torch-compile"]
    assert rows[0]["card"] == "NVIDIA H100" and rows[1]["ms"] == "1.0"
    text = bench_gpu.table(rec.rows)
    assert text.splitlines()[0].startswith("subject") and "did not finish" in text
    assert len(text.splitlines()) == 5


def test_bench_without_gpu_says_so():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--networks", "resnet50"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 2 and "no CUDA GPU" in out.stderr
