"""Plain numpy references for the Hamming kernels: slow, obviously right, what the tests trust.

They follow the same contract as `HammingIndex`: results per query sorted by (distance, id),
`range` inclusive of the radius.
"""

from __future__ import annotations

import numpy as np

_POPCOUNT8 = np.array([bin(v).count("1") for v in range(256)], dtype=np.int32)


def distances_reference(db: np.ndarray, queries: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """Hamming distances int32 [nq, n] between packed uint8 codes (popcount by byte table)."""
    nq, n = queries.shape[0], db.shape[0]
    out = np.empty((nq, n), dtype=np.int32)
    rows = max(1, chunk // max(1, n * db.shape[1]))
    for q0 in range(0, nq, rows):
        x = np.bitwise_xor(queries[q0 : q0 + rows, None, :], db[None, :, :])
        out[q0 : q0 + rows] = _POPCOUNT8[x].sum(axis=-1)
    return out


def knn_reference(
    db: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest by (distance, id): (distances int32 [nq, k], ids int64 [nq, k])."""
    d = distances_reference(db, queries)
    order = np.lexsort((np.broadcast_to(ids, d.shape), d), axis=-1)[:, :k]
    return np.take_along_axis(d, order, axis=1).astype(np.int32), ids[order].astype(np.int64)


def range_reference(
    db: np.ndarray, ids: np.ndarray, queries: np.ndarray, radius: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Everything with distance <= radius: (lims, distances, ids), sorted by (distance, id)."""
    d = distances_reference(db, queries)
    lims = [0]
    dist_parts, id_parts = [], []
    for row in d:
        hit = np.flatnonzero(row <= radius)
        order = np.lexsort((ids[hit], row[hit]))
        dist_parts.append(row[hit][order])
        id_parts.append(ids[hit][order])
        lims.append(lims[-1] + hit.size)
    return (
        np.array(lims, dtype=np.int64),
        np.concatenate(dist_parts).astype(np.int32),
        np.concatenate(id_parts).astype(np.int64),
    )
