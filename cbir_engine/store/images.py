"""Reading image files (or uploaded bytes) into the batches a model takes, and thumbnails.

Every failure to read or decode an image becomes `ImageDecodeError` naming the file and the
reason, so callers can skip the file (indexing) or answer with a clear message (search, web).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cbir_engine.errors import ImageDecodeError
from cbir_engine.store.model_info import ModelInfo

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm"})


def _pil():  # type: ignore[no-untyped-def]
    try:
        from PIL import Image, ImageOps
    except ImportError as e:  # pragma: no cover - Pillow ships with the app extras
        raise ImageDecodeError("reading images needs Pillow: pip install 'cbir-engine[app]'") from e
    return Image, ImageOps


def open_image(source: str | os.PathLike[str] | bytes, name: str | None = None):  # type: ignore[no-untyped-def]
    """A fully decoded PIL image (EXIF orientation applied, first frame of animations)."""
    Image, ImageOps = _pil()
    label = name or (os.fspath(source) if not isinstance(source, bytes) else "upload")
    if isinstance(source, bytes) and not source:
        raise ImageDecodeError(f"{label}: empty file")
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as e:
        raise ImageDecodeError(f"{label}: cannot open: {e.strerror or e}") from e
    try:
        with fp:
            img = Image.open(fp)
            img.load()  # Image.open only reads the header; truncated data fails here
            return ImageOps.exif_transpose(img)
    except ImageDecodeError:
        raise
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, EOFError, ... on bad data
        reason = str(e) or type(e).__name__
        if "cannot identify image file" in reason:
            reason = "not an image file (or a format Pillow cannot read)"
        raise ImageDecodeError(f"{label}: cannot decode image: {reason}") from e


def to_model_pixels(img, info: ModelInfo) -> np.ndarray:  # type: ignore[no-untyped-def]
    """uint8 [height, width, channels]: the image converted to grey or RGB and resized to the
    model's input size (the whole image, aspect ratio not kept)."""
    Image, _ = _pil()
    img = img.convert("L" if info.channels == 1 else "RGB")
    if img.size != (info.width, info.height):
        img = img.resize((info.width, info.height), Image.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def load_pixels(source: str | os.PathLike[str] | bytes, info: ModelInfo,
                name: str | None = None) -> np.ndarray:
    """open_image + to_model_pixels; raises ImageDecodeError for anything unreadable."""
    img = open_image(source, name)
    try:
        return to_model_pixels(img, info)
    except Exception as e:  # conversion of exotic modes can fail after a successful decode
        raise ImageDecodeError(f"{name or source!s:.200}: cannot convert image: {e}") from e


def normalise(pixels: np.ndarray, info: ModelInfo) -> np.ndarray:
    """uint8 [n, h, w, c] -> float32 NCHW, scaled to [0, 1] then (x - mean) / std per channel
    (for grey 28x28 images the same numbers as cbir_engine.data.to_float)."""
    x = np.asarray(pixels, np.float32) / 255.0
    mean = np.asarray(info.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(info.std, np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x.transpose(0, 3, 1, 2) - mean) / std, dtype=np.float32)


def thumbnail_png(source: str | os.PathLike[str] | bytes, side: int = 160) -> bytes:
    """PNG bytes of the image shrunk to fit side x side (small images stay as they are)."""
    img = open_image(source)
    img = img.convert("RGBA" if img.mode in ("RGBA", "LA", "P") else "RGB")
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def walk_images(root: str | os.PathLike[str]) -> Iterator[Path]:
    """Image files under `root` (by extension, case-insensitive), recursively. Hidden files and
    folders are left out; symlinked folders are not followed.

    The order is fixed by a hash of each path relative to `root`: the same on every run, so ids
    come out the same however often a run is interrupted, yet not grouped by folder. (Search
    breaks distance ties by the smaller id; with ids in folder order, ties would always favour
    the folder that sorts first.)"""
    root = Path(root)
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(folder) / f)
    def order(p: Path) -> bytes:
        rel = p.relative_to(root).as_posix().encode("utf-8", "surrogateescape")
        return hashlib.blake2b(rel, digest_size=8).digest()

    found.sort(key=order)
    yield from found
