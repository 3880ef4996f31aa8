"""Bit packing: the one place where {0,1}, ±1, bool and float arrays become packed codes and back.

Layout (the house layout, byte-compatible with FAISS and Milvus): bit i of a code is bit i % 64 of
little-endian 64-bit word i // 64, which is the same as bit i % 8 of byte i // 8. A code of
`bits` bits is therefore `bits // 8` uint8 values, and an array of n codes is uint8 [n, bits // 8].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DTypeError, NonFiniteError, ShapeError

__all__ = ["pack_bits", "unpack_bits", "check_codes", "code_bytes_for"]


def code_bytes_for(bits: int) -> int:
    """Bytes per code for `bits` bits; `bits` must be a positive multiple of 8."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if bits <= 0 or bits % 8:
        raise ShapeError(f"code length must be a positive multiple of 8 bits, got {bits}")
    return int(bits) // 8


def pack_bits(x: Any) -> np.ndarray:
    """Packs the last axis of `x` into codes: uint8 [..., bits // 8].

    A bit is set where the value is positive, which reads every accepted input the natural way:
    {0, 1} integers (1 is set), ±1 integers (+1 is set), bools (True is set) and floats by sign
    (> 0 is set; 0.0 and -0.0 are clear). Integers other than -1, 0, 1 are refused (they are
    usually already-packed bytes), as are NaNs. The last axis must be a multiple of 8 long.
    """
    a = np.asarray(x)
    if a.ndim == 0:
        raise ShapeError("pack_bits needs at least one axis of bits")
    if a.shape[-1] % 8:
        raise ShapeError(f"the bit axis must be a multiple of 8 long, got {a.shape[-1]}")
    if a.dtype == np.bool_:
        bits = a
    elif np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < -1 or a.max() > 1):
            raise ValueError(
                "integer input to pack_bits must hold only {0, 1} or {-1, +1}; "
                f"got values in [{a.min()}, {a.max()}] (already packed codes need no packing)"
            )
        bits = a > 0
    elif np.issubdtype(a.dtype, np.floating):
        if a.size and np.isnan(a).any():
            raise NonFiniteError("pack_bits got NaN; a NaN has no sign to make a bit from")
        bits = a > 0
    else:
        raise DTypeError(f"pack_bits takes bool, integer or float arrays, got {a.dtype}")
    # Little bit order: bit i of the code is bit i % 8 of byte i // 8.
    return np.packbits(bits, axis=-1, bitorder="little")


def unpack_bits(codes: Any, *, signed: bool = False, dtype: Any = None) -> np.ndarray:
    """Unpacks codes uint8 [..., nbytes] into bits [..., nbytes * 8].

    By default the bits are {0, 1} as uint8; `signed=True` gives ±1 (as int8 unless `dtype` says
    otherwise), the inverse of packing a ±1 or float-sign array.
    """
    c = np.asarray(codes)
    if c.dtype != np.uint8:
        raise DTypeError(f"codes must be uint8 packed bits, got {c.dtype}")
    if c.ndim == 0:
        raise ShapeError("codes need at least one axis")
    bits = np.unpackbits(c, axis=-1, bitorder="little")
    if signed:
        out = bits.astype(dtype if dtype is not None else np.int8)
        return out * 2 - 1
    return bits if dtype is None else bits.astype(dtype)


def check_codes(codes: Any, bits: int, what: str = "codes") -> np.ndarray:
    """`codes` as a C-contiguous uint8 [n, bits // 8] array, or a clear error saying what is off."""
    nbytes = code_bytes_for(bits)
    c = np.asarray(codes) if not isinstance(codes, np.ndarray) else codes
    if c.dtype != np.uint8:
        hint = ""
        if (
            c.dtype == np.bool_
            or np.issubdtype(c.dtype, np.floating)
            or np.issubdtype(c.dtype, np.signedinteger)
        ):
            hint = " (to pack {0,1}, ±1, bool or float arrays use cbir_engine.pack_bits)"
        raise DTypeError(f"{what} must be uint8 packed codes, got {c.dtype}{hint}")
    if c.ndim != 2:
        raise ShapeError(
            f"{what} must be 2-D [n, {nbytes}], got shape {tuple(c.shape)}"
            + (" (for one code use codes[None])" if c.ndim == 1 else "")
        )
    if c.shape[1] != nbytes:
        raise ShapeError(
            f"{what} have {c.shape[1]} bytes ({c.shape[1] * 8} bits) per code; "
            f"this index holds {bits}-bit codes ({nbytes} bytes)"
        )
    return np.ascontiguousarray(c)
