"""The CUDA C++ Hamming kernel compiles for sm_80 and sm_90 (where nvcc exists), and its C entry
points load and check their arguments without a GPU."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import pytest

from cbir_engine.index.cuda_backend import SOURCE, build_library, find_nvcc, load_library

NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compiles(tmp_path, arch):
    out = tmp_path / f"hamming_{arch}.o"
    result = subprocess.run(
        [
            NVCC,
            "-std=c++17",
            "-O3",
            f"-arch={arch}",
            f"-I{SOURCE.parents[1]}",
            "-Werror",
            "all-warnings",
            "-c",
            str(SOURCE),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0


def test_shared_library_entry_points_check_arguments(tmp_path):
    lib = load_library(build_library("sm_90", out_dir=tmp_path))
    n, nq, bits, k = 10_000_000, 1000, 64, 100
    ws = lib.cbir_hamming_knn_cuda_workspace(n, nq, bits, k)
    tiles = -(-n // 1024)
    assert ws >= 4 * (nq * (bits + 1) + 3 * nq + 2 * nq * tiles)
    null = ctypes.c_void_p(0)
    # Out-of-range arguments are refused before any CUDA call (so this runs without a GPU).
    for bad_k, bad_bits in [(0, 64), (n + 1, 64), (4097, 64), (10, 0), (10, 8192)]:
        assert (
            lib.cbir_hamming_knn_cuda(null, n, 2, null, nq, bad_bits, bad_k, null, null, null, ws, null) == -1
        )
    assert lib.cbir_hamming_knn_cuda(null, n, 2, null, nq, bits, k, null, null, null, ws - 1, null) == -1
    assert (
        lib.cbir_hamming_knn_cuda(null, n, 2, null, 0, bits, k, null, null, null, 0, null) == 0
    )  # no queries
    assert Path(lib._name).exists()
