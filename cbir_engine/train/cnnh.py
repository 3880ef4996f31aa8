"""CNNH stage 1 (Xia et al. 2014): approximate hash codes H in {-1, 1}^(n x q) for the training
images from their pairwise similarity S (S_ij = 1 for similar pairs, -1 otherwise), minimising

    || S - H H^T / q ||_F^2 .

H is relaxed to [-1, 1], optimised by projected gradient descent with Adam steps, then
binarised by sign and refined by greedy bit flips that lower the objective. For labelled data S
is never formed: S = 2 Y Y^T - 1 1^T with Y the one-hot (or multi-hot, if any shared label means
similar this is an approximation-free form only for single labels) label matrix, so S H costs
O(n q c) instead of O(n^2 q).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cbir_engine.errors import ShapeError

SH = Callable[[np.ndarray], np.ndarray]  # H -> S @ H


def _label_product(labels: np.ndarray) -> tuple[SH, int]:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ShapeError(f"labels must be 1-D class ids, got {y.shape}")
    classes, inv = np.unique(y, return_inverse=True)
    onehot = np.zeros((len(y), len(classes)))
    onehot[np.arange(len(y)), inv] = 1.0

    def s_times(h: np.ndarray) -> np.ndarray:
        return 2.0 * onehot @ (onehot.T @ h) - h.sum(0, keepdims=True)

    return s_times, len(y)


def objective(h: np.ndarray, s: np.ndarray | None = None, labels: np.ndarray | None = None) -> float:
    """||S - H H^T / q||_F^2 / n^2 (mean squared error per pair)."""
    q = h.shape[1]
    if s is None:
        if labels is None:
            raise ValueError("give s or labels")
        s_times, n = _label_product(labels)
        # ||S||^2 - 2/q tr(H^T S H) + ||H^T H||^2 / q^2; ||S||^2 = n^2 (entries +-1)
        t = float(np.sum(h * s_times(h)))
        hh = h.T @ h
        return (n * n - 2.0 / q * t + float(np.sum(hh * hh)) / q / q) / (n * n)
    r = s - h @ h.T / q
    return float(np.mean(r * r))


def learn_codes(bits: int, labels: np.ndarray | None = None, s: np.ndarray | None = None, *,
                iters: int = 300, lr: float = 0.05, seed: int = 0, flip_rounds: int = 2,
                progress: bool = False) -> np.ndarray:
    """Stage 1: codes int8 [n, bits] in {-1, 1} approximating S (from `labels`, or a dense ±1
    similarity `s` [n, n])."""
    if s is not None:
        s = np.asarray(s, np.float64)
        if s.ndim != 2 or s.shape[0] != s.shape[1]:
            raise ShapeError(f"S must be square, got {s.shape}")
        n = s.shape[0]

        def s_times(h: np.ndarray) -> np.ndarray:
            return s @ h
    elif labels is not None:
        s_times, n = _label_product(labels)
    else:
        raise ValueError("give labels or a similarity matrix s")
    q = int(bits)
    rng = np.random.default_rng(seed)
    h = rng.uniform(-1, 1, (n, q)) * 0.1
    m, v = np.zeros_like(h), np.zeros_like(h)
    b1, b2 = 0.9, 0.999
    bar = _bar(iters, progress, "CNNH stage 1")
    for t in range(1, iters + 1):
        # d/dH ||S - HH^T/q||^2 = -4/q (S H - H (H^T H) / q), scaled per pair
        g = -4.0 / q * (s_times(h) - h @ (h.T @ h) / q) / (n * n)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        h -= lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + 1e-12)
        np.clip(h, -1.0, 1.0, out=h)
        bar.update(1)
    bar.close()
    codes = np.where(h >= 0, 1.0, -1.0)
    for _ in range(flip_rounds):
        if not _flip_pass(codes, s_times, q):
            break
    return codes.astype(np.int8)


def _flip_pass(h: np.ndarray, s_times: SH, q: int) -> bool:
    """One sweep over bits: flips column entries where that lowers the objective (exact change
    of ||S - HH^T/q||^2 for flipping h_ij with the other entries fixed, applied per column with
    the column's current state)."""
    improved = False
    for j in range(q):
        # Objective change of flipping h_ij alone: 8/q^2 * (h_ij * (sum_k h_kj... )) - see below.
        # With r = S - HH^T/q, flipping h_ij -> -h_ij changes row/column i of HH^T by
        # -2 h_ij h_kj for k != i, so delta = sum_{k != i} 2 * [ (r_ik + 2 h_ij h_kj / q)^2 - r_ik^2 ]
        #       = sum_{k != i} 2 * [ 4 r_ik h_ij h_kj / q + 4 / q^2 ]  (h entries are +-1)
        # and sum_k r_ik h_kj = (S h_j)_i - (H (H^T h_j))_i / q.
        hj = h[:, j:j + 1]
        r_h = s_times(hj)[:, 0] - (h @ (h.T @ hj))[:, 0] / q
        # remove the k = i term: r_ii h_ij = (S_ii - ||h_i||^2 / q) h_ij = (1 - 1) h_ij = 0
        n = h.shape[0]
        delta = 8.0 / q * hj[:, 0] * r_h + 8.0 * (n - 1) / (q * q)
        flip = delta < -1e-9
        if not flip.any():
            continue
        # Each delta assumes the other entries stay; flipping many at once can overshoot, so
        # try the most helpful half and keep it only if the objective really drops.
        before = _objective_with(h, s_times)
        chosen = np.argsort(delta)[: max(1, int(flip.sum()) // 2)]
        h[chosen, j] *= -1.0
        if _objective_with(h, s_times) < before:
            improved = True
        else:
            h[chosen, j] *= -1.0
    return improved


def _objective_with(h: np.ndarray, s_times: SH) -> float:
    """||S - HH^T/q||^2 up to the constant ||S||^2."""
    q = h.shape[1]
    hh = h.T @ h
    return -2.0 / q * float(np.sum(h * s_times(h))) + float(np.sum(hh * hh)) / q / q


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def set_postfix(self, **kw: object) -> None:
        pass


def _bar(total: int, enabled: bool, desc: str) -> object:
    if not enabled:
        return _NullBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False)
