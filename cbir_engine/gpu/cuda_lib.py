"""The CUDA C++ op kernels and the Triton-cubin launcher as one shared library, called through
their C ABI (csrc/cuda/ops.h, csrc/cuda/triton_launcher.h) with ctypes.

The library comes from, in order: $CBIR_ENGINE_CUDA_LIB; the one `setup.py` built into the
package (CBIR_ENGINE_CUDA=1); else nvcc builds it on first use into ~/.cache/cbir_engine, keyed by
the sources' hash and the GPU architecture.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import threading
from pathlib import Path

from cbir_engine.errors import DeviceUnavailableError
from cbir_engine.index.cuda_backend import find_nvcc

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = [
    CSRC / "cuda" / f for f in ("conv.cu", "depthwise.cu", "pool.cu", "netvlad.cu", "triton_launcher.cpp")
]
HEADERS = [CSRC / "cuda" / f for f in ("ops.h", "common.cuh", "triton_launcher.h")]
PACKAGED = Path(__file__).resolve().parents[1] / "libcbir_cuda.so"
NVCC_FLAGS = ["-std=c++17", "-O3", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra"]

EINVAL = -1  # CBIR_CUDA_EINVAL and CBIR_TRITON_EINVAL
TRITON_ENODRIVER = -2
TRITON_ESCRATCH = -3
DTYPE_CODES = {"fp16": 0, "bf16": 1, "fp32": 2}

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


class ConvDesc(ctypes.Structure):
    """cbir_conv_desc (csrc/cuda/ops.h)."""

    _fields_ = [
        (name, ctypes.c_int)
        for name in (
            "n",
            "h",
            "w",
            "c",
            "k",
            "kh",
            "kw",
            "oh",
            "ow",
            "stride_h",
            "stride_w",
            "pad_h",
            "pad_w",
            "dil_h",
            "dil_w",
            "groups",
            "act",
        )
    ] + [("act_lo", ctypes.c_float), ("act_hi", ctypes.c_float)]


class PoolDesc(ctypes.Structure):
    """cbir_pool_desc (csrc/cuda/ops.h)."""

    _fields_ = [
        (name, ctypes.c_int)
        for name in (
            "n",
            "h",
            "w",
            "c",
            "oh",
            "ow",
            "kh",
            "kw",
            "stride_h",
            "stride_w",
            "pad_top",
            "pad_left",
            "pad_bottom",
            "pad_right",
            "dil_h",
            "dil_w",
            "is_max",
            "count_include_pad",
        )
    ]


class NetVLADDesc(ctypes.Structure):
    """cbir_netvlad_desc (csrc/cuda/ops.h)."""

    _fields_ = [(name, ctypes.c_int) for name in ("n", "hw", "d", "k", "normalize_input")] + [
        (name, ctypes.c_float) for name in ("eps_in", "eps_intra", "eps_out")
    ]


def sources_digest(arch: str) -> str:
    h = hashlib.sha256(arch.encode())
    for p in SOURCES + HEADERS:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def nvcc_command(nvcc: str, arch: str, out: Path) -> list[str]:
    return [
        nvcc,
        *NVCC_FLAGS,
        f"-arch={arch}",
        "-shared",
        "-Xcompiler",
        "-fPIC",
        f"-I{CSRC}",
        *map(str, SOURCES),
        "-ldl",
        "-o",
        str(out),
    ]


def build_library(arch: str, out_dir: Path | None = None) -> Path:
    """Compiles the op kernels and the launcher for `arch` (e.g. "sm_90") into a shared library."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise DeviceUnavailableError(
            "the CUDA kernels need nvcc to build (not found on PATH or in /usr/local/cuda)"
        )
    missing = [str(p) for p in SOURCES + HEADERS if not p.exists()]
    if missing:
        raise DeviceUnavailableError(f"the CUDA kernel sources are not in this install: {missing}")
    out_dir = out_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cbir_engine"
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"cbir_cuda_{arch}_{sources_digest(arch)}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        result = subprocess.run(nvcc_command(nvcc, arch, tmp), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed building the CUDA kernels:\n{result.stderr}")
        os.replace(tmp, lib)
    return lib


def load_library(path: str | os.PathLike[str]) -> ctypes.CDLL:
    """Opens the library and declares its C signatures."""
    lib = ctypes.CDLL(str(path))
    p, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    pconv, ppool, pnv = ctypes.POINTER(ConvDesc), ctypes.POINTER(PoolDesc), ctypes.POINTER(NetVLADDesc)
    sigs = {
        "cbir_conv2d_nhwc_cuda": (i, [pconv, i, p, p, p, p, p, p]),
        "cbir_depthwise_nhwc_cuda": (i, [pconv, i, p, p, p, p, p, p]),
        "cbir_pool_nhwc_cuda": (i, [ppool, i, p, p, p]),
        "cbir_netvlad_cuda_workspace": (sz, [pnv]),
        "cbir_netvlad_nhwc_cuda": (i, [pnv, i, p, p, p, p, p, p, sz, p]),
        "cbir_triton_driver_status": (i, []),
        "cbir_triton_kernel_load": (i, [p, sz, ctypes.c_char_p, i, i, sz, i, ctypes.POINTER(p)]),
        "cbir_triton_kernel_launch": (
            i,
            [p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(p), i, p],
        ),
        "cbir_triton_kernel_free": (None, [p]),
        "cbir_triton_error_string": (ctypes.c_char_p, [i]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


def library(arch: str) -> ctypes.CDLL:
    """The loaded library for `arch`, built on first use when none is installed."""
    with _lock:
        if arch not in _loaded:
            path = os.environ.get("CBIR_ENGINE_CUDA_LIB") or (PACKAGED if PACKAGED.exists() else None)
            _loaded[arch] = load_library(path or build_library(arch))
        return _loaded[arch]
