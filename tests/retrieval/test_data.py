"""Data loaders: the real files parse, splits are fixed and disjoint, transforms do what they say."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from cbir_engine import data


def test_read_idx_round_trip_and_errors(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", *arr.shape) + arr.tobytes()
    p = tmp_path / "x-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(data.read_idx(p), arr)
    (tmp_path / "bad").write_bytes(raw[:-1])
    with pytest.raises(data.DatasetFormatError):
        data.read_idx(tmp_path / "bad")
    (tmp_path / "magic").write_bytes(b"\x01" + raw[1:])
    with pytest.raises(data.DatasetFormatError):
        data.read_idx(tmp_path / "magic")
    with pytest.raises(data.DatasetUnavailableError):
        data.read_idx(tmp_path / "missing.gz")
    with pytest.raises(data.DatasetUnavailableError):
        data.fashion_mnist(root=tmp_path)


def test_fashion_mnist_and_split():
    x, y = data.fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10
    s = data.retrieval_split(x, y, n_queries=100, n_train=500, seed=3)
    assert np.bincount(s.query_y).tolist() == [10] * 10
    assert s.db_x.shape[0] == 9900 and np.bincount(s.train_y).tolist() == [50] * 10
    s2 = data.retrieval_split(x, y, n_queries=100, n_train=500, seed=3)
    np.testing.assert_array_equal(s.query_x, s2.query_x)   # fixed by the seed
    # queries are not in the database: no query image equals a database image at the same index
    flat_q = {q.tobytes() for q in s.query_x}
    assert sum(d.tobytes() in flat_q for d in s.db_x) < 5  # (Fashion-MNIST has a few duplicates)
    with pytest.raises(ValueError):
        data.retrieval_split(x, y, n_queries=105)


def test_mnist5k():
    x, y = data.mnist5k()
    assert x.shape == (5000, 28, 28) and np.bincount(y).tolist() == [500] * 10


def test_to_float_layout():
    x = np.full((2, 4, 5), 255, np.uint8)
    f = data.to_float(x, mean=0.5, std=0.5)
    assert f.shape == (2, 1, 4, 5) and f.dtype == np.float32 and np.all(f == 1.0)


def test_photo_set_transforms():
    ps = data.photo_set(max_side=128, names=("astronaut", "camera"))
    assert len(ps.database) == 2 and max(ps.database[0].shape[:2]) == 128
    n_per_photo = sum(len(v) for lv in data.TRANSFORMS.values() for v in lv.values())
    assert len(ps.queries) == 2 * n_per_photo
    img = ps.database[0]
    assert data.apply_transform(img, "scale", 0.5).shape[:2] == (64, 64)
    assert data.apply_transform(img, "crop", 0.5).shape[:2] == (64, 64)
    b = data.apply_transform(img, "brightness", 0.5)
    assert abs(b.astype(float).mean() - img.astype(float).mean() * 0.5) < 1.0
    # rotation crops away the filled corners: a white image stays white (bilinear edge aside)
    white = np.full((100, 160, 3), 255, np.uint8)
    r = data.apply_transform(white, "rotate", 10.0)
    assert r.shape[0] < 100 and r.shape[1] < 160
    assert r[1:-1, 1:-1].min() == 255
    with pytest.raises(ValueError):
        data.apply_transform(img, "shear", 1.0)
