"""Retrieval metrics over ranked lists.

Ranking and ties: each query ranks the whole database by distance, ascending; equal distances are
ordered by database id, smaller first (what `HammingIndex.search` returns, and what a stable sort
of the distances in id order gives). So every metric here is a deterministic function of the
distances, and Hamming ties never depend on the search method.

Relevance: an item is relevant to a query when they share a label (1-D integer labels: equal; 2-D
multi-hot labels: any label in common).

Definitions (per query, then averaged over queries):
- AP@k = (1/R_k) * sum_{i<=k} P(i) * rel(i), R_k the relevant items in the top k, P(i) the
  precision of the top i; 0 when R_k = 0. mAP@all is AP@k with k the database size.
- precision@k = relevant in the top k / k.
- recall@N = relevant in the top N / all relevant items of that query (queries without any
  relevant item are left out).
- precision within Hamming radius r = relevant / retrieved among items at distance <= r; a query
  that retrieves nothing scores 0 (the convention of the hashing literature, e.g. CNNH).
- PR curve (Hamming): precision and recall of the set at distance <= r, for r = 0..bits; (ranked
  lists): at cut-offs along the ranking.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from cbir_engine.errors import ShapeError

CHUNK = 128  # queries per block: keeps [chunk, n] int64 rankings at ~70 MB for n = 69,000


def relevance(query_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """bool [nq, n]: whether database item j is relevant to query i."""
    q, d = np.asarray(query_labels), np.asarray(db_labels)
    if q.ndim != d.ndim or q.ndim not in (1, 2):
        raise ShapeError(f"labels must both be 1-D (class ids) or both 2-D (multi-hot), got "
                         f"{q.shape} and {d.shape}")
    if q.ndim == 1:
        return q[:, None] == d[None, :]
    return (q.astype(np.float32) @ d.astype(np.float32).T) > 0


def rank(distances: np.ndarray) -> np.ndarray:
    """Database ids of each row sorted by (distance, id): a stable sort in id order."""
    d = np.asarray(distances)
    if d.ndim != 2:
        raise ShapeError(f"distances must be [queries, database], got {d.shape}")
    return np.argsort(d, axis=1, kind="stable")


def average_precision(ranked_rel: np.ndarray, k: int | None = None) -> np.ndarray:
    """AP@k of each row of bool [nq, n] relevance in ranked order (k=None: the whole ranking)."""
    r = np.asarray(ranked_rel, bool)
    if r.ndim != 2:
        raise ShapeError(f"ranked relevance must be [queries, ranks], got {r.shape}")
    if k is not None:
        r = r[:, :k]
    hits = np.cumsum(r, axis=1, dtype=np.int64)
    pos = np.arange(1, r.shape[1] + 1, dtype=np.float64)
    num = np.where(r, hits / pos, 0.0).sum(axis=1)
    found = hits[:, -1] if r.shape[1] else np.zeros(r.shape[0], np.int64)
    return np.divide(num, found, out=np.zeros(r.shape[0]), where=found > 0)


def _ranked_rel(ranked_ids: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    ids = np.asarray(ranked_ids)
    q, d = np.asarray(query_labels), np.asarray(db_labels)
    if ids.ndim != 2 or ids.shape[0] != q.shape[0]:
        raise ShapeError(f"ranked ids {ids.shape} do not match {q.shape[0]} query labels")
    if q.ndim == 1:
        return d[ids] == q[:, None]
    return (np.einsum("qnl,ql->qn", d[ids].astype(np.float32), q.astype(np.float32))) > 0


def mean_average_precision(ranked_ids: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray,
                           k: int | None = None) -> float:
    """mAP@k over queries from ranked database ids [nq, >= k] (k=None: all of each row)."""
    return float(average_precision(_ranked_rel(ranked_ids, query_labels, db_labels), k).mean())


def precision_at(ranked_ids: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray, k: int) -> float:
    rel = _ranked_rel(np.asarray(ranked_ids)[:, :k], query_labels, db_labels)
    if rel.shape[1] < k:
        raise ShapeError(f"precision@{k} needs at least {k} ranked ids per query, got {rel.shape[1]}")
    return float(rel.mean(axis=1).mean())


def recall_at(ranked_ids: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray, n: int) -> float:
    """Mean over queries (with at least one relevant item) of the share of relevant items in the
    top n."""
    total = relevance(query_labels, db_labels).sum(axis=1)
    got = _ranked_rel(np.asarray(ranked_ids)[:, :n], query_labels, db_labels).sum(axis=1)
    keep = total > 0
    return float((got[keep] / total[keep]).mean()) if keep.any() else 0.0


def precision_within_radius(distances: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray,
                            radius: int = 2) -> tuple[float, float]:
    """(mean precision of the items at Hamming distance <= radius, with 0 for queries that
    retrieve nothing; share of queries that retrieve something)."""
    inside = np.asarray(distances) <= radius
    rel = relevance(query_labels, db_labels)
    n_in = inside.sum(axis=1)
    good = (inside & rel).sum(axis=1)
    prec = np.divide(good, n_in, out=np.zeros(len(n_in)), where=n_in > 0)
    return float(prec.mean()), float((n_in > 0).mean())


def hamming_pr_curve(distances: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray,
                     bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(precision [bits + 1], recall [bits + 1]) of the sets within radius r = 0..bits, averaged
    over queries (precision 0 where a query retrieves nothing)."""
    d = np.asarray(distances)
    rel = relevance(query_labels, db_labels)
    nq = d.shape[0]
    # Histograms of all and of relevant items per distance, then cumulative sums over radius.
    if d.size and (d.min() < 0 or d.max() > bits):
        raise ValueError(f"Hamming distances must lie in [0, {bits}]")
    flat = (np.arange(nq)[:, None] * (bits + 1) + d).ravel()
    size = nq * (bits + 1)
    all_h = np.bincount(flat, minlength=size).reshape(nq, bits + 1)
    rel_h = np.bincount(flat, weights=rel.ravel(), minlength=size).reshape(nq, bits + 1)
    n_in, good = np.cumsum(all_h, 1), np.cumsum(rel_h, 1)
    total = rel.sum(axis=1, keepdims=True)
    prec = np.divide(good, n_in, out=np.zeros(good.shape), where=n_in > 0)
    rec = np.divide(good, total, out=np.zeros(good.shape), where=total > 0)
    return prec.mean(axis=0), rec.mean(axis=0)


