"""Fixtures of the product tests: folders of real images (Fashion-MNIST test images as PNG, in
class folders) and the models the `cbir` command runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cbir_engine.demo import ASSET, write_pngs
from tests.product.helpers import run_cli

pytest.importorskip("PIL")


@pytest.fixture(scope="session")
def fashion() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from cbir_engine.data import FASHION_MNIST_CLASSES, DatasetUnavailableError, fashion_mnist

    try:
        x, y = fashion_mnist("test")
    except DatasetUnavailableError as e:
        pytest.skip(str(e))
    return x, y, FASHION_MNIST_CLASSES


@pytest.fixture(scope="session")
def image_folder_200(tmp_path_factory, fashion) -> Path:
    """200 Fashion-MNIST test images as PNG files in class folders (read-only for tests: copy it
    before changing anything)."""
    x, y, names = fashion
    root = tmp_path_factory.mktemp("images200") / "images"
    write_pngs(x[:200], y[:200], root, names)
    return root


@pytest.fixture
def image_folder(tmp_path, image_folder_200) -> Path:
    """A private copy of the 200-image folder."""
    dst = tmp_path / "images"
    shutil.copytree(image_folder_200, dst)
    return dst


@pytest.fixture(scope="session")
def hash_model() -> Path:
    """The committed 48-bit hashing model of the demo."""
    if not ASSET.is_file():
        pytest.skip(f"{ASSET} is missing")
    return ASSET


@pytest.fixture(scope="session")
def gem_model(tmp_path_factory) -> Path:
    """small_cnn with a GeM head (float descriptors, random weights), exported by `cbir export`."""
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("models") / "small_gem.onnx"
    run_cli("export", "small_cnn", "--head", "gem", "-o", str(out))
    return out

