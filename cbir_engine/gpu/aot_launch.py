"""Ahead-of-time Triton cubins launched through the CUDA driver API (csrc/cuda/triton_launcher.h),
the way the C++ executor launches them: no Triton at run time, only the cubin and its manifest
entry (cbir_engine/kernels/aot.py writes both).

    manifest = load_manifest("build/cubins")
    kernel = AotKernel(cuda_lib.library("sm_90"), manifest["kernels"][0], folder)
    kernel.launch((gx, gy, gz), [x, w, bias, res, y, n, h, ...], stream)
"""

from __future__ import annotations

import ctypes
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cbir_engine.kernels.manifest import MANIFEST_VERSION, MAX_SCRATCH_PARAMS, SCRATCH_PREFIX

SCALAR_TYPES = {"i32": ctypes.c_int32, "i64": ctypes.c_int64, "u32": ctypes.c_uint32, "fp32": ctypes.c_float}


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """Reads and checks manifest.json of an AOT build."""
    path = Path(folder) / "manifest.json"
    manifest = json.loads(path.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest version {manifest.get('version')!r}, expected {MANIFEST_VERSION}")
    for entry in manifest["kernels"]:
        n = entry.get("scratch_params", -1)
        names = [p["name"] for p in entry["params"]]
        if not 0 <= n <= MAX_SCRATCH_PARAMS or not all(
            x.startswith(SCRATCH_PREFIX) for x in names[len(names) - n :]
        ):
            raise ValueError(f"{path}: {entry['key']} has no valid list of Triton's scratch parameters")
    return manifest


def kernel_params(entry: dict[str, Any]) -> list[dict[str, str]]:
    """The kernel's own parameters (the scratch pointers the launcher adds are left out)."""
    return entry["params"][: len(entry["params"]) - entry["scratch_params"]]


def pack_args(entry: dict[str, Any], args: Sequence[Any]) -> list[Any]:
    """ctypes values for `args` in manifest order: pointers from ints or tensors (data_ptr), i32 /
    i64 / fp32 scalars. Raises ValueError on a wrong count, TypeError on a wrong kind."""
    params = kernel_params(entry)
    if len(args) != len(params):
        raise ValueError(
            f"{entry['key']} takes {len(params)} arguments ({', '.join(p['name'] for p in params)}), "
            f"got {len(args)}"
        )
    out: list[Any] = []
    for p, a in zip(params, args, strict=True):
        kind = p["type"]
        if kind.startswith("*"):
            ptr = a.data_ptr() if hasattr(a, "data_ptr") else a
            if ptr is not None and not isinstance(ptr, int):
                raise TypeError(f"{entry['key']}: {p['name']} is a pointer; got {type(a).__name__}")
            out.append(ctypes.c_void_p(ptr or 0))
        elif kind in SCALAR_TYPES:
            if kind == "fp32":
                if not isinstance(a, (int, float)):
                    raise TypeError(f"{entry['key']}: {p['name']} is fp32; got {type(a).__name__}")
                out.append(ctypes.c_float(float(a)))
            else:
                if isinstance(a, bool) or not isinstance(a, int):
                    raise TypeError(f"{entry['key']}: {p['name']} is {kind}; got {type(a).__name__}")
                out.append(SCALAR_TYPES[kind](a))
        else:
            raise TypeError(f"{entry['key']}: parameter {p['name']} has an unknown type {kind}")
    return out


class AotKernel:
    """One cubin loaded into the current CUDA context (torch's, once torch has touched the GPU)."""

    def __init__(self, lib: Any, entry: dict[str, Any], folder: str | Path) -> None:
        data = (Path(folder) / entry["cubin"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"{entry['cubin']} does not match its manifest entry (rebuilt since?)")
        self.lib = lib
        self.entry = entry
        self._image = ctypes.create_string_buffer(data, len(data))
        handle = ctypes.c_void_p()
        rc = lib.cbir_triton_kernel_load(
            self._image,
            len(data),
            entry["kernel"].encode(),
            entry["num_warps"],
            entry["shared"],
            entry["global_scratch_size"],
            entry["scratch_params"],
            ctypes.byref(handle),
        )
        if rc != 0:
            raise RuntimeError(
                f"loading {entry['cubin']}: {lib.cbir_triton_error_string(rc).decode()} ({rc})"
            )
        self.handle = handle

    def launch(self, grid: tuple[int, int, int], args: Sequence[Any], stream: int = 0) -> None:
        values = pack_args(self.entry, args)
        pointers = (ctypes.c_void_p * max(1, len(values)))(
            *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values]
        )
        rc = self.lib.cbir_triton_kernel_launch(
            self.handle, *grid, pointers, len(values), ctypes.c_void_p(stream)
        )
        if rc != 0:
            raise RuntimeError(
                f"launching {self.entry['key']}: {self.lib.cbir_triton_error_string(rc).decode()} ({rc})"
            )

    def close(self) -> None:
        if self.handle:
            self.lib.cbir_triton_kernel_free(self.handle)
            self.handle = ctypes.c_void_p()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone
            pass
