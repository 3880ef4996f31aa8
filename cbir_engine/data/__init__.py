"""Data sets that ship offline and the splits the retrieval experiments use."""

from cbir_engine.data.datasets import (
    FASHION_MNIST_CLASSES,
    DatasetFormatError,
    DatasetUnavailableError,
    RetrievalSplit,
    fashion_mnist,
    fashion_mnist_split,
    mnist5k,
    read_idx,
    retrieval_split,
    to_float,
)
from cbir_engine.data.photos import PHOTO_NAMES, TRANSFORMS, PhotoQuery, PhotoSet, apply_transform, photo_set

__all__ = [
    "FASHION_MNIST_CLASSES", "DatasetFormatError", "DatasetUnavailableError", "RetrievalSplit",
    "fashion_mnist", "fashion_mnist_split", "mnist5k", "read_idx", "retrieval_split", "to_float",
    "PHOTO_NAMES", "TRANSFORMS", "PhotoQuery", "PhotoSet", "apply_transform", "photo_set",
]
