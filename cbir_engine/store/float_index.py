"""Float descriptor index: exact k-NN by cosine or Euclidean distance, and its file format.

The file sits beside the Hamming index files of `cbir_engine.index` and follows their layout
(a checked 64-byte header, the data, the ids; all integers little-endian):

    offset  size  field
         0     8  magic b"CBIRFLTI"
         8     4  format version (1)
        12     4  header bytes (64)
        16     4  dimensions per vector
        20     4  metric: 0 = squared Euclidean, 1 = cosine (vectors stored L2-normalised)
        24     8  count
        32     8  offset of the vectors: 64
        40     8  offset of the ids: the end of the vectors rounded up to 64
        48     8  file bytes: the end of the ids
        56     4  CRC-32 of everything after the header
        60     4  CRC-32 of bytes 0..59
    then vectors float32 [count, dim], zero padding, ids int64 [count].

Files are written with `cbir_engine.fileio.atomic_write`: a crash leaves the old file or the new.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Any

import numpy as np

from cbir_engine.errors import DTypeError, IndexFileError, NonFiniteError, ShapeError
from cbir_engine.fileio import atomic_write
from cbir_engine.index import DuplicateIdError, IndexArgumentError

MAGIC = b"CBIRFLTI"
VERSION = 1
HEADER_BYTES = 64
METRICS = ("l2", "cosine")
_HEADER = struct.Struct("<8sIIIIQQQQI")
_CHUNK = 256  # queries per block: bounds the [chunk, n] distance matrix

__all__ = ["FloatIndex", "METRICS"]


def _align64(x: int) -> int:
    return (x + 63) // 64 * 64


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class FloatIndex:
    """Exact search over float32 descriptors [n, dim]. Distances: "cosine" gives 1 - cos (vectors
    are normalised when added), "l2" the squared Euclidean distance. Ties are broken by the
    smaller id, so results are deterministic."""

    def __init__(self, dim: int, metric: str = "cosine") -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise IndexArgumentError(f"dim must be a positive int, got {dim!r}")
        if metric not in METRICS:
            raise IndexArgumentError(f"metric must be one of {METRICS}, got {metric!r}")
        self.dim = int(dim)
        self.metric = metric
        self._vectors = np.empty((0, self.dim), np.float32)
        self._ids = np.empty(0, np.int64)

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    @property
    def ntotal(self) -> int:
        return len(self)

    @property
    def ids(self) -> np.ndarray:
        v = self._ids.view()
        v.flags.writeable = False
        return v

    @property
    def vectors(self) -> np.ndarray:
        v = self._vectors.view()
        v.flags.writeable = False
        return v

    def __repr__(self) -> str:
        return f"FloatIndex(dim={self.dim}, n={len(self)}, metric={self.metric!r})"

    def _check_vectors(self, x: Any, what: str) -> np.ndarray:
        a = np.asarray(x)
        if a.dtype.kind not in "fiu":
            raise DTypeError(f"{what} must be numeric, got {a.dtype}")
        a = np.asarray(a, np.float32)
        if a.ndim != 2 or a.shape[1] != self.dim:
            raise ShapeError(f"{what} must be [n, {self.dim}], got {list(a.shape)}")
        if not np.isfinite(a).all():
            raise NonFiniteError(f"{what} contain NaN or infinity")
        return np.ascontiguousarray(_l2_normalise(a) if self.metric == "cosine" else a)

    def add(self, vectors: Any, ids: Any) -> None:
        v = self._check_vectors(vectors, "vectors")
        new_ids = np.asarray(ids, np.int64).reshape(-1)
        if new_ids.shape[0] != v.shape[0]:
            raise ShapeError(f"{v.shape[0]} vectors but {new_ids.shape[0]} ids")
        if np.unique(new_ids).size != new_ids.size or np.isin(new_ids, self._ids).any():
            raise DuplicateIdError("ids must be unique and new to the index")
        self._vectors = np.concatenate([self._vectors, v])
        self._ids = np.concatenate([self._ids, new_ids])

    def remove(self, ids: Any) -> int:
        gone = np.isin(self._ids, np.asarray(ids, np.int64).reshape(-1))
        if gone.any():
            self._vectors = self._vectors[~gone]
            self._ids = self._ids[~gone]
        return int(gone.sum())

    def distances(self, queries: Any) -> np.ndarray:
        """float32 [nq, n] distances from each query to every stored vector."""
        return self._distances(self._check_vectors(queries, "queries"))

    def _distances(self, checked: np.ndarray) -> np.ndarray:
        q = checked.astype(np.float64)
        db = self._vectors.astype(np.float64)
        if self.metric == "cosine":
            d = 1.0 - q @ db.T
        else:
            d = (q ** 2).sum(1)[:, None] - 2.0 * q @ db.T + (db ** 2).sum(1)[None]
            np.maximum(d, 0.0, out=d)
        return d.astype(np.float32)

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest vectors of each query: (distances float32 [nq, k], ids int64 [nq, k]),
        sorted by (distance, id); k larger than the index is cut to its size."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise IndexArgumentError(f"k must be a positive int, got {k!r}")
        q = self._check_vectors(queries, "queries")
        nq = q.shape[0]
        k = min(int(k), len(self))
        out_d = np.empty((nq, k), np.float32)
        out_i = np.empty((nq, k), np.int64)
        if k == 0:
            return out_d, out_i
        for s in range(0, nq, _CHUNK):
            d = self._distances(q[s:s + _CHUNK])
            for r, row in enumerate(d):
                # Everything up to the k-th smallest distance, ties included, then by (distance, id).
                cand = np.flatnonzero(row <= np.partition(row, k - 1)[k - 1]) if k < row.size else \
                    np.arange(row.size)
                order = np.lexsort((self._ids[cand], row[cand]))[:k]
                out_d[s + r] = row[cand[order]]
                out_i[s + r] = self._ids[cand[order]]
        return out_d, out_i

    # ---- files ----
    def _header(self, data_crc: int) -> bytes:
        n = len(self)
        ids_offset = _align64(HEADER_BYTES + n * self.dim * 4)
        fields = _HEADER.pack(MAGIC, VERSION, HEADER_BYTES, self.dim, METRICS.index(self.metric), n,
                              HEADER_BYTES, ids_offset, ids_offset + 8 * n, data_crc)
        return fields + struct.pack("<I", zlib.crc32(fields) & 0xFFFFFFFF)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the index atomically (temp file, fsync, rename, fsync the folder)."""
        vec = memoryview(np.ascontiguousarray(self._vectors).reshape(-1).view(np.uint8))
        ids = memoryview(np.ascontiguousarray(self._ids).view(np.uint8))
        padding = b"\0" * (_align64(HEADER_BYTES + len(vec)) - HEADER_BYTES - len(vec))
        crc = zlib.crc32(ids, zlib.crc32(padding, zlib.crc32(vec))) & 0xFFFFFFFF
        atomic_write(path, [self._header(crc), vec, padding, ids])

    @classmethod
    def load(cls, path: str | os.PathLike[str], verify: bool = True) -> FloatIndex:
        """Reads and checks a float index file; IndexFileError names what does not add up."""
        path = os.fspath(path)
        try:
            raw = np.fromfile(path, dtype=np.uint8)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise IndexFileError(f"{path}: cannot read index file: {e}") from e
        head = raw[:HEADER_BYTES].tobytes()
        if head[:8] != MAGIC[: len(head[:8])] or len(head) < 8:
            raise IndexFileError(f"{path}: not a cbir-engine float index file (bad magic)")
        if len(head) < HEADER_BYTES:
            raise IndexFileError(f"{path}: truncated index file ({raw.size} bytes)")
        fields = _HEADER.unpack(head[:60])
        _, version, header_bytes, dim, metric, n, v_off, i_off, total, data_crc = fields
        if zlib.crc32(head[:60]) & 0xFFFFFFFF != struct.unpack("<I", head[60:64])[0]:
            raise IndexFileError(f"{path}: corrupted index file (header checksum mismatch)")
        if version != VERSION:
            raise IndexFileError(f"{path}: float index format version {version}; this build reads {VERSION}")
        if header_bytes != HEADER_BYTES or dim < 1 or metric >= len(METRICS) or v_off != HEADER_BYTES \
                or i_off != _align64(HEADER_BYTES + n * dim * 4) or total != i_off + 8 * n:
            raise IndexFileError(f"{path}: corrupted index file (header fields do not add up)")
        if raw.size != total:
            raise IndexFileError(f"{path}: index file is {raw.size} bytes, its header says {total}")
        if verify and zlib.crc32(memoryview(raw[HEADER_BYTES:])) & 0xFFFFFFFF != data_crc:
            raise IndexFileError(f"{path}: corrupted index file (data checksum mismatch)")
        index = cls(int(dim), METRICS[metric])
        index._vectors = raw[v_off:v_off + n * dim * 4].view(np.float32).reshape(n, dim).copy()
        index._ids = raw[i_off:total].view(np.int64).copy()
        if np.unique(index._ids).size != n:
            raise IndexFileError(f"{path}: index file holds repeated ids")
        return index
