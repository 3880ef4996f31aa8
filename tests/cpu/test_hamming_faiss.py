"""HammingIndex against faiss IndexBinaryFlat: same distances, same ids up to ties."""

from __future__ import annotations

import numpy as np
import pytest

from cbir_engine.index import HammingIndex
from cbir_engine.index.reference import distances_reference

faiss = pytest.importorskip("faiss")


def assert_same_up_to_ties(db, q, ours_d, ours_i, faiss_d, faiss_i):
    """Distances equal; ids equal except where several codes tie at a row's last distance."""
    np.testing.assert_array_equal(ours_d, faiss_d)
    true_d = distances_reference(db, q)
    for row in range(q.shape[0]):
        kth = ours_d[row, -1]
        closer_ours = set(ours_i[row][ours_d[row] < kth].tolist())
        closer_faiss = set(faiss_i[row][faiss_d[row] < kth].tolist())
        assert closer_ours == closer_faiss
        # The tied ids each side picked really are at that distance.
        np.testing.assert_array_equal(true_d[row, ours_i[row]], ours_d[row])
        np.testing.assert_array_equal(true_d[row, faiss_i[row]], faiss_d[row])
        # Ours: the smallest ids at the tie.
        tied = np.flatnonzero(true_d[row] == kth)
        picked = np.sort(ours_i[row][ours_d[row] == kth])
        np.testing.assert_array_equal(picked, tied[: picked.size])


@pytest.mark.parametrize("bits", [8, 64, 96, 256, 1024])
@pytest.mark.parametrize("method", ["flat", "mih"])
def test_knn_same_as_faiss_binary_flat(bits, method):
    rng = np.random.default_rng(bits)
    n = 20_000 if bits <= 256 else 5_000
    db = rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
    q = rng.integers(0, 256, size=(23, bits // 8), dtype=np.uint8)
    ours = HammingIndex(bits, method=method, threads=2)
    ours.add(db)
    ref = faiss.IndexBinaryFlat(bits)
    ref.add(db)
    for k in (1, 10, 100):
        d, i = ours.search(q, k)
        fd, fi = ref.search(q, k)
        assert_same_up_to_ties(db, q, d, i, fd, fi)


@pytest.mark.parametrize("bits", [8, 64, 256])
def test_range_same_as_faiss_with_exclusive_radius(bits):
    # FAISS keeps distance < radius; ours keeps distance <= radius.
    rng = np.random.default_rng(bits + 1)
    db = rng.integers(0, 256, size=(5000, bits // 8), dtype=np.uint8)
    q = np.concatenate([db[:3], rng.integers(0, 256, size=(4, bits // 8), dtype=np.uint8)])
    ours = HammingIndex(bits)
    ours.add(db)
    ref = faiss.IndexBinaryFlat(bits)
    ref.add(db)
    radius = bits // 4
    lims, d, i = ours.range_search(q, radius)
    flims, fd, fi = ref.range_search(q, radius + 1)
    np.testing.assert_array_equal(lims, flims)
    for row in range(q.shape[0]):
        a, b = slice(lims[row], lims[row + 1]), slice(flims[row], flims[row + 1])
        ours_pairs = sorted(zip(d[a].tolist(), i[a].tolist(), strict=True))
        faiss_pairs = sorted(zip(fd[b].tolist(), fi[b].tolist(), strict=True))
        assert ours_pairs == faiss_pairs
        assert list(zip(d[a].tolist(), i[a].tolist(), strict=True)) == ours_pairs  # ours come sorted


def test_pack_bits_matches_faiss_real_to_binary():
    # FAISS's own binarisation (bit set where x > 0) gives the very bytes pack_bits gives.
    from cbir_engine.index import pack_bits

    x = np.random.default_rng(2).standard_normal((7, 96)).astype(np.float32)
    theirs = np.zeros((7, 12), dtype=np.uint8)
    faiss.real_to_binary(x.size, faiss.swig_ptr(x), faiss.swig_ptr(theirs))
    np.testing.assert_array_equal(pack_bits(x), theirs)
