"""Hamming index files: a checked header, the codes, the ids; written atomically, read by mmap.

Layout (all integers little-endian):

    offset  size  field
         0     8  magic b"CBIRHAMI"
         8     4  format version (1)
        12     4  header bytes (64)
        16     4  bits per code
        20     4  flags (bit 0: ids increase with position; informational, recomputed on load)
        24     8  count: number of codes
        32     8  offset of the codes: 64
        40     8  offset of the ids: the end of the codes rounded up to 64
        48     8  file bytes: the end of the ids
        56     4  CRC-32 of everything after the header (codes, padding, ids)
        60     4  CRC-32 of bytes 0..59
    then codes uint8 [count, bits // 8] (the house bit layout), zero padding, ids int64 [count].

A file is written by `cbir_engine.fileio.atomic_write`: to a temporary name in the same folder,
flushed and fsynced, then renamed over the target (and the folder fsynced), so a crash leaves
either the old file or the new one.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import IndexFileError
from ..fileio import atomic_write

MAGIC = b"CBIRHAMI"
VERSION = 1
HEADER_BYTES = 64
FLAG_IDS_ASCENDING = 1
_HEADER = struct.Struct("<8sIIIIQQQQI")  # all fields before the header CRC
assert _HEADER.size == 60

__all__ = ["IndexFileContents", "write_index_file", "read_index_file"]


def _align64(x: int) -> int:
    return (x + 63) // 64 * 64


@dataclass
class IndexFileContents:
    bits: int
    codes: np.ndarray  # uint8 [count, bits // 8]; a read-only memmap view when mapped
    ids: np.ndarray  # int64 [count]
    flags: int


def _data_crc(codes: np.ndarray, ids: np.ndarray, padding: int) -> int:
    """CRC-32 of everything after the header: codes, zero padding, ids."""
    crc = zlib.crc32(memoryview(codes).cast("B")) if codes.size else 0
    crc = zlib.crc32(b"\0" * padding, crc)
    if ids.size:
        crc = zlib.crc32(memoryview(ids).cast("B"), crc)
    return crc & 0xFFFFFFFF


def _header(bits: int, count: int, flags: int, data_crc: int) -> bytes:
    code_bytes = bits // 8
    ids_offset = _align64(HEADER_BYTES + count * code_bytes)
    file_bytes = ids_offset + 8 * count
    fields = _HEADER.pack(
        MAGIC,
        VERSION,
        HEADER_BYTES,
        bits,
        flags,
        count,
        HEADER_BYTES,
        ids_offset,
        file_bytes,
        data_crc,
    )
    return fields + struct.pack("<I", zlib.crc32(fields) & 0xFFFFFFFF)


def write_index_file(
    path: str | os.PathLike[str], bits: int, codes: np.ndarray, ids: np.ndarray, flags: int = 0
) -> None:
    """Writes an index file atomically: temp file, fsync, rename over `path`, fsync the folder."""
    path = os.fspath(path)
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    count = codes.shape[0]
    if codes.shape != (count, bits // 8) or ids.shape != (count,):
        raise ValueError("codes and ids do not match the code length and count")
    ids_offset = _align64(HEADER_BYTES + codes.nbytes)
    padding = ids_offset - HEADER_BYTES - codes.nbytes
    header = _header(bits, count, flags, _data_crc(codes, ids, padding))
    parts: list[bytes | memoryview] = [header]
    if codes.size:
        parts.append(memoryview(codes).cast("B"))
    parts.append(b"\0" * padding)
    if ids.size:
        parts.append(memoryview(ids).cast("B"))
    atomic_write(path, parts)


def read_index_file(
    path: str | os.PathLike[str], mmap: bool = True, verify: bool = True
) -> IndexFileContents:
    """Reads and checks an index file; with `mmap` the arrays are read-only views of the file.

    Anything that does not add up (magic, version, sizes against the file length, either CRC)
    raises IndexFileError naming the problem; `verify=False` skips only the data CRC (which reads
    the whole file).
    """
    path = os.fspath(path)
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise IndexFileError(f"{path}: cannot read index file: {e}") from e
    if len(raw) < HEADER_BYTES:
        if raw[: len(MAGIC)] != MAGIC[: len(raw)]:
            raise IndexFileError(f"{path}: not a cbir-engine Hamming index file (bad magic)")
        raise IndexFileError(
            f"{path}: truncated index file ({file_size} bytes, the header alone is {HEADER_BYTES})"
        )
    (
        magic,
        version,
        header_bytes,
        bits,
        flags,
        count,
        codes_offset,
        ids_offset,
        file_bytes,
        data_crc,
    ) = _HEADER.unpack(raw[:60])
    if magic != MAGIC:
        raise IndexFileError(f"{path}: not a cbir-engine Hamming index file (bad magic)")
    (header_crc,) = struct.unpack("<I", raw[60:64])
    if zlib.crc32(raw[:60]) & 0xFFFFFFFF != header_crc:
        raise IndexFileError(f"{path}: corrupted index file (header checksum mismatch)")
    if version != VERSION:
        raise IndexFileError(
            f"{path}: index file format version {version}; this build reads version {VERSION}"
        )
    if header_bytes != HEADER_BYTES or bits <= 0 or bits % 8:
        raise IndexFileError(
            f"{path}: corrupted index file (header says {bits} bits, {header_bytes} header bytes)"
        )
    code_bytes = bits // 8
    if (
        codes_offset != HEADER_BYTES
        or ids_offset != _align64(HEADER_BYTES + count * code_bytes)
        or file_bytes != ids_offset + 8 * count
    ):
        raise IndexFileError(f"{path}: corrupted index file (section offsets do not match the count)")
    if file_size < file_bytes:
        raise IndexFileError(f"{path}: truncated index file ({file_size} of {file_bytes} bytes)")
    if file_size > file_bytes:
        raise IndexFileError(f"{path}: index file has {file_size - file_bytes} unexpected trailing bytes")

    data: Any
    if mmap:
        data = np.memmap(path, dtype=np.uint8, mode="r", shape=(file_bytes,))
    else:
        data = np.fromfile(path, dtype=np.uint8, count=file_bytes)
        if data.size != file_bytes:
            raise IndexFileError(f"{path}: truncated index file while reading")
    codes = data[codes_offset : codes_offset + count * code_bytes].reshape(count, code_bytes)
    ids = data[ids_offset : ids_offset + 8 * count].view(np.int64)
    if verify and zlib.crc32(memoryview(data[HEADER_BYTES:file_bytes])) & 0xFFFFFFFF != data_crc:
        raise IndexFileError(f"{path}: corrupted index file (data checksum mismatch)")
    return IndexFileContents(bits=bits, codes=codes, ids=ids, flags=flags)
