"""Milvus as the serving store for binary codes: export a `HammingIndex` (or an on-disk
`Collection`) into a Milvus collection of BINARY_VECTOR codes with the HAMMING metric, and search
it through pymilvus with results in `HammingIndex`'s form and order.

    from cbir_engine.index.milvus import MilvusHammingIndex
    m = MilvusHammingIndex.export(index, "codes.db", "photos")      # Milvus Lite: a local file
    m = MilvusHammingIndex.export(index, "http://milvus:19530", "photos", index_type="BIN_IVF_FLAT")
    distances, ids = m.search(queries, k=10)

Milvus Lite (a local file as the URI; milvus-lite 2.5.1, the last release that stores binary
vectors) supports only the BIN_FLAT index; BIN_IVF_FLAT (approximate: `nlist` lists, `nprobe`
probed) needs a Milvus server. Codes are stored as they are packed here: the house layout is
byte for byte what Milvus takes, and Hamming distance counts differing bits either way.

Where Milvus and HammingIndex differ, and what this module does about it:
- Ties: Milvus orders codes at equal distance as it likes and may pick any of the codes tied at
  the k-th distance. `search(..., exact_ties=True)` (the default) asks Milvus once more for the
  codes at exactly that distance and keeps the smallest ids, so results equal HammingIndex's
  (distance, id) order exactly (on BIN_FLAT).
- Range search: Milvus keeps range_filter <= distance < radius (exclusive at the radius), ours
  keeps distance <= radius; `range_search(q, r)` asks Milvus for radius r + 1.
- Milvus caps the results of one query (`MAX_LIMIT`); a range query that reaches the cap could
  be missing codes, so it raises MilvusLimitError instead of answering short.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import sys
import time
import types
from typing import Any

import numpy as np

from ..errors import CbirError, IndexArgumentError, ShapeError
from .bits import check_codes, code_bytes_for

__all__ = ["MilvusHammingIndex", "MilvusLimitError", "MilvusUnavailableError", "MAX_LIMIT"]

MAX_LIMIT = 16384  # Milvus's largest topk / limit per query
_QUERY_BATCH = 256  # queries per request (keeps request messages small)
_INSERT_BATCH = 10_000
_ID_FIELD = "id"
_CODE_FIELD = "code"
# Open MilvusHammingIndex objects per Milvus Lite file: pymilvus runs one local server per file,
# shared by every client of this process; the last one to close stops it.
_LOCAL_USERS: dict[str, int] = {}


class MilvusUnavailableError(CbirError, RuntimeError):
    """pymilvus / milvus-lite are not installed, or the Milvus server cannot be reached."""


class MilvusLimitError(CbirError, ValueError):
    """A query needs more results than Milvus returns for one query (MAX_LIMIT)."""


def _client(pymilvus: Any, uri: str, token: str, wait_s: float = 60.0) -> Any:
    """A MilvusClient. For a Milvus Lite file pymilvus starts the local server and connects at
    once; on a busy machine the server may not listen yet, so the connection is tried again
    (the server, once started, is reused) for up to `wait_s` seconds."""
    deadline = time.monotonic() + (wait_s if _is_local(uri) else 0.0)
    while True:
        try:
            return pymilvus.MilvusClient(uri=uri, token=token)
        except Exception as e:  # pymilvus raises MilvusException and connection errors of its own
            if time.monotonic() >= deadline:
                raise MilvusUnavailableError(f"cannot connect to Milvus at {uri}: {e}") from e
            time.sleep(1.0)


def _is_local(uri: str) -> bool:
    """Milvus Lite takes a file path; servers take http(s):// or tcp:// addresses."""
    return "://" not in uri


