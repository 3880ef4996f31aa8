"""Regional descriptors: RoI pooling and VLAD by hand, selective search on a real photo."""

from __future__ import annotations

import numpy as np
import pytest

from cbir_engine.retrieval.regions import RegionalVLAD, roi_max_pool, selective_search, standardize, vlad


def test_roi_max_pool_by_hand():
    fmap = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # C=2, h=3, w=4
    # stride 10: box (0,0)-(20,10) covers cells x 0..1, y 0 -> max of fmap[:, 0, 0:2]
    # box (25,15)-(26,16) covers cell x 2, y 1 (at least one cell)
    # box (0,0)-(1000,1000) is clipped to the whole map
    out = roi_max_pool(fmap, np.array([[0, 0, 20, 10], [25, 15, 26, 16], [0, 0, 1000, 1000]]), 10)
    np.testing.assert_array_equal(out, [[1, 13], [6, 18], [11, 23]])


def test_vlad_by_hand():
    c = np.array([[0.0, 0.0], [10.0, 0.0]])
    d = np.array([[1.0, 0.0], [0.0, 2.0], [9.0, 0.0]])
    # codeword 0 gets (1,0) + (0,2) = (1,2) -> /sqrt5; codeword 1 gets (-1, 0) -> (-1, 0);
    # then the whole vector / sqrt(2)
    want = np.array([1 / np.sqrt(5), 2 / np.sqrt(5), -1.0, 0.0]) / np.sqrt(2)
    np.testing.assert_allclose(vlad(d, c), want, atol=1e-6)


def test_standardize_removes_brightness():
    rng = np.random.default_rng(0)
    img = rng.integers(20, 200, (16, 16, 3)).astype(np.uint8)
    brighter = (img.astype(np.float32) * 1.2).round().astype(np.uint8)
    assert np.abs(standardize(img) - standardize(brighter)).max() < 0.02
    assert standardize(img).shape == (1, 3, 16, 16)


def test_selective_search_and_regional_vlad_on_a_photo():
    pytest.importorskip("cv2")
    from cbir_engine.data.photos import _load_skimage, resize_max_side

    img = resize_max_side(_load_skimage("coffee"), 128)
    boxes = selective_search(img, max_regions=20)
    h, w = img.shape[:2]
    assert boxes[0].tolist() == [0, 0, w, h] and 2 <= len(boxes) <= 20
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert ((boxes[:, 2] - boxes[:, 0]) >= 16).all()

    def fmap(im: np.ndarray) -> np.ndarray:  # a fixed, cheap "feature map": 4x4 mean colours
        hh, ww = im.shape[0] // 4 * 4, im.shape[1] // 4 * 4
        return im[:hh, :ww].reshape(hh // 4, 4, ww // 4, 4, 3).mean(axis=(1, 3)).transpose(2, 0, 1)

    rv = RegionalVLAD(clusters=4, max_regions=20, stride=4).fit([img], fmap)
    v = rv.describe(img, fmap)
    assert v.shape == (4 * 3,) and abs(np.linalg.norm(v) - 1) < 1e-5
