"""cbir-engine: CNN-based image retrieval, from ONNX models to ranked results.

    import cbir_engine
    engine = cbir_engine.load("resnet50.onnx")
    descriptors = engine(images)          # numpy in, numpy out (torch in, torch out)
"""

from __future__ import annotations

import os
from typing import Any

from cbir_engine.errors import (
    CbirError,
    DeviceUnavailableError,
    DTypeError,
    IndexFileError,
    ModelFormatError,
    NonFiniteError,
    PlanFileError,
    ShapeError,
    UnsupportedOpError,
)
from cbir_engine.index import HammingIndex, pack_bits, unpack_bits
from cbir_engine.runtime import Engine

__version__ = "0.1.0"


def load(
    model: str | os.PathLike | bytes | Any,
    device: str = "cpu",
    threads: int | None = None,
    *,
    check_finite: bool = False,
    optimize: bool = True,
    winograd: bool = True,
    precision: str | None = None,
    gpu_backend: str = "triton",
) -> Engine | Any:
    """Loads an ONNX model (path, bytes or onnx.ModelProto), optimises it and returns an Engine.
    A path to a plan saved by `Engine.save` loads that instead (memory-mapped, already packed).

    threads: worker threads for the kernels (default: the CPUs this process may use).
    check_finite: raise NonFiniteError when an input or output holds NaN or infinity.
    optimize: run the fusion passes (constant folding and BN folding always run).
    winograd: run eligible 3x3 convs with Winograd F(4x4,3x3) (fewer multiplies, ~10x the
        rounding error of direct convolution, still ~1e-5 relative per layer).
    device: "cpu", or "cuda" / "cuda:N" for the GPU engine (cbir_engine.gpu.engine.GpuEngine:
        torch CUDA tensors in and out; DeviceUnavailableError where no GPU is visible).
    precision: the GPU engine's compute dtype, "fp16" (default), "bf16" or "fp32"; the CPU runs fp32.
    gpu_backend: "triton" (default), "cuda" (the CUDA C++ kernels) or "auto" (per convolution
        shape, the faster of the two, measured once) for the GPU engine.
    """
    from cbir_engine.graph.passes import optimize as run_passes
    from cbir_engine.onnx.importer import import_model, read_model
    from cbir_engine.plan.serialize import is_plan_file, load_plan

    if device != "cpu":
        return _load_gpu(model, device, precision or "fp16", gpu_backend, optimize)
    if precision not in (None, "fp32"):
        raise ValueError(f"precision {precision!r} needs device='cuda' (the CPU engine computes in fp32)")
    if isinstance(model, (str, os.PathLike)) and is_plan_file(model):
        graph, packed, packed_only, opset = load_plan(model)
        return Engine(graph, threads=threads, check_finite=check_finite, device=device, opset=opset,
                      packed=packed, packed_only=packed_only, winograd=winograd)
    proto = read_model(model)
    graph, opset = import_model(proto)
    del proto
    run_passes(graph, fuse=optimize)
    return Engine(graph, threads=threads, check_finite=check_finite, device=device, opset=opset,
                  winograd=winograd)


def _load_gpu(model: Any, device: str, precision: str, backend: str, optimize: bool) -> Any:
    from cbir_engine.gpu.engine import GpuEngine, from_onnx
    from cbir_engine.plan.serialize import is_plan_file, load_plan

    if isinstance(model, (str, os.PathLike)) and is_plan_file(model):
        graph, _, packed_only, opset = load_plan(model)
        if packed_only:
            raise PlanFileError(f"{os.fspath(model)} holds some weights only in the CPU's packed layouts; "
                                "load the ONNX model for device='cuda'")
        return GpuEngine(graph, device=device, precision=precision, backend=backend, opset=opset)
    return from_onnx(model, device=device, precision=precision, backend=backend, optimize=optimize)


def supported_ops() -> dict[str, str]:
    """ONNX operators the importer accepts: 'kernel' (run on the CPU) or 'fold' (constant-folded
    shape computations that must not depend on run-time data), with their schema versions."""
    from cbir_engine.onnx.registry import REGISTRY

    return {
        name: f"{'fold' if op.fold_only else 'kernel'} (versions {', '.join(map(str, op.versions))})"
        for name, op in sorted(REGISTRY.items())
    }


def from_torch(module: Any, example_input: Any, **kwargs: Any) -> Engine:
    """Exports a torch module to ONNX (batch dim dynamic) and loads it: the drop-in path."""
    from cbir_engine.torch_backend import from_torch as _from_torch

    return _from_torch(module, example_input, **kwargs)


__all__ = [
    "CbirError", "DTypeError", "DeviceUnavailableError", "Engine", "HammingIndex", "IndexFileError",
    "ModelFormatError", "NonFiniteError", "PlanFileError", "ShapeError", "UnsupportedOpError", "from_torch",
    "load", "pack_bits", "supported_ops", "unpack_bits", "__version__",
]
