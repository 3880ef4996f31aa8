"""k-means (k-means++ seeding, Lloyd iterations) in numpy: the codebooks of NetVLAD and regional
VLAD. Deterministic for a given seed."""

from __future__ import annotations

import numpy as np

from cbir_engine.errors import ShapeError


def _sq_dists(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None], 0.0)


def kmeans(x: np.ndarray, k: int, iters: int = 30, seed: int = 0, tol: float = 1e-6) -> np.ndarray:
    """Centroids float32 [k, d] of the rows of x [n, d] (n >= k)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ShapeError(f"k-means takes [n, d] data, got {x.shape}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of points), got {k}")
    rng = np.random.default_rng(seed)
    # k-means++: each new seed drawn with probability proportional to its squared distance.
    centres = [x[rng.integers(n)]]
    d2 = _sq_dists(x, centres[0][None])[:, 0]
    for _ in range(1, k):
        total = d2.sum()
        i = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        centres.append(x[i])
        d2 = np.minimum(d2, _sq_dists(x, x[i][None])[:, 0])
    c = np.stack(centres)
    prev = np.inf
    for _ in range(iters):
        d = _sq_dists(x, c)
        assign = d.argmin(1)
        inertia = d[np.arange(n), assign].sum()
        for j in range(k):
            members = x[assign == j]
            # An emptied cluster restarts at the point farthest from its centre.
            c[j] = members.mean(0) if len(members) else x[d[np.arange(n), assign].argmax()]
        if prev - inertia <= tol * max(prev, 1e-30):
            break
        prev = inertia
    return c.astype(np.float32)


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for each row of x."""
    return _sq_dists(np.asarray(x, np.float64), np.asarray(centroids, np.float64)).argmin(1)
