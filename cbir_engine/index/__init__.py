"""Search over hash codes: `HammingIndex` (exact k-NN and radius search by flat scan or
multi-index hashing, CPU and CUDA), bit packing in the house layout, and index files."""

from ..errors import DeviceUnavailableError, DuplicateIdError, IndexArgumentError
from .bits import pack_bits, unpack_bits
from .hamming import HammingIndex

__all__ = [
    "HammingIndex",
    "pack_bits",
    "unpack_bits",
    "IndexArgumentError",
    "DuplicateIdError",
    "DeviceUnavailableError",
]
