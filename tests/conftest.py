from __future__ import annotations

import os

import pytest

# The suite runs on 2-core machines: keep torch and ONNX Runtime from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def _gemm_isas() -> list[str]:
    from cbir_engine import _C

    return ["avx2"] + (["avx512"] if _C.gemm_set_isa("auto") and _C.gemm_isa() != "avx2" else [])


@pytest.fixture(params=_gemm_isas())
def gemm_isa(request):
    """The conv/GEMM micro-kernels pinned to each instruction set the CPU has (AVX2 always,
    AVX-512F where present), restored to automatic afterwards."""
    from cbir_engine import _C

    assert _C.gemm_set_isa(request.param)
    assert _C.gemm_isa() == request.param
    yield request.param
    _C.gemm_set_isa("auto")
