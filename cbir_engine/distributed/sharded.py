"""`ShardedHammingIndex`: exact Hamming search over codes split across Ray actors, each holding a
`HammingIndex`; queries go to every shard and the per-shard top-k lists merge into the top-k of
one index over all codes.

Why the merge is exact: every shard returns its k best codes in the total order (distance, id),
the order `HammingIndex` ranks by. The k best of the union are among the k best of each shard,
so sorting the shards' lists together by (distance, id) and keeping k gives exactly what one
index over all the codes returns, ties included.

A shard whose actor dies is never skipped silently: a search raises `ShardUnavailableError`
naming it, or, with `allow_partial=True`, returns the results of the live shards together with
the numbers of the missing ones. Shard actors are not restarted by Ray unless they were loaded
from files (`from_files`): a restarted actor would come back empty and answer wrongly.

    index = ShardedHammingIndex(64, shards=4)
    index.add(codes, ids)
    result = index.search(queries, k=10)
    result.distances, result.ids, result.missing_shards
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from cbir_engine.errors import CbirError, DTypeError, ShapeError
from cbir_engine.index import HammingIndex, IndexArgumentError
from cbir_engine.index.bits import check_codes, code_bytes_for


class ShardUnavailableError(CbirError, RuntimeError):
    """One or more shards did not answer (their actors died or timed out)."""

    def __init__(self, shards: Sequence[int], detail: str, searching: bool = True) -> None:
        self.shards = tuple(shards)
        hint = "; allow_partial=True gives the other shards' results" if searching else ""
        super().__init__(f"shard{'s' if len(self.shards) > 1 else ''} {', '.join(map(str, self.shards))} "
                         f"did not answer ({detail}){hint}")


class ShardedResult(NamedTuple):
    """Search results: distances int32 [nq, k'] and ids int64 [nq, k'], rows sorted by
    (distance, id); k' = min(k, codes held by the answering shards). `missing_shards` lists the
    shards that did not answer (empty for a complete answer)."""

    distances: np.ndarray
    ids: np.ndarray
    missing_shards: tuple[int, ...]

    @property
    def complete(self) -> bool:
        return not self.missing_shards


class ShardedRangeResult(NamedTuple):
    """Range search results in HammingIndex.range_search's form (lims, distances, ids) plus the
    shards that did not answer."""

    lims: np.ndarray
    distances: np.ndarray
    ids: np.ndarray
    missing_shards: tuple[int, ...]


def _canonical_codes(a: np.ndarray) -> np.ndarray:
    """The same bytes under numpy's own uint8 dtype object. Arrays that arrive through Ray's
    serialisation carry an equal but distinct dtype instance, which the C++ search entry points
    refuse ("must be uint8": they compare dtypes by identity). A view, not a copy."""
    return np.ascontiguousarray(a).view(np.uint8)


class HammingShard:
    """The body of one shard actor: a HammingIndex, loaded from `path` when given (so a restarted
    actor comes back with its codes)."""

    def __init__(self, bits: int, threads: int | None, path: str | None = None) -> None:
        import ray

        held = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
        threads = threads or max(1, int(held))
        if path is not None:
            self.index = HammingIndex.load(path, mmap=False, threads=threads)
            if self.index.bits != bits:
                raise ShapeError(f"{path} holds {self.index.bits}-bit codes, not {bits}")
        else:
            self.index = HammingIndex(bits, threads=threads)

    def add(self, codes: np.ndarray, ids: np.ndarray) -> int:
        self.index.add(_canonical_codes(codes), ids)
        return self.index.ntotal

    def remove(self, ids: np.ndarray) -> int:
        return self.index.remove(ids)

    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.index.ntotal
        if n == 0:
            return np.empty((len(queries), 0), np.int32), np.empty((len(queries), 0), np.int64)
        return self.index.search(_canonical_codes(queries), min(k, n))

    def range_search(self, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.index.range_search(_canonical_codes(queries), radius)

    def save(self, path: str) -> None:
        self.index.save(path)

    def pid(self) -> int:
        return os.getpid()


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best per row of several (distances [nq, ki], ids [nq, ki]) lists, by (distance, id)."""
    dist = np.concatenate([np.asarray(d, np.int64) for d, _ in parts], axis=1)
    ids = np.concatenate([np.asarray(i, np.int64) for _, i in parts], axis=1)
    k = min(k, dist.shape[1])
    # One sort key per entry: distances are small non-negative ints, so order by (distance, id)
    # with a stable sort on id first, then on distance.
    by_id = np.argsort(ids, axis=1, kind="stable")
    dist = np.take_along_axis(dist, by_id, axis=1)
    ids = np.take_along_axis(ids, by_id, axis=1)
    by_dist = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return (np.take_along_axis(dist, by_dist, axis=1).astype(np.int32),
            np.take_along_axis(ids, by_dist, axis=1))


