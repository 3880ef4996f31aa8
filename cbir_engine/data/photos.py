"""An instance-retrieval set built from the photos that ship with scikit-image: each photo is one
database item, and the queries are transformed copies of them (scaled, rotated, cropped,
brightness-changed) - the invariances asked of CNN descriptors. A query is correct when its
original comes back first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cbir_engine.data.datasets import DatasetUnavailableError

# Natural photos bundled inside scikit-image (no download). The right view of the stereo pair is
# left out: it is a near-duplicate of the left one, so it would be a second correct answer.
PHOTO_NAMES = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field",
    "immunohistochemistry", "moon", "motorcycle_left", "retina", "rocket", "page", "text",
    "brick", "grass", "gravel", "cell", "microaneurysms", "clock", "horse", "logo",
)

# (transform type, strength) -> parameter. "mild" is what a retrieval system must take in its
# stride; "strong" shows where the descriptor breaks.
TRANSFORMS: dict[str, dict[str, tuple[float, ...]]] = {
    "scale": {"mild": (0.75, 1.25), "strong": (0.5, 1.6)},           # size factor
    "rotate": {"mild": (-5.0, 5.0), "strong": (-25.0, 25.0)},         # degrees
    "crop": {"mild": (0.9,), "strong": (0.6,)},                       # kept fraction of each side
    "brightness": {"mild": (0.8, 1.2), "strong": (0.5, 1.6)},         # intensity factor
}


def _load_skimage(name: str) -> np.ndarray:
    try:
        import skimage.data as sd
    except ImportError as e:
        raise DatasetUnavailableError("the photo set needs scikit-image: pip install scikit-image") from e
    if name == "motorcycle_left":
        img = sd.stereo_motorcycle()[0]
    else:
        img = getattr(sd, name)()
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        lo, hi = float(img.min()), float(img.max())
        img = ((img - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def resize_max_side(img: np.ndarray, side: int) -> np.ndarray:
    """Resizes so the longer side is `side` pixels (bilinear, aspect kept)."""
    from PIL import Image

    h, w = img.shape[:2]
    s = side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))


def apply_transform(img: np.ndarray, kind: str, value: float) -> np.ndarray:
    """One transform of a uint8 HxWx3 image."""
    from PIL import Image

    h, w = img.shape[:2]
    if kind == "scale":
        size = (max(8, round(w * value)), max(8, round(h * value)))
        return np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))
    if kind == "rotate":
        # Rotate, then keep the largest centred rectangle free of the filled corners.
        rot = np.asarray(Image.fromarray(img).rotate(value, Image.BILINEAR, expand=False))
        a = abs(np.deg2rad(value))
        cw = int((w * np.cos(a) - h * np.sin(a)) / np.cos(2 * a)) if a else w
        ch = int((h * np.cos(a) - w * np.sin(a)) / np.cos(2 * a)) if a else h
        cw, ch = max(8, min(w, cw)), max(8, min(h, ch))
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        return np.ascontiguousarray(rot[y0:y0 + ch, x0:x0 + cw])
    if kind == "crop":
        ch, cw = max(8, round(h * value)), max(8, round(w * value))
        # Off-centre: the crop keeps the top-left corner region.
        return np.ascontiguousarray(img[:ch, :cw])
    if kind == "brightness":
        return np.clip(img.astype(np.float32) * value, 0, 255).round().astype(np.uint8)
    raise ValueError(f"unknown transform {kind!r}; known: {', '.join(TRANSFORMS)}")


@dataclass(frozen=True)
class PhotoQuery:
    image: np.ndarray
    target: int      # index of the original in the database
    kind: str        # transform type
    strength: str    # "mild" or "strong"
    value: float


@dataclass(frozen=True)
class PhotoSet:
    names: tuple[str, ...]
    database: list[np.ndarray]
    queries: list[PhotoQuery]


def photo_set(max_side: int = 256, names: tuple[str, ...] = PHOTO_NAMES,
              transforms: dict[str, dict[str, tuple[float, ...]]] | None = None) -> PhotoSet:
    """The database (each photo resized to `max_side` on its longer side) and, for every photo,
    one query per (transform type, strength, parameter value)."""
    transforms = transforms or TRANSFORMS
    db = [resize_max_side(_load_skimage(n), max_side) for n in names]
    queries = []
    for i, img in enumerate(db):
        for kind, levels in transforms.items():
            for strength, values in levels.items():
                for v in values:
                    queries.append(PhotoQuery(apply_transform(img, kind, v), i, kind, strength, v))
    return PhotoSet(tuple(names), db, queries)


def imagenet_normalize(img: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 [1, 3, H, W] with the usual ImageNet mean/std."""
    x = img.astype(np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


Describe = Callable[[np.ndarray], np.ndarray]
