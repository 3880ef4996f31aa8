"""Classic unsupervised hashing baselines on float features (numpy only):
random-hyperplane LSH (Charikar 2002) and ITQ (Gong & Lazebnik 2011)."""

from __future__ import annotations

import numpy as np

from cbir_engine.errors import ShapeError


def _check(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ShapeError(f"{what} must be [n, d], got {x.shape}")
    return x


class LSH:
    """codes = sign((x - mean) R), R with i.i.d. N(0, 1) entries: each bit a random hyperplane
    through the data mean."""

    def __init__(self, bits: int, seed: int = 0) -> None:
        self.bits, self.seed = bits, seed
        self.mean: np.ndarray | None = None
        self.planes: np.ndarray | None = None

    def fit(self, x: np.ndarray) -> LSH:
        x = _check(x, "features")
        self.mean = x.mean(0)
        self.planes = np.random.default_rng(self.seed).standard_normal((x.shape[1], self.bits))
        return self

    def project(self, x: np.ndarray) -> np.ndarray:
        """The pre-sign values [n, bits]; codes are their signs."""
        if self.planes is None or self.mean is None:
            raise RuntimeError("fit() first")
        return (_check(x, "features") - self.mean) @ self.planes


class ITQ:
    """Iterative quantisation: centre, PCA to `bits` dims, then alternately binarise B = sign(VR)
    and solve the orthogonal Procrustes problem min_R ||B - VR||_F (R = U W^T from the SVD of
    V^T B = U S W^T), from a random rotation."""

    def __init__(self, bits: int, iters: int = 50, seed: int = 0) -> None:
        self.bits, self.iters, self.seed = bits, iters, seed
        self.mean: np.ndarray | None = None
        self.pca: np.ndarray | None = None
        self.rotation: np.ndarray | None = None

    def fit(self, x: np.ndarray) -> ITQ:
        x = _check(x, "features")
        if self.bits > x.shape[1]:
            raise ShapeError(f"ITQ needs bits <= feature dim ({x.shape[1]}), got {self.bits}")
        self.mean = x.mean(0)
        xc = x - self.mean
        lam, vec = np.linalg.eigh(xc.T @ xc)
        self.pca = vec[:, np.argsort(lam)[::-1][: self.bits]]
        v = xc @ self.pca
        rng = np.random.default_rng(self.seed)
        r, _ = np.linalg.qr(rng.standard_normal((self.bits, self.bits)))
        for _ in range(self.iters):
            b = np.where(v @ r >= 0, 1.0, -1.0)
            u, _, wt = np.linalg.svd(v.T @ b)
            r = u @ wt
        self.rotation = r
        return self

    def quantization_error(self, x: np.ndarray) -> float:
        v = self.project(x)
        return float(np.mean((np.where(v >= 0, 1.0, -1.0) - v) ** 2))

    def project(self, x: np.ndarray) -> np.ndarray:
        if self.rotation is None or self.pca is None or self.mean is None:
            raise RuntimeError("fit() first")
        return (_check(x, "features") - self.mean) @ self.pca @ self.rotation


def pack_signs(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Packs the signs of [n, bits] values into codes, padding with clear bits up to a multiple
    of 8 (padding adds 0 to every Hamming distance). Returns (codes, padded bit count)."""
    from cbir_engine.index import pack_bits

    v = np.asarray(values)
    pad = (-v.shape[1]) % 8
    return pack_bits(np.pad(v, ((0, 0), (0, pad)))), v.shape[1] + pad