def _import_pymilvus() -> Any:
    """pymilvus, with milvus-lite importable. milvus-lite 2.5.1 imports pkg_resources, which
    setuptools 81 and later no longer ship; it only reads its own version with it, so a stand-in
    answering from importlib.metadata is put in place for that one import and taken away again
    (other code keeps seeing pkg_resources missing, as it is)."""
    try:
        import pymilvus
    except ImportError as e:
        raise MilvusUnavailableError("Milvus support needs pymilvus: "
                                     "pip install 'cbir-engine[distributed]'") from e
    if "milvus_lite" not in sys.modules:
        stand_in = None
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            stand_in = types.ModuleType("pkg_resources")

            class DistributionNotFound(Exception):
                pass

            def get_distribution(name: str) -> Any:
                try:
                    return types.SimpleNamespace(version=importlib.metadata.version(name))
                except importlib.metadata.PackageNotFoundError as e:
                    raise DistributionNotFound(name) from e

            stand_in.DistributionNotFound = DistributionNotFound  # type: ignore[attr-defined]
            stand_in.get_distribution = get_distribution  # type: ignore[attr-defined]
            sys.modules["pkg_resources"] = stand_in
        try:
            import milvus_lite  # noqa: F401
        except ImportError:
            pass  # only a server URI will work; said when one is opened
        finally:
            if stand_in is not None and sys.modules.get("pkg_resources") is stand_in:
                del sys.modules["pkg_resources"]
    return pymilvus


