"""Retrieval heads as torch modules that export to ONNX with standard operators the engine runs.

Each head maps a conv feature map [N, C, H, W] to a descriptor [N, D]:
MAC (max), SPoC (mean), GeM (generalised mean, learnable p), R-MAC (max over a fixed grid of
regions, each L2-normalised, summed), NetVLAD (soft-assignment by 1x1 conv + softmax, residuals to
K centroids, intra-normalisation, L2), PCA-whitening (learned linear map initialised from PCA) and
a hashing layer (FC -> tanh while training, sign at inference).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbir_engine.errors import ShapeError


def l2n(x: torch.Tensor, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """x / max(||x||, eps) along `dim`; exports as ReduceL2 -> Clip -> Div (what F.normalize
    lowers to without the Expand)."""
    return x / x.norm(p=2, dim=dim, keepdim=True).clamp(min=eps)


def _check_map(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ShapeError(f"a retrieval head takes a feature map [N, C, H, W], got {tuple(x.shape)}")


class MAC(nn.Module):
    """Maximum activation of convolutions: max over H, W per channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        # amax, not adaptive_max_pool2d: the exporter turns the latter into a MaxPool with the
        # kernel fixed to the traced size, wrong for other input sizes.
        return torch.amax(x, dim=(2, 3))