def ranked_pr_curve(ranked_ids: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray,
                    points: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) at `points` cut-offs spread over the ranking, averaged over queries."""
    rel = _ranked_rel(ranked_ids, query_labels, db_labels)
    n = rel.shape[1]
    cuts = np.unique(np.geomspace(1, n, points).round().astype(np.int64))
    hits = np.cumsum(rel, axis=1)[:, cuts - 1]
    total = rel.sum(axis=1, keepdims=True)
    prec = hits / cuts[None, :]
    rec = np.divide(hits, total, out=np.zeros(hits.shape), where=total > 0)
    return prec.mean(axis=0), rec.mean(axis=0)


# ---------------------------------------------------------------- whole evaluations
@dataclass
class RetrievalResult:
    """Every metric of one method on one query set."""

    map_all: float
    map_at: dict[int, float] = field(default_factory=dict)
    precision_at: dict[int, float] = field(default_factory=dict)
    recall_at: dict[int, float] = field(default_factory=dict)
    precision_r2: float | None = None   # Hamming codes only
    retrieved_r2: float | None = None   # share of queries with something within radius 2
    pr: tuple[np.ndarray, np.ndarray] | None = None  # (precision, recall)


def _chunks(n: int, size: int = CHUNK) -> Iterator[slice]:
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def _accumulate(ranked_blocks: Iterator[tuple[slice, np.ndarray]], qy: np.ndarray, dy: np.ndarray,
                ks: Sequence[int], ns: Sequence[int]) -> RetrievalResult:
    nq = len(qy)
    ap = np.zeros(nq)
    ap_k = {k: np.zeros(nq) for k in ks}
    p_k = {k: np.zeros(nq) for k in ks}
    r_n = {n: np.zeros(nq) for n in ns}
    total = relevance(qy, dy).sum(axis=1)
    for sl, ids in ranked_blocks:
        rel = _ranked_rel(ids, qy[sl], dy)
        ap[sl] = average_precision(rel)
        for k in ks:
            ap_k[k][sl] = average_precision(rel, k)
            p_k[k][sl] = rel[:, :k].mean(axis=1)
        for n in ns:
            r_n[n][sl] = rel[:, :n].sum(axis=1)
    keep = total > 0
    return RetrievalResult(
        map_all=float(ap.mean()),
        map_at={k: float(v.mean()) for k, v in ap_k.items()},
        precision_at={k: float(v.mean()) for k, v in p_k.items()},
        recall_at={n: float((v[keep] / total[keep]).mean()) if keep.any() else 0.0 for n, v in r_n.items()},
    )


def evaluate_hamming(index: object, query_codes: np.ndarray, query_labels: np.ndarray,
                     db_labels: np.ndarray, *, ks: Sequence[int] = (100, 1000),
                     ns: Sequence[int] = (1, 10, 100), radius: int = 2, pr: bool = True) -> RetrievalResult:
    """Ranks the whole database for each query with `index` (a HammingIndex holding the database
    codes with ids 0..n-1, in the order of `db_labels`) and computes every metric."""
    n = len(db_labels)
    qy, dy = np.asarray(query_labels), np.asarray(db_labels)
    if getattr(index, "ntotal", None) != n:
        raise ShapeError(f"the index holds {getattr(index, 'ntotal', None)} codes, the labels {n}")

    def blocks() -> Iterator[tuple[slice, np.ndarray]]:
        for sl in _chunks(len(qy)):
            _, ids = index.search(query_codes[sl], n)  # type: ignore[attr-defined]
            yield sl, ids

    res = _accumulate(blocks(), qy, dy, ks, ns)
    bits = int(index.bits)  # type: ignore[attr-defined]
    pr_p, pr_r, prec_r, got_r = np.zeros(bits + 1), np.zeros(bits + 1), 0.0, 0.0
    for sl in _chunks(len(qy)):
        d = index.distances(query_codes[sl])  # type: ignore[attr-defined]
        w = (sl.stop - sl.start) / len(qy)
        p, g = precision_within_radius(d, qy[sl], dy, radius)
        prec_r += p * w
        got_r += g * w
        if pr:
            cp, cr = hamming_pr_curve(d, qy[sl], dy, bits)
            pr_p += cp * w
            pr_r += cr * w
    res.precision_r2, res.retrieved_r2 = prec_r, got_r
    res.pr = (pr_p, pr_r) if pr else None
    return res


def evaluate_float(query: np.ndarray, database: np.ndarray, query_labels: np.ndarray,
                   db_labels: np.ndarray, *, metric: str = "l2", ks: Sequence[int] = (100, 1000),
                   ns: Sequence[int] = (1, 10, 100), pr: bool = True) -> RetrievalResult:
    """The same metrics for float descriptors ranked by Euclidean ("l2") or cosine distance."""
    q = np.asarray(query, np.float32)
    db = np.asarray(database, np.float32)
    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
        raise ShapeError(f"descriptors must be [n, dim] of equal dim, got {q.shape} and {db.shape}")
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        db = db / np.maximum(np.linalg.norm(db, axis=1, keepdims=True), 1e-12)
    elif metric != "l2":
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    qy, dy = np.asarray(query_labels), np.asarray(db_labels)
    db_sq = (db.astype(np.float64) ** 2).sum(axis=1)
    pr_acc: list[tuple[np.ndarray, np.ndarray, float]] = []

    def blocks() -> Iterator[tuple[slice, np.ndarray]]:
        for sl in _chunks(len(q)):
            qq = q[sl].astype(np.float64)
            d = (qq ** 2).sum(axis=1)[:, None] - 2 * qq @ db.T.astype(np.float64) + db_sq[None]
            ids = rank(d)
            if pr:
                cp, cr = ranked_pr_curve(ids, qy[sl], dy)
                pr_acc.append((cp, cr, (sl.stop - sl.start) / len(q)))
            yield sl, ids

    res = _accumulate(blocks(), qy, dy, ks, ns)
    if pr:
        res.pr = (sum(p * w for p, _, w in pr_acc), sum(r * w for _, r, w in pr_acc))
    return res


def save_pr_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str, title: str = "") -> None:
    """Writes precision-recall curves {name: (precision, recall)} to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    for name, (p, r) in curves.items():
        ax.plot(r, p, label=name, lw=1.4)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
