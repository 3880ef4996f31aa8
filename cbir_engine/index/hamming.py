"""`HammingIndex`: exact Hamming search over packed binary codes (flat scan or multi-index
hashing, on the CPU or a CUDA GPU)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np

from .. import _C
from ..errors import DTypeError, DuplicateIdError, IndexArgumentError, ShapeError
from .bits import check_codes, code_bytes_for
from .files import FLAG_IDS_ASCENDING, read_index_file, write_index_file

__all__ = ["HammingIndex"]

_METHODS = ("auto", "flat", "mih")
_ASCENDING_CHECK_CHUNK = 1 << 20
_MIH_MAX_SUBSTRING_BITS = 24  # kMihMaxSubstringBits in csrc/cpu/mih.h
# "auto" k-NN: multi-index hashing without a trial from _AUTO_MIH_CODES codes on; between
# _AUTO_TRIAL_CODES and that, a trial on the first search decides (see _mih_trial).
_AUTO_MIH_CODES = 1 << 22
_AUTO_TRIAL_CODES = 1_000_000
_AUTO_TRIAL_QUERIES = 8
_AUTO_TRIAL_MARGIN = 1.25  # MIH must be this much faster to be kept (its tables cost memory)


def _as_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _strictly_increasing(ids: np.ndarray) -> bool:
    """True when ids[i] < ids[i + 1] everywhere; reads in chunks (ids may be a 10M-entry mmap)."""
    n = ids.shape[0]
    for start in range(0, max(n - 1, 0), _ASCENDING_CHECK_CHUNK):
        stop = min(n, start + _ASCENDING_CHECK_CHUNK + 1)
        chunk = ids[start:stop]
        if not bool(np.all(chunk[1:] > chunk[:-1])):
            return False
    return True


class HammingIndex:
    """Exact k-nearest-neighbour and radius search over binary codes by Hamming distance.

    Codes are packed bits, uint8 [n, bits // 8], in the house layout (bit i of a code is bit i % 8
    of byte i // 8), which is byte for byte what FAISS's binary indexes take; `pack_bits` makes
    them from {0,1}, ±1, bool or float arrays.

    Args:
        bits: code length, a positive multiple of 8.
        method: "flat" scans every code (SIMD popcount, counting top-k); "mih" uses multi-index
            hashing (exact, same results as "flat"; fast for short codes and large databases,
            costs memory for its tables: about substrings * n * (b + 4) bytes, where for codes
            of at most 64 bits b is 4 + ceil(max(0, r - 32) / 8) with r = bits - bits /
            substrings (each table keeps the codes without its own substring) and for longer
            ones 8 * ceil(bits / 64));
            "auto" uses multi-index hashing where it measured faster (codes of at most 64 bits,
            at least 4M of them, k <= 256; tables built on the first such search) and the flat
            scan otherwise. From 1M to 4M codes the first k-NN search after a change tries both
            on up to 8 of its queries, one at a time, and keeps multi-index hashing only where it
            ran at least 1.25x faster, else dropping its tables again: one query at a time,
            LSH-clustered codes ran 5.2x (1M) and 8.5x (2M) the flat scan there, uniformly random
            ones 1.1x and 1.4x. `last_method` says which ran.
        threads: CPU threads this index owns (None: every CPU this process may use).
        device: "cpu", or "cuda" / "cuda:N" to search on an NVIDIA GPU (needs torch with CUDA and
            triton, or nvcc for `gpu_backend="cuda"`); the codes stay on the CPU too.
        mih_substrings: substrings for multi-index hashing (None: substrings of about
            log2(n) - 7 bits, so that a bucket holds about 128 codes).
        gpu_backend: "triton" (default) or "cuda" (the CUDA C++ kernel, built with nvcc on first
            use).

    Results are deterministic: ties in distance are broken by the smaller id, and each query's
    results are sorted by (distance, id). `range_search` includes codes at exactly `radius`
    (distance <= radius), unlike FAISS's binary range_search, which is exclusive
    (distance < radius).
    """

    def __init__(
        self,
        bits: int,
        method: str = "auto",
        threads: int | None = None,
        *,
        device: str = "cpu",
        mih_substrings: int | None = None,
        gpu_backend: str = "triton",
    ):
        self._bits = _as_count(bits, "bits")
        self._code_bytes = code_bytes_for(self._bits)
        if method not in _METHODS:
            raise IndexArgumentError(f"method must be one of {_METHODS}, got {method!r}")
        self._method = method
        if threads is not None:
            threads = _as_count(threads, "threads")
            if threads < 1:
                raise IndexArgumentError(f"threads must be >= 1 (or None for all CPUs), got {threads}")
        self._threads = _C.HammingThreads(threads or 0)
        if mih_substrings is not None:
            mih_substrings = _as_count(mih_substrings, "mih_substrings")
            fewest = -(-self._bits // _MIH_MAX_SUBSTRING_BITS)
            if not fewest <= mih_substrings <= self._bits:
                raise IndexArgumentError(
                    f"mih_substrings must be in [{fewest}, {self._bits}] "
                    f"for {self._bits}-bit codes "
                    f"(a substring indexes a table of 2^width buckets, width at most "
                    f"{_MIH_MAX_SUBSTRING_BITS}), got {mih_substrings}"
                )
        self._mih_substrings = mih_substrings
        self._device = str(device)
        self._gpu_backend = gpu_backend
        if self._device != "cpu":
            from .gpu import check_device

            check_device(self._device, gpu_backend)
        self._lock = threading.RLock()
        # Storage: the first _n rows of growable buffers (or read-only views of a mapped file).
        self._codes = np.empty((0, self._code_bytes), dtype=np.uint8)
        self._ids = np.empty(0, dtype=np.int64)
        self._n = 0
        self._next_id = 0
        self._ids_ascending = True
        self._mapped = False
        self._mih: Any = None  # _C.MihTables, built on first use after a change
        self._auto_mih: bool | None = None  # the trial's verdict for the codes held now
        self._gpu: Any = None  # gpu.GpuCodes, uploaded on first use after a change
        self._last_method = ""

    # ---- properties ----
    @property
    def bits(self) -> int:
        return self._bits

    @property
    def code_bytes(self) -> int:
        return self._code_bytes

    @property
    def method(self) -> str:
        return self._method

    @property
    def device(self) -> str:
        return self._device

    @property
    def threads(self) -> int:
        return int(self._threads.threads)

    @property
    def ntotal(self) -> int:
        return self._n

    def __len__(self) -> int:
        return self._n

    @property
    def codes(self) -> np.ndarray:
        """The stored codes in insertion order, uint8 [n, bits // 8] (read-only view)."""
        v = self._codes[: self._n].view()
        v.flags.writeable = False
        return v

    @property
    def ids(self) -> np.ndarray:
        """The ids of the stored codes, int64 [n] (read-only view)."""
        v = self._ids[: self._n].view()
        v.flags.writeable = False
        return v

    @property
    def last_method(self) -> str:
        """The method the latest search ran: "flat", "mih" or "gpu" ("" before any)."""
        return self._last_method

    @property
    def is_mapped(self) -> bool:
        """True while the codes are read from a memory-mapped file (until the first change)."""
        return self._mapped

    def __repr__(self) -> str:
        return (
            f"HammingIndex(bits={self._bits}, n={self._n}, method={self._method!r}, "
            f"threads={self.threads}, device={self._device!r})"
        )

    # ---- changes ----
    def add(self, codes: Any, ids: Any = None) -> None:
        """Adds codes (uint8 [m, bits // 8]); ids default to consecutive ints after the largest.

        Ids are int64 and must be unique, both among themselves and against the index
        (DuplicateIdError otherwise).
        """
        codes = check_codes(codes, self._bits, "codes")
        m = codes.shape[0]
        with self._lock:
            if ids is None:
                new_ids = np.arange(self._next_id, self._next_id + m, dtype=np.int64)
            else:
                new_ids = self._check_new_ids(ids, m)
            if m == 0:
                return
            n = self._n
            increasing = _strictly_increasing(new_ids)
            self._ids_ascending = (
                self._ids_ascending and increasing and (n == 0 or new_ids[0] > self._ids[n - 1])
            )
            self._reserve(n + m)
            self._codes[n : n + m] = codes
            self._ids[n : n + m] = new_ids
            self._n = n + m
            self._next_id = max(self._next_id, int(new_ids.max()) + 1)
            self._changed()

    def remove(self, ids: Any) -> int:
        """Removes the codes with these ids (unknown ids are ignored); returns how many went."""
        target = np.asarray(ids)
        if target.ndim == 0:
            target = target.reshape(1)
        if target.size and not np.issubdtype(target.dtype, np.integer):
            raise DTypeError(f"ids must be integers, got {target.dtype}")
        target = target.astype(np.int64, copy=False).ravel()
        with self._lock:
            if self._n == 0 or target.size == 0:
                return 0
            current = self._ids[: self._n]
            drop = np.isin(current, target)
            removed = int(drop.sum())
            if removed:
                keep = ~drop
                # Fresh arrays: also the moment a mapped index stops reading the file.
                self._codes = np.ascontiguousarray(self._codes[: self._n][keep])
                self._ids = np.ascontiguousarray(current[keep])
                self._n -= removed
                self._mapped = False
                self._changed()
            return removed

    def _check_new_ids(self, ids: Any, m: int) -> np.ndarray:
        a = np.asarray(ids)
        if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
            raise DTypeError(f"ids must be integers (int64), got {a.dtype}")
        if a.ndim != 1 or a.shape[0] != m:
            raise ShapeError(f"ids must be 1-D with one id per code ({m}), got shape {tuple(a.shape)}")
        if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
            raise IndexArgumentError("ids must fit in int64")
        a = np.ascontiguousarray(a, dtype=np.int64)
        if m > 1:
            s = np.sort(a)
            repeated = s[1:][s[1:] == s[:-1]]
            if repeated.size:
                raise DuplicateIdError(f"ids repeat within the batch: {np.unique(repeated)[:5].tolist()}")
        if self._n and m:
            current = self._ids[: self._n]
            if self._ids_ascending:
                if a.min() <= current[-1]:  # sorted: binary search
                    pos = np.searchsorted(current, a)
                    hit = (pos < self._n) & (current[np.minimum(pos, self._n - 1)] == a)
                    if hit.any():
                        raise DuplicateIdError(f"ids already in the index: {a[hit][:5].tolist()}")
            else:
                hit = np.isin(a, current)
                if hit.any():
                    raise DuplicateIdError(f"ids already in the index: {a[hit][:5].tolist()}")
        return a

    def _reserve(self, needed: int) -> None:
        if needed <= self._codes.shape[0] and not self._mapped and self._codes.flags.writeable:
            return
        capacity = max(needed, 2 * self._codes.shape[0] if not self._mapped else needed, 1024)
        codes = np.empty((capacity, self._code_bytes), dtype=np.uint8)
        ids = np.empty(capacity, dtype=np.int64)
        codes[: self._n] = self._codes[: self._n]
        ids[: self._n] = self._ids[: self._n]
        self._codes, self._ids = codes, ids
        self._mapped = False

    def _changed(self) -> None:
        self._mih = None
        self._auto_mih = None
        self._gpu = None

    # ---- search ----
    def _check_query(self, queries: Any) -> np.ndarray:
        return check_codes(queries, self._bits, "queries")

    def _use_mih(self, nq: int, k: int | None, radius: int | None = None) -> bool:
        if self._method != "auto":
            return self._method == "mih"
        # Multi-index hashing wins when its substrings are selective: short codes, millions of
        # them, few results. Measured on a 2-core Zen 4 (bench/bench_hamming.py,
        # bench/results/hamming.csv), 10M 64-bit codes, k=10: 10-14x the flat scan one query at a
        # time and 3.4x in batches of 1000 on random codes, 44-102x on clustered (LSH-like) ones;
        # for 128-bit and longer random codes the probes reach too much of the database. From 1M
        # to 4M codes it depends on the codes (1.1x on random ones, 5.2x on LSH-clustered ones
        # at 1M, one query at a time), so a trial decides k-NN searches there (_mih_trial).
        if self._bits > 64:
            return False
        if self._n < _AUTO_MIH_CODES:
            return radius is None and bool(self._auto_mih) and k is not None and k <= 256
        if radius is not None:
            return radius <= self._bits // 4
        assert k is not None
        return k <= 256

    def _trial_due(self, k: int) -> bool:
        return (
            self._method == "auto"
            and self._auto_mih is None
            and self._bits <= 64
            and _AUTO_TRIAL_CODES <= self._n < _AUTO_MIH_CODES
            and k <= 256
        )

    def _mih_trial(self, q: np.ndarray, k: int, ids: np.ndarray) -> None:
        """Times multi-index hashing against the flat scan on the first queries, one at a time
        and alternating, and records which to use until the codes change. How much MIH gains
        below 4M codes depends on how the codes are spread, which only a search shows: at 1M
        64-bit codes, k=10, one query at a time (2-core Zen 4), it ran 1.1x the flat scan on
        uniformly random codes and 5.2x on LSH-clustered ones."""
        tables = self._mih_tables()
        codes = self._codes[: self._n]
        spent_mih = spent_flat = 0.0
        for row in q[:_AUTO_TRIAL_QUERIES]:
            one = row[None, :]
            t0 = time.perf_counter()
            _C.mih_knn(self._threads, tables, ids, self._ids_ascending, one, k)
            t1 = time.perf_counter()
            _C.hamming_knn(self._threads, codes, ids, self._ids_ascending, one, k)
            t2 = time.perf_counter()
            spent_mih += t1 - t0
            spent_flat += t2 - t1
        self._auto_mih = spent_mih * _AUTO_TRIAL_MARGIN < spent_flat
        if not self._auto_mih:
            self._mih = None  # its memory back

    def _mih_tables(self) -> Any:
        if self._mih is None:
            self._mih = _C.mih_build(self._threads, self._codes[: self._n], self._mih_substrings or 0)
        return self._mih

    @property
    def mih_substrings(self) -> int:
        """Substrings multi-index hashing uses (or would use) for the codes held now."""
        if self._mih is not None:
            return int(self._mih.substrings)
        return self._mih_substrings or int(_C.mih_default_substrings(self._bits, max(self._n, 2)))

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest codes of each query: (distances int32 [nq, k], ids int64 [nq, k]).

        Rows are sorted by (distance, id); among equal distances the smaller id wins.
        """
        q = self._check_query(queries)
        k = _as_count(k, "k")
        with self._lock:
            if k < 1 or k > self._n:
                raise IndexArgumentError(f"k must be in [1, {self._n}] (the number of codes), got {k}")
            nq = q.shape[0]
            if nq == 0:
                return np.empty((0, k), np.int32), np.empty((0, k), np.int64)
            if self._device != "cpu":
                self._last_method = "gpu"
                return self._gpu_codes().search(q, k)
            ids = self._ids[: self._n]
            if self._trial_due(k):
                self._mih_trial(q, k, ids)
            if self._use_mih(nq, k):
                self._last_method = "mih"
                d, i, _ = _C.mih_knn(self._threads, self._mih_tables(), ids, self._ids_ascending, q, k)
                return d, i
            self._last_method = "flat"
            return _C.hamming_knn(self._threads, self._codes[: self._n], ids, self._ids_ascending, q, k)

    def range_search(self, queries: Any, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every code within `radius` of each query, inclusive (distance <= radius).

        Returns (lims int64 [nq + 1], distances int32, ids int64): query i's results are
        [lims[i], lims[i + 1]), sorted by (distance, id). Note FAISS's binary range_search keeps
        distance < radius; pass radius - 1 here for the same sets.
        """
        q = self._check_query(queries)
        radius = _as_count(radius, "radius")
        if radius < 0:
            raise IndexArgumentError(f"radius must be >= 0, got {radius}")
        radius = min(radius, self._bits)
        with self._lock:
            ids = self._ids[: self._n]
            if self._n == 0 or q.shape[0] == 0:
                return (
                    np.zeros(q.shape[0] + 1, np.int64),
                    np.empty(0, np.int32),
                    np.empty(0, np.int64),
                )
            if self._use_mih(q.shape[0], None, radius):
                self._last_method = "mih"
                return _C.mih_range(self._threads, self._mih_tables(), ids, q, radius)
            self._last_method = "flat"
            return _C.hamming_range(self._threads, self._codes[: self._n], ids, q, radius)

    def distances(self, queries: Any) -> np.ndarray:
        """All distances from each query to each stored code, int32 [nq, n] (small inputs)."""
        q = self._check_query(queries)
        with self._lock:
            return _C.hamming_distances(self._threads, self._codes[: self._n], q)

    # ---- GPU ----
    def _gpu_codes(self) -> Any:
        if self._gpu is None:
            from .gpu import GpuCodes

            self._gpu = GpuCodes(
                self._codes[: self._n],
                self._ids[: self._n],
                self._ids_ascending,
                self._bits,
                self._device,
                self._gpu_backend,
            )
        return self._gpu

    # ---- files ----
    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the index atomically (temp file, fsync, rename): a crash leaves the old file."""
        with self._lock:
            flags = FLAG_IDS_ASCENDING if self._ids_ascending else 0
            write_index_file(path, self._bits, self._codes[: self._n], self._ids[: self._n], flags)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        mmap: bool = True,
        *,
        method: str = "auto",
        threads: int | None = None,
        device: str = "cpu",
        verify: bool = True,
        mih_substrings: int | None = None,
        gpu_backend: str = "triton",
    ) -> HammingIndex:
        """Opens a saved index. With `mmap` the codes and ids are read from the mapped file, not
        copied (the first add or remove copies them). Truncated or corrupted files raise
        IndexFileError; `verify=False` skips the data checksum (which reads the whole file)."""
        contents = read_index_file(path, mmap=mmap, verify=verify)
        index = cls(
            contents.bits,
            method=method,
            threads=threads,
            device=device,
            mih_substrings=mih_substrings,
            gpu_backend=gpu_backend,
        )
        index._codes = contents.codes
        index._ids = contents.ids
        index._n = contents.codes.shape[0]
        index._mapped = bool(mmap)
        index._ids_ascending = _strictly_increasing(contents.ids)
        if index._n:
            index._next_id = int(contents.ids.max()) + 1
        if not index._ids_ascending and index._n:
            # The file was checksummed at save time, but a file may have been written by
            # something else: repeated ids would make results ambiguous.
            if np.unique(contents.ids).size != index._n:
                from ..errors import IndexFileError

                raise IndexFileError(f"{os.fspath(path)}: index file holds repeated ids")
        return index