class ShardedHammingIndex:
    """Hamming search over `shards` Ray actors of `cpus_per_shard` CPUs each (fractions allowed).

    Codes go to shard `id mod shards`, so a remove reaches only the shard that holds the id.
    Needs a running Ray connection (`ray.init`) in this process."""

    def __init__(self, bits: int, shards: int = 4, *, cpus_per_shard: float = 0.5,
                 threads_per_shard: int | None = None, paths: Sequence[str | os.PathLike[str]] | None = None,
                 max_restarts: int | None = None) -> None:
        import ray

        code_bytes_for(bits)  # checks bits
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise IndexArgumentError(f"shards must be a positive int, got {shards!r}")
        if paths is not None and len(paths) != shards:
            raise IndexArgumentError(f"{len(paths)} shard files for {shards} shards")
        if not ray.is_initialized():
            raise CbirError("ShardedHammingIndex needs a Ray connection: call ray.init(address=...) first")
        self._bits = int(bits)
        self._n_shards = shards
        if max_restarts is None:
            max_restarts = 3 if paths is not None else 0
        if max_restarts and paths is None:
            raise IndexArgumentError("shards held only in memory cannot be restarted (they would come back "
                                     "empty); use max_restarts=0, or load the shards from files")
        actor = ray.remote(HammingShard).options(num_cpus=cpus_per_shard, max_restarts=max_restarts,
                                                 max_task_retries=-1 if max_restarts else 0)
        self._actors = [actor.remote(self._bits, threads_per_shard,
                                     os.fspath(paths[s]) if paths is not None else None)
                        for s in range(shards)]
        # Wait for the constructors, so a bad shard file fails here and not in the first search.
        # The driver keeps each shard's size: k is checked before anything is sent.
        self._counts = [int(c) for c in ray.get([a.ntotal.remote() for a in self._actors])]

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike[str]], **kwargs: Any) -> ShardedHammingIndex:
        """Shards loaded from HammingIndex files (one per shard, e.g. from `save_shards`); the
        files must be readable where the actors run."""
        if not paths:
            raise IndexArgumentError("no shard files given")
        from cbir_engine.index.files import read_index_file

        bits = read_index_file(paths[0], mmap=True, verify=False).bits
        return cls(bits, len(paths), paths=[os.fspath(p) for p in paths], **kwargs)

    @property
    def bits(self) -> int:
        return self._bits

    @property
    def shards(self) -> int:
        return self._n_shards

    @property
    def actors(self) -> list[Any]:
        """The shard actor handles (for inspection and fault tests)."""
        return list(self._actors)

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        return np.mod(np.asarray(ids, np.int64), self._n_shards)

    # ------------------------------------------------------------------ changes
    def add(self, codes: Any, ids: Any) -> None:
        """Adds codes (uint8 [n, bits // 8]) with their int64 ids (unique per shard: ids are
        routed by value, so an id repeated anywhere lands on one shard, which refuses it)."""
        import ray

        codes = check_codes(codes, self._bits, "codes")
        ids_a = np.asarray(ids)
        if ids_a.dtype == np.bool_ or not np.issubdtype(ids_a.dtype, np.integer):
            raise DTypeError(f"ids must be integers (int64), got {ids_a.dtype}")
        if ids_a.shape != (codes.shape[0],):
            raise ShapeError(f"ids must be 1-D with one id per code ({codes.shape[0]}), got {ids_a.shape}")
        ids_a = ids_a.astype(np.int64)
        where = self.shard_of(ids_a)
        sent = {}
        for s, a in enumerate(self._actors):
            sel = np.flatnonzero(where == s)
            if sel.size:
                sent[s] = a.add.remote(codes[sel], ids_a[sel])
        dead = {}
        for s, ref in sent.items():
            try:
                self._counts[s] = int(ray.get(ref))
            except ray.exceptions.RayActorError as e:
                dead[s] = f"actor died: {type(e).__name__}"
        if dead:  # the live shards took their codes; the caller decides what to do with the rest
            raise ShardUnavailableError(sorted(dead), "; ".join(f"{s}: {m}" for s, m in dead.items())
                                        + "; the live shards added their codes", searching=False)

    def remove(self, ids: Any) -> int:
        import ray

        ids_a = np.asarray(ids, np.int64).ravel()
        where = self.shard_of(ids_a)
        sent = {s: a.remove.remote(ids_a[where == s])
                for s, a in enumerate(self._actors) if (where == s).any()}
        removed = 0
        for s, ref in sent.items():
            gone = int(ray.get(ref))
            self._counts[s] -= gone
            removed += gone
        return removed

    @property
    def ntotal(self) -> int:
        """Codes held, as the driver counted them (no round trip to the shards)."""
        return int(sum(self._counts))

    def __len__(self) -> int:
        return self.ntotal

    def save_shards(self, folder: str | os.PathLike[str]) -> list[str]:
        """Each shard's codes as a HammingIndex file `shard-XXXX.hidx` in `folder` (written by the
        actor, atomically); the paths, for `from_files`."""
        import ray

        os.makedirs(folder, exist_ok=True)
        paths = [os.path.join(os.path.abspath(folder), f"shard-{s:04d}.hidx") for s in range(self._n_shards)]
        ray.get([a.save.remote(p) for a, p in zip(self._actors, paths, strict=True)])
        return paths

    # ------------------------------------------------------------------ search
    def _gather(self, refs: list[Any], timeout: float | None) -> tuple[dict[int, Any], dict[int, str]]:
        import ray

        got: dict[int, Any] = {}
        failed: dict[int, str] = {}
        ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        index_of = {r: s for s, r in enumerate(refs)}
        for r in waiting:
            failed[index_of[r]] = f"no answer within {timeout} s"
        for r in ready:
            s = index_of[r]
            try:
                got[s] = ray.get(r)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                failed[s] = f"actor died: {type(e).__name__}"
        return got, failed

    def search(self, queries: Any, k: int, *, allow_partial: bool = False,
               timeout: float | None = None) -> ShardedResult:
        """The k nearest codes of each query over all shards (exactly `HammingIndex.search`'s
        answer over the same codes). A shard that does not answer (dead, or slower than `timeout`
        seconds) raises ShardUnavailableError, or with `allow_partial` is left out and named in
        the result's `missing_shards`."""
        q = check_codes(queries, self._bits, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.ntotal:
            raise IndexArgumentError(f"k must be in [1, {self.ntotal}] (the number of codes), got {k!r}")
        refs = [a.search.remote(q, int(k)) for a in self._actors]
        got, failed = self._gather(refs, timeout)
        missing = tuple(sorted(failed))
        if missing and not allow_partial:
            raise ShardUnavailableError(missing, "; ".join(f"{s}: {failed[s]}" for s in missing))
        parts = [got[s] for s in sorted(got)]
        if not parts:
            return ShardedResult(np.empty((len(q), 0), np.int32), np.empty((len(q), 0), np.int64), missing)
        d, i = merge_topk(parts, int(k))
        return ShardedResult(d, i, missing)

    def range_search(self, queries: Any, radius: int, *, allow_partial: bool = False,
                     timeout: float | None = None) -> ShardedRangeResult:
        """Every code within `radius` (inclusive, as HammingIndex.range_search) of each query,
        sorted by (distance, id), gathered from all shards."""
        q = check_codes(queries, self._bits, "queries")
        if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
            raise IndexArgumentError(f"radius must be a non-negative int, got {radius!r}")
        refs = [a.range_search.remote(q, int(radius)) for a in self._actors]
        got, failed = self._gather(refs, timeout)
        missing = tuple(sorted(failed))
        if missing and not allow_partial:
            raise ShardUnavailableError(missing, "; ".join(f"{s}: {failed[s]}" for s in missing))
        nq = len(q)
        lims = np.zeros(nq + 1, np.int64)
        dist_rows: list[np.ndarray] = []
        id_rows: list[np.ndarray] = []
        for row in range(nq):
            d = np.concatenate([got[s][1][got[s][0][row]:got[s][0][row + 1]] for s in sorted(got)] or
                               [np.empty(0, np.int32)])
            i = np.concatenate([got[s][2][got[s][0][row]:got[s][0][row + 1]] for s in sorted(got)] or
                               [np.empty(0, np.int64)])
            order = np.lexsort((i, d))
            dist_rows.append(d[order].astype(np.int32))
            id_rows.append(i[order].astype(np.int64))
            lims[row + 1] = lims[row] + len(order)
        dist = np.concatenate(dist_rows) if dist_rows else np.empty(0, np.int32)
        ids = np.concatenate(id_rows) if id_rows else np.empty(0, np.int64)
        return ShardedRangeResult(lims, dist, ids, missing)

    def close(self) -> None:
        """Ends the shard actors."""
        import ray

        for a in self._actors:
            ray.kill(a, no_restart=True)
        self._actors = []

    def __repr__(self) -> str:
        return f"ShardedHammingIndex(bits={self._bits}, shards={self._n_shards})"
