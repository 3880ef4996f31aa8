"""Loads the CUDA C++ Hamming kernel (csrc/cuda/hamming.cu) and calls its C entry point.

There is no CUDA build of `_C` yet, so the kernel is built on first use with nvcc into a shared
library in ~/.cache/cbir_engine (or taken from $CBIR_HAMMING_CUDA_LIB) and called through ctypes on
torch's current stream.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

from ..errors import DeviceUnavailableError

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "cuda" / "hamming.cu"
_lock = threading.Lock()
_libraries: dict[str, ctypes.CDLL] = {}


def find_nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def build_library(arch: str, out_dir: Path | None = None) -> Path:
    """Compiles hamming.cu for `arch` (e.g. "sm_90") into a shared library (cached by source hash)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise DeviceUnavailableError(
            "gpu_backend='cuda' needs nvcc to build csrc/cuda/hamming.cu (not found)"
        )
    if not SOURCE.exists():
        raise DeviceUnavailableError(
            f"gpu_backend='cuda' needs the kernel source {SOURCE} (not in this install)"
        )
    header = SOURCE.with_suffix(".h")
    digest = hashlib.sha256(SOURCE.read_bytes() + header.read_bytes() + arch.encode()).hexdigest()[:16]
    out_dir = out_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cbir_engine"
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"hamming_cuda_{arch}_{digest}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [
            nvcc,
            "-O3",
            "-std=c++17",
            f"-arch={arch}",
            "-shared",
            "-Xcompiler",
            "-fPIC",
            f"-I{SOURCE.parents[1]}",
            str(SOURCE),
            "-o",
            str(tmp),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed building {SOURCE.name}:\n{result.stderr}")
        os.replace(tmp, lib)
    return lib


def load_library(path: str | os.PathLike[str]) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.cbir_hamming_knn_cuda_workspace.argtypes = [
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.cbir_hamming_knn_cuda_workspace.restype = ctypes.c_size_t
    lib.cbir_hamming_knn_cuda.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
    ]
    lib.cbir_hamming_knn_cuda.restype = ctypes.c_int
    return lib


def _library_for(device: Any) -> ctypes.CDLL:
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    arch = f"sm_{major}{minor}"
    with _lock:
        if arch not in _libraries:
            path = os.environ.get("CBIR_HAMMING_CUDA_LIB") or build_library(arch)
            _libraries[arch] = load_library(path)
        return _libraries[arch]


def hamming_knn_cuda(queries: Any, db_t: Any, bits: int, k: int) -> tuple[Any, Any]:
    """Same contract as `cbir_engine.kernels.hamming.hamming_knn`, with the CUDA C++ kernel."""
    import torch

    lib = _library_for(queries.device)
    queries = queries.contiguous()
    db_t = db_t.contiguous()
    nq, words = queries.shape
    n = db_t.shape[1]
    out_d = torch.empty((nq, k), dtype=torch.int32, device=queries.device)
    out_p = torch.empty((nq, k), dtype=torch.int64, device=queries.device)
    ws_bytes = lib.cbir_hamming_knn_cuda_workspace(n, nq, bits, k)
    workspace = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=queries.device)
    stream = torch.cuda.current_stream(queries.device).cuda_stream
    rc = lib.cbir_hamming_knn_cuda(
        db_t.data_ptr(),
        n,
        words,
        queries.data_ptr(),
        nq,
        bits,
        k,
        out_d.data_ptr(),
        out_p.data_ptr(),
        workspace.data_ptr(),
        ws_bytes,
        stream,
    )
    if rc != 0:
        raise RuntimeError(f"cbir_hamming_knn_cuda failed with code {rc}")
    return out_d, out_p
