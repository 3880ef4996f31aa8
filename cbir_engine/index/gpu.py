"""The GPU side of HammingIndex: codes uploaded to a CUDA device, searched by the Triton kernel
(`cbir_engine.kernels.hamming`) or by the CUDA C++ kernel (`csrc/cuda/hamming.cu`)."""

from __future__ import annotations

import numpy as np

from ..errors import DeviceUnavailableError, IndexArgumentError

GPU_BACKENDS = ("triton", "cuda")
MAX_K = 4096  # both kernels sort each query's k results in one block


def check_device(device: str, backend: str) -> None:
    """Raises DeviceUnavailableError unless `device` is a CUDA device this process can use."""
    if backend not in GPU_BACKENDS:
        raise IndexArgumentError(f"gpu_backend must be one of {GPU_BACKENDS}, got {backend!r}")
    if not (device == "cuda" or device.startswith("cuda:")):
        raise IndexArgumentError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    try:
        import torch
    except ImportError as e:
        raise DeviceUnavailableError(
            f"device={device!r} needs torch with CUDA (pip install cbir-engine[torch]); "
            "torch is not installed"
        ) from e
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device={device!r} needs an NVIDIA GPU and a CUDA build of torch; "
            "torch.cuda.is_available() "
            "is False on this machine (use device='cpu')"
        )
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise DeviceUnavailableError(
            f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise DeviceUnavailableError("gpu_backend='triton' needs triton (pip install triton)") from e


def codes_to_words(codes: np.ndarray) -> np.ndarray:
    """uint8 [n, nbytes] codes as int32 [n, ceil(nbytes / 4)] words (zero padded, little-endian:
    the house layout read 32 bits at a time)."""
    pad = (-codes.shape[1]) % 4
    if pad:
        codes = np.pad(codes, ((0, 0), (0, pad)))
    return np.ascontiguousarray(codes).view("<i4")


class GpuCodes:
    """Codes on a CUDA device, word-major and in id order (so ties go to the smaller id)."""

    def __init__(
        self,
        codes: np.ndarray,
        ids: np.ndarray,
        ids_ascending: bool,
        bits: int,
        device: str,
        backend: str,
    ):
        import torch

        if not ids_ascending:
            order = np.argsort(ids, kind="stable")
            codes, ids = codes[order], ids[order]
        self.bits = bits
        self.backend = backend
        self.device = torch.device(device)
        self.n = codes.shape[0]
        words = codes_to_words(np.asarray(codes))
        self.db_t = torch.from_numpy(np.ascontiguousarray(words.T)).to(self.device)
        self.ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        if k > MAX_K:
            raise IndexArgumentError(f"on the GPU k is at most {MAX_K}, got {k}")
        q = torch.from_numpy(codes_to_words(queries)).to(self.device)
        if self.backend == "triton":
            from ..kernels.hamming import hamming_knn

            dist, pos = hamming_knn(q, self.db_t, self.bits, k)
        else:
            from .cuda_backend import hamming_knn_cuda

            dist, pos = hamming_knn_cuda(q, self.db_t, self.bits, k)
        ids = self.ids[pos]
        return dist.cpu().numpy(), ids.cpu().numpy()