class SPoC(nn.Module):
    """Sum-pooled convolutional features (here the mean, which ranks the same)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        return torch.mean(x, dim=(2, 3))


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al.): (mean_hw max(x, eps)^p)^(1/p), p learnable.
    Exports as Clip -> Pow(p) -> GlobalAveragePool -> Pow(1/p) -> Flatten."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor([float(p)]), requires_grad=learn_p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        y = F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1).pow(1.0 / self.p)
        return torch.flatten(y, 1)


def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """The R-MAC grid (Tolias et al. 2016): at level l, square regions of side 2*min(h,w)/(l+1),
    placed uniformly with about `overlap` overlap; the long side gets one extra region when that
    keeps the overlap closest to 40%. Returns (y0, x0, y1, x1), ends exclusive."""
    side = min(h, w)
    # extra regions on the longer side, chosen as in the reference implementation
    steps = np.arange(2, 7)
    b = (max(h, w) - side) / (steps - 1)
    extra = int(steps[np.argmin(np.abs((side * side - side * b) / (side * side) - overlap))]) - 1 \
        if h != w else 0
    wd, hd = (extra, 0) if w > h else (0, extra)
    regions: list[tuple[int, int, int, int]] = []
    for lev in range(1, levels + 1):
        r = max(1, math.floor(2 * side / (lev + 1)))
        ny, nx = lev + hd, lev + wd
        ys = [0] if ny == 1 else [round(i * (h - r) / (ny - 1)) for i in range(ny)]
        xs = [0] if nx == 1 else [round(i * (w - r) / (nx - 1)) for i in range(nx)]
        for y in ys:
            for x in xs:
                regions.append((y, x, min(h, y + r), min(w, x + r)))
    return list(dict.fromkeys(regions))


class RMAC(nn.Module):
    """Regional MAC: max over each grid region, L2-normalise each, sum, L2-normalise.
    The grid is fixed by the feature-map size seen at export time (static Slice + ReduceMax)."""

    def __init__(self, levels: int = 3) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        h, w = int(x.shape[2]), int(x.shape[3])
        acc = None
        for y0, x0, y1, x1 in rmac_regions(h, w, self.levels):
            r = l2n(torch.amax(x[:, :, y0:y1, x0:x1], dim=(2, 3)))
            acc = r if acc is None else acc + r
        return l2n(acc)  # type: ignore[arg-type]


class NetVLAD(nn.Module):
    """NetVLAD (Arandjelovic et al. 2016) over a feature map [N, D, H, W] -> [N, K * D].

    a = softmax_k(conv1x1(x)) (x L2-normalised over D first when `normalize_input`);
    V[k, d] = sum_i a[k, i] * (x[d, i] - c[k, d]) = (a @ x^T)[k, d] - c[k, d] * sum_i a[k, i];
    each V[k] L2-normalised (intra-normalisation), then the whole vector.
    """

    def __init__(self, clusters: int, dim: int, alpha: float = 100.0, normalize_input: bool = True) -> None:
        super().__init__()
        self.clusters, self.dim = clusters, dim
        self.alpha = alpha
        self.normalize_input = normalize_input
        self.assign = nn.Conv2d(dim, clusters, kernel_size=1, bias=True)
        self.centroids = nn.Parameter(torch.randn(clusters, dim) * 0.1)

    @torch.no_grad()
    def init_from_kmeans(self, descriptors: np.ndarray, seed: int = 0, iters: int = 30) -> NetVLAD:
        """Centroids from k-means on local descriptors [n, D] (L2-normalised first when the head
        normalises its input); assignment weights w_k = 2 alpha c_k, b_k = -alpha ||c_k||^2, so
        that softmax over k of w_k.x + b_k is a soft nearest-centroid assignment."""
        from cbir_engine.retrieval.kmeans import kmeans

        d = np.asarray(descriptors, np.float32)
        if d.ndim != 2 or d.shape[1] != self.dim:
            raise ShapeError(f"descriptors must be [n, {self.dim}], got {d.shape}")
        if self.normalize_input:
            d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
        c = kmeans(d, self.clusters, iters=iters, seed=seed)
        self.centroids.copy_(torch.from_numpy(c))
        self.assign.weight.copy_(torch.from_numpy(2.0 * self.alpha * c)[:, :, None, None])
        self.assign.bias.copy_(torch.from_numpy(-self.alpha * (c * c).sum(1)))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x)
        n, d = x.shape[0], x.shape[1]
        if self.normalize_input:
            x = l2n(x, dim=1)
        a = F.softmax(self.assign(x), dim=1).flatten(2)             # [N, K, HW]
        xf = x.flatten(2)                                            # [N, D, HW]
        v = torch.matmul(a, xf.transpose(1, 2))                      # [N, K, D]
        v = v - self.centroids.unsqueeze(0) * a.sum(dim=2, keepdim=True)
        v = l2n(v, dim=2)                                            # intra-normalisation
        return l2n(v.reshape(n, self.clusters * d), dim=1)


def netvlad_reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, centroids: np.ndarray,
                      normalize_input: bool = True, eps: float = 1e-12) -> np.ndarray:
    """NetVLAD written directly from the definition, loop over clusters (float64)."""
    x = np.asarray(x, np.float64)
    n, d, h, w = x.shape
    k = centroids.shape[0]
    xs = x.reshape(n, d, h * w)
    if normalize_input:
        xs = xs / np.maximum(np.sqrt((xs ** 2).sum(1, keepdims=True)), eps)
    logits = np.einsum("kd,ndi->nki", np.asarray(weight, np.float64).reshape(k, d), xs) + \
        np.asarray(bias, np.float64)[None, :, None]
    logits -= logits.max(1, keepdims=True)
    a = np.exp(logits)
    a /= a.sum(1, keepdims=True)
    out = np.zeros((n, k, d))
    for j in range(k):
        resid = xs - np.asarray(centroids, np.float64)[j][None, :, None]   # [n, d, hw]
        out[:, j] = (a[:, j][:, None, :] * resid).sum(2)
    out /= np.maximum(np.sqrt((out ** 2).sum(2, keepdims=True)), eps)
    out = out.reshape(n, k * d)
    return out / np.maximum(np.sqrt((out ** 2).sum(1, keepdims=True)), eps)


class PCAWhitening(nn.Module):
    """y = L2(W (x - m)): a linear layer initialised from PCA-whitening of training descriptors
    (W = diag(1/sqrt(lambda + eps)) U^T, keeping `dim` components), trainable afterwards."""

    def __init__(self, in_dim: int, dim: int | None = None, normalize: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, dim or in_dim, bias=True)
        self.normalize = normalize

    @torch.no_grad()
    def fit(self, descriptors: np.ndarray, eps: float = 1e-6) -> PCAWhitening:
        x = np.asarray(descriptors, np.float64)
        out_dim, in_dim = self.fc.weight.shape
        if x.ndim != 2 or x.shape[1] != in_dim:
            raise ShapeError(f"descriptors must be [n, {in_dim}], got {x.shape}")
        m = x.mean(0)
        cov = np.cov(x - m, rowvar=False)
        lam, u = np.linalg.eigh(cov)
        order = np.argsort(lam)[::-1][:out_dim]
        lam, u = lam[order], u[:, order]
        if len(lam) < out_dim:
            raise ShapeError(f"cannot keep {out_dim} components of {in_dim}-dim descriptors")
        wm = (u / np.sqrt(lam + eps * max(lam[0], 1e-30))).T
        self.fc.weight.copy_(torch.from_numpy(wm.astype(np.float32)))
        self.fc.bias.copy_(torch.from_numpy((-wm @ m).astype(np.float32)))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return l2n(y) if self.normalize else y


class HashLayer(nn.Module):
    """FC -> tanh while training (a relaxation of sign); sign at inference, exported as ONNX Sign
    (an exact zero stays 0, which `pack_bits` reads as a clear bit). `binarize=False` keeps the
    real-valued pre-sign output (what the codes are packed from)."""

    def __init__(self, in_dim: int, bits: int, binarize: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, bits)
        self.bits = bits
        self.binarize = binarize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x)
        if self.training:
            return torch.tanh(z)
        if not self.binarize:
            return z
        return torch.sign(z)


class Descriptor(nn.Module):
    """A conv trunk followed by a head (and optional further layers): image -> descriptor."""

    def __init__(self, trunk: nn.Module, *head: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


HEADS: dict[str, Any] = {"mac": MAC, "spoc": SPoC, "gem": GeM, "rmac": RMAC}
