"""Regional (object-based) descriptors: selective-search proposals (OpenCV contrib), RoI
max-pooled descriptors from a conv feature map, and VLAD over a k-means codebook of regions.

Compared with R-MAC's fixed grid, the regions here follow the image's segments: each proposal box
is mapped onto the feature map (stride `stride`), max-pooled per channel, L2-normalised, assigned
to its nearest codeword, and the residuals are summed per codeword (VLAD), intra-normalised and
L2-normalised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from cbir_engine.errors import ShapeError
from cbir_engine.retrieval.kmeans import assign, kmeans


def standardize(img: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 [1, 3, H, W] with zero mean and unit variance over the image (makes
    descriptors invariant to global brightness and contrast changes, clipping aside)."""
    x = np.asarray(img, np.float32)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ShapeError(f"expected an HxWx3 image, got {x.shape}")
    x = (x - x.mean()) / (x.std() + 1e-6)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def selective_search(
    img: np.ndarray, max_regions: int = 48, mode: str = "fast", min_side: int = 16
) -> np.ndarray:
    """Proposal boxes int [R, 4] as (x0, y0, x1, y1), ends exclusive, in OpenCV's ranking order;
    the whole image is always the first box. Boxes with a side under `min_side` pixels are
    dropped."""
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - the retrieval extra installs it
        raise ImportError("selective search needs opencv-contrib-python-headless") from e
    if mode not in ("fast", "quality", "single"):
        raise ValueError(f"mode must be 'fast', 'quality' or 'single', got {mode!r}")
    cv2.setNumThreads(1)
    h, w = img.shape[:2]
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(img[:, :, ::-1]))  # OpenCV wants BGR
    {
        "fast": ss.switchToSelectiveSearchFast,
        "quality": ss.switchToSelectiveSearchQuality,
        "single": ss.switchToSingleStrategy,
    }[mode]()
    rects = ss.process()  # (x, y, w, h)
    boxes = [(0, 0, w, h)]
    seen = {boxes[0]}
    for x, y, bw, bh in rects:
        box = (int(x), int(y), int(x + bw), int(y + bh))
        if bw < min_side or bh < min_side or box in seen:
            continue
        seen.add(box)
        boxes.append(box)
        if len(boxes) >= max_regions:
            break
    return np.array(boxes, np.int64)


def roi_max_pool(fmap: np.ndarray, boxes: np.ndarray, stride: float) -> np.ndarray:
    """Max over the feature-map cells each box covers: fmap [C, h, w], boxes in image pixels ->
    [R, C]. A box covers cells floor(x0 / stride) .. ceil(x1 / stride) - 1 (at least one)."""
    c, h, w = fmap.shape
    out = np.empty((len(boxes), c), np.float32)
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes)):
        cx0 = min(w - 1, int(np.floor(x0 / stride)))
        cy0 = min(h - 1, int(np.floor(y0 / stride)))
        cx1 = max(cx0 + 1, min(w, int(np.ceil(x1 / stride))))
        cy1 = max(cy0 + 1, min(h, int(np.ceil(y1 / stride))))
        out[i] = fmap[:, cy0:cy1, cx0:cx1].max(axis=(1, 2))
    return out


def _l2(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def vlad(descriptors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """VLAD with hard assignment: per codeword the sum of residuals of its descriptors,
    intra-normalised, then L2-normalised as one vector [K * D]."""
    d = np.asarray(descriptors, np.float64)
    c = np.asarray(centroids, np.float64)
    if d.ndim != 2 or c.ndim != 2 or d.shape[1] != c.shape[1]:
        raise ShapeError(f"descriptors {d.shape} and centroids {c.shape} must be [n, D] and [K, D]")
    a = assign(d, c)
    v = np.zeros_like(c)
    np.add.at(v, a, d - c[a])
    return _l2(_l2(v, 1).ravel()).astype(np.float32)


class RegionalVLAD:
    """Image -> regional VLAD descriptor. `fit` learns the codebook from the regions of a set of
    images; `feature_map(img)` must return the conv map [C, h, w] of an HxWx3 image."""

    def __init__(
        self, clusters: int = 16, max_regions: int = 48, stride: float = 32.0, seed: int = 0
    ) -> None:
        self.clusters, self.max_regions, self.stride, self.seed = clusters, max_regions, stride, seed
        self.centroids: np.ndarray | None = None

    def regions(self, img: np.ndarray, feature_map: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        boxes = selective_search(img, self.max_regions)
        return _l2(roi_max_pool(feature_map(img), boxes, self.stride))

    def fit(
        self, images: Sequence[np.ndarray], feature_map: Callable[[np.ndarray], np.ndarray]
    ) -> RegionalVLAD:
        regs = np.concatenate([self.regions(img, feature_map) for img in images])
        self.centroids = kmeans(regs, min(self.clusters, len(regs)), seed=self.seed)
        return self

    def describe(self, img: np.ndarray, feature_map: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        if self.centroids is None:
            raise RuntimeError("fit() first")
        return vlad(self.regions(img, feature_map), self.centroids)
