"""HammingIndex on an NVIDIA GPU (Triton and CUDA C++ kernels) against the CPU index."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]

from cbir_engine.index import HammingIndex  # noqa: E402
from cbir_engine.index.cuda_backend import find_nvcc  # noqa: E402

BACKENDS = ["triton"] + (["cuda"] if find_nvcc() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 64, 96, 256, 1024])
@pytest.mark.parametrize("n", [1, 7, 59, 1023, 100_003])
def test_gpu_matches_cpu(backend, bits, n):
    rng = np.random.default_rng(bits + n)
    db = rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
    if n > 59:
        db[::7] = db[0]  # ties
    ids = rng.permutation(4 * n)[:n].astype(np.int64)  # out of order: ties go to the smaller id
    q = np.concatenate([db[:2], rng.integers(0, 256, size=(37, bits // 8), dtype=np.uint8)])
    cpu = HammingIndex(bits, method="flat")
    gpu = HammingIndex(bits, device="cuda", gpu_backend=backend)
    cpu.add(db, ids)
    gpu.add(db, ids)
    for k in sorted({1, min(10, n), min(n, 4096)}):
        cd, ci = cpu.search(q, k)
        gd, gi = gpu.search(q, k)
        np.testing.assert_array_equal(gd, cd)
        np.testing.assert_array_equal(gi, ci)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_large_batch(backend):
    rng = np.random.default_rng(0)
    db = rng.integers(0, 256, size=(1_000_000, 8), dtype=np.uint8)
    q = rng.integers(0, 256, size=(1000, 8), dtype=np.uint8)
    cpu = HammingIndex(64, method="flat")
    gpu = HammingIndex(64, device="cuda", gpu_backend=backend)
    cpu.add(db)
    gpu.add(db)
    for k in (1, 100):
        cd, ci = cpu.search(q, k)
        gd, gi = gpu.search(q, k)
        np.testing.assert_array_equal(gd, cd)
        np.testing.assert_array_equal(gi, ci)