class MilvusHammingIndex:
    """A Milvus collection of binary codes (field `code`, BINARY_VECTOR of `bits`) keyed by int64
    `id`. Open an existing collection with the constructor, make one with `create` or `export`."""

    def __init__(self, uri: str | os.PathLike[str], collection: str, *, token: str = "",
                 nprobe: int = 16) -> None:
        pymilvus = _import_pymilvus()
        self.uri = os.fspath(uri)
        if _is_local(self.uri):
            self.uri = os.path.abspath(self.uri)
            if "milvus_lite" not in sys.modules:
                raise MilvusUnavailableError("a local Milvus file needs milvus-lite: "
                                             "pip install 'milvus-lite==2.5.1'")
        self.collection = collection
        self.nprobe = int(nprobe)
        self._closed = True
        self._client = _client(pymilvus, self.uri, token)
        self._closed = False
        if _is_local(self.uri):
            _LOCAL_USERS[self.uri] = _LOCAL_USERS.get(self.uri, 0) + 1
        if not self._client.has_collection(collection):
            self.close()
            raise IndexArgumentError(f"Milvus at {self.uri} has no collection {collection!r}")
        self._describe()

    def _describe(self) -> None:
        info = self._client.describe_collection(self.collection)
        code = next((f for f in info["fields"] if f["name"] == _CODE_FIELD), None)
        if code is None or int(code.get("params", {}).get("dim", 0)) <= 0:
            raise IndexArgumentError(f"collection {self.collection!r} has no binary '{_CODE_FIELD}' field: "
                                     "not made by cbir_engine")
        self.bits = int(code["params"]["dim"])
        self.code_bytes = code_bytes_for(self.bits)
        indexes = self._client.list_indexes(self.collection, field_name=_CODE_FIELD)
        desc = self._client.describe_index(self.collection, indexes[0]) if indexes else {}
        self.index_type = str(desc.get("index_type", "BIN_FLAT"))
        self._client.load_collection(self.collection)

    # ------------------------------------------------------------------ making collections
    @classmethod
    def create(cls, uri: str | os.PathLike[str], collection: str, bits: int, *,
               index_type: str = "BIN_FLAT", nlist: int = 1024, token: str = "",
               drop_existing: bool = False, nprobe: int = 16) -> MilvusHammingIndex:
        """An empty collection for `bits`-bit codes with a BIN_FLAT (exact) or BIN_IVF_FLAT
        (approximate, `nlist` lists; Milvus servers only) index and the HAMMING metric."""
        pymilvus = _import_pymilvus()
        code_bytes_for(bits)
        if index_type not in ("BIN_FLAT", "BIN_IVF_FLAT"):
            raise IndexArgumentError(f"index_type must be 'BIN_FLAT' or 'BIN_IVF_FLAT', got {index_type!r}")
        uri = os.fspath(uri)
        if _is_local(uri) and index_type != "BIN_FLAT":
            raise IndexArgumentError("Milvus Lite (a local file) supports only BIN_FLAT for binary codes; "
                                     "BIN_IVF_FLAT needs a Milvus server (an http:// URI)")
        if _is_local(uri):
            uri = os.path.abspath(uri)
            os.makedirs(os.path.dirname(uri), exist_ok=True)
        client = _client(pymilvus, uri, token)
        try:
            if client.has_collection(collection):
                if not drop_existing:
                    raise IndexArgumentError(f"Milvus at {uri} already has a collection {collection!r} "
                                             "(drop_existing=True replaces it)")
                client.drop_collection(collection)
            schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field(_ID_FIELD, pymilvus.DataType.INT64, is_primary=True)
            schema.add_field(_CODE_FIELD, pymilvus.DataType.BINARY_VECTOR, dim=int(bits))
            params = client.prepare_index_params()
            extra = {"nlist": int(nlist)} if index_type == "BIN_IVF_FLAT" else {}
            params.add_index(field_name=_CODE_FIELD, index_type=index_type, metric_type="HAMMING",
                             params=extra)
            client.create_collection(collection, schema=schema, index_params=params)
        finally:
            client.close()
        return cls(uri, collection, token=token, nprobe=nprobe)

    @classmethod
    def export(cls, index: Any, uri: str | os.PathLike[str], collection: str, *,
               index_type: str = "BIN_FLAT", nlist: int = 1024, token: str = "",
               drop_existing: bool = False, nprobe: int = 16) -> MilvusHammingIndex:
        """A new collection holding the codes and ids of `index`: a HammingIndex, or an on-disk
        Collection of binary codes (cbir_engine.store.Collection)."""
        hamming = getattr(index, "index", index)  # a Collection holds its HammingIndex as .index
        if getattr(index, "kind", "binary") != "binary" or not hasattr(hamming, "bits"):
            raise IndexArgumentError("only binary codes go to Milvus (this index holds float descriptors)")
        out = cls.create(uri, collection, hamming.bits, index_type=index_type, nlist=nlist, token=token,
                         drop_existing=drop_existing, nprobe=nprobe)
        out.add(np.asarray(hamming.codes), np.asarray(hamming.ids))
        return out

    def add(self, codes: Any, ids: Any) -> None:
        """Inserts codes (uint8 [n, bits // 8]) with int64 ids, then flushes, so searches that
        follow see them."""
        codes = check_codes(codes, self.bits, "codes")
        ids = np.asarray(ids)
        if ids.shape != (codes.shape[0],) or not np.issubdtype(ids.dtype, np.integer):
            raise ShapeError(f"ids must be integers, one per code ({codes.shape[0]}), got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        ids = ids.astype(np.int64)
        for s in range(0, len(ids), _INSERT_BATCH):
            rows = [{_ID_FIELD: int(i), _CODE_FIELD: c.tobytes()}
                    for i, c in zip(ids[s:s + _INSERT_BATCH], codes[s:s + _INSERT_BATCH], strict=True)]
            self._client.insert(self.collection, rows)
        self._client.flush(self.collection)

    @property
    def ntotal(self) -> int:
        res = self._client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def __len__(self) -> int:
        return self.ntotal

    # ------------------------------------------------------------------ search
    def _params(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"nprobe": self.nprobe} if self.index_type == "BIN_IVF_FLAT" else {}
        params.update(extra or {})
        return {"metric_type": "HAMMING", "params": params}

    def _raw(self, queries: np.ndarray, limit: int, extra: dict[str, Any] | None = None,
             ) -> list[list[tuple[int, int]]]:
        """(distance, id) lists per query, as Milvus answers."""
        out: list[list[tuple[int, int]]] = []
        for s in range(0, len(queries), _QUERY_BATCH):
            data = [q.tobytes() for q in queries[s:s + _QUERY_BATCH]]
            res = self._client.search(self.collection, data=data, anns_field=_CODE_FIELD, limit=limit,
                                      search_params=self._params(extra), output_fields=[])
            for hits in res:
                out.append([(int(round(h["distance"])), int(h["id"])) for h in hits])
        return out

    def search(self, queries: Any, k: int, *, exact_ties: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest codes of each query: (distances int32 [nq, k], ids int64 [nq, k]), rows
        sorted by (distance, id). With `exact_ties`, among codes tied at the k-th distance the
        smallest ids are kept (HammingIndex's answer exactly, on BIN_FLAT); without, Milvus's pick."""
        q = check_codes(queries, self.bits, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise IndexArgumentError(f"k must be a positive int, got {k!r}")
        k = int(k)
        if k > MAX_LIMIT:
            raise MilvusLimitError(f"k = {k}: Milvus returns at most {MAX_LIMIT} results per query")
        n = self.ntotal
        if k > n:
            raise IndexArgumentError(f"k must be in [1, {n}] (the number of codes), got {k}")
        found = self._raw(q, k)
        dist = np.empty((len(q), k), np.int32)
        ids = np.empty((len(q), k), np.int64)
        for row, hits in enumerate(found):
            hits.sort()
            if exact_ties and len(hits) == k:
                hits = self._fix_boundary(q[row], hits, k)
            if len(hits) != k:
                raise CbirError(f"Milvus returned {len(hits)} results for query {row}, expected {k}")
            dist[row] = [d for d, _ in hits]
            ids[row] = [i for _, i in hits]
        return dist, ids

    def _fix_boundary(self, query: np.ndarray, hits: list[tuple[int, int]], k: int) -> list[tuple[int, int]]:
        """Replaces the codes at the k-th distance with the smallest-id codes at that distance."""
        last = hits[-1][0]
        inside = [h for h in hits if h[0] < last]  # every code closer than `last` is among the k
        need = k - len(inside)
        # Codes at exactly `last`: range_filter <= distance < radius.
        tied = self._raw(query[None], MAX_LIMIT, {"radius": last + 1, "range_filter": last})[0]
        if len(tied) >= MAX_LIMIT:
            raise MilvusLimitError(f"{len(tied)}+ codes tie at distance {last}: more than Milvus returns "
                                   "for one query, so the smallest ids cannot be chosen (exact_ties=False "
                                   "takes Milvus's pick)")
        tied.sort()
        return inside + tied[:need]

    def range_search(self, queries: Any, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every code within `radius` of each query, inclusive (distance <= radius) as
        HammingIndex.range_search: (lims int64 [nq + 1], distances int32, ids int64), each query's
        results sorted by (distance, id). MilvusLimitError when a query reaches MAX_LIMIT results."""
        q = check_codes(queries, self.bits, "queries")
        if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
            raise IndexArgumentError(f"radius must be a non-negative int, got {radius!r}")
        radius = min(int(radius), self.bits)
        # Milvus keeps range_filter <= distance < radius: one more than ours for the same set.
        found = self._raw(q, MAX_LIMIT, {"radius": radius + 1, "range_filter": 0})
        lims = np.zeros(len(q) + 1, np.int64)
        dist: list[int] = []
        ids: list[int] = []
        for row, hits in enumerate(found):
            if len(hits) >= MAX_LIMIT:
                raise MilvusLimitError(f"query {row} has {MAX_LIMIT}+ codes within radius {radius}: more "
                                       "than Milvus returns for one query; use a smaller radius")
            hits.sort()
            dist.extend(d for d, _ in hits)
            ids.extend(i for _, i in hits)
            lims[row + 1] = len(dist)
        return lims, np.asarray(dist, np.int32), np.asarray(ids, np.int64)

    # ------------------------------------------------------------------ closing
    def drop(self) -> None:
        """Deletes the collection from Milvus."""
        self._client.drop_collection(self.collection)

    def close(self) -> None:
        """Closes the connection; for Milvus Lite, when no other open MilvusHammingIndex of this
        process uses the file, also stops the local server process that pymilvus started for it."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._client.close()
        if not _is_local(self.uri):
            return
        _LOCAL_USERS[self.uri] -= 1
        if _LOCAL_USERS[self.uri] == 0:
            del _LOCAL_USERS[self.uri]
            if "milvus_lite" in sys.modules:
                from milvus_lite.server_manager import server_manager_instance

                with contextlib.suppress(Exception):
                    server_manager_instance.release_server(self.uri)

    def __enter__(self) -> MilvusHammingIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MilvusHammingIndex({self.uri!r}, {self.collection!r}, bits={self.bits}, {self.index_type})"
