"""HammingIndex against the numpy reference: flat scan and multi-index hashing, both SIMD paths."""

from __future__ import annotations

import numpy as np
import pytest

from cbir_engine import _C
from cbir_engine.errors import CbirError, DTypeError, ShapeError
from cbir_engine.index import DuplicateIdError, HammingIndex, IndexArgumentError
from cbir_engine.index.reference import distances_reference, knn_reference, range_reference

ISAS = ["avx2"] + (["avx512-vpopcntdq"] if _C.hamming_set_isa("auto") and _C.hamming_isa() != "avx2" else [])


@pytest.fixture(params=ISAS)
def isa(request):
    assert _C.hamming_set_isa(request.param)
    assert _C.hamming_isa() == request.param
    yield request.param
    _C.hamming_set_isa("auto")


def random_codes(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)


def clustered_codes(rng: np.random.Generator, n: int, bits: int, distinct: int = 5) -> np.ndarray:
    """Codes drawn from a few distinct values, so most distances tie."""
    pool = random_codes(rng, distinct, bits)
    return pool[rng.integers(0, distinct, size=n)]


def check_knn(index: HammingIndex, db: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> None:
    d, i = index.search(q, k)
    rd, ri = knn_reference(db, ids, q, k)
    assert d.dtype == np.int32 and i.dtype == np.int64
    assert d.shape == (q.shape[0], k) and i.shape == (q.shape[0], k)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(i, ri)


SIZES = [1, 7, 59, 1023]
BITS = [8, 16, 24, 32, 40, 64, 96, 128, 200, 256, 512, 1024]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("method", ["flat", "mih"])
def test_knn_matches_reference(isa, bits, n, method):
    rng = np.random.default_rng(bits * 7919 + n)
    db = random_codes(rng, n, bits)
    if n > 7:  # plant exact and near duplicates of the queries to exercise small distances
        db[: n // 3] = db[rng.integers(0, n, size=n // 3)]
    q = np.concatenate([random_codes(rng, 5, bits), db[rng.integers(0, n, size=2)]])
    index = HammingIndex(bits, method=method, threads=2)
    index.add(db)
    ids = np.arange(n, dtype=np.int64)
    for k in sorted({1, min(7, n), n}):
        check_knn(index, db, ids, q, k)


@pytest.mark.parametrize("bits", [8, 32, 64, 96, 256])
@pytest.mark.parametrize("method", ["flat", "mih"])
def test_ties_broken_by_smaller_id_with_shuffled_ids(isa, bits, method):
    rng = np.random.default_rng(bits)
    n = 3001
    db = clustered_codes(rng, n, bits)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)  # unique, out of order
    q = np.concatenate([db[:3], random_codes(rng, 4, bits)])
    index = HammingIndex(bits, method=method, threads=2)
    index.add(db, ids)
    for k in (1, 10, 500, n):
        check_knn(index, db, ids, q, k)


@pytest.mark.parametrize("bits", [16, 64, 128, 256])
@pytest.mark.parametrize("threads", [1, 2])
def test_large_database_tiles_splits_and_large_k(isa, bits, threads):
    # Enough codes for many tiles and a database split per thread; k up to 4096.
    rng = np.random.default_rng(bits + threads)
    n = 40_007
    db = random_codes(rng, n, bits)
    db[::97] = db[0]  # a block of exact ties, spread over the tiles
    q = np.concatenate([db[:1], random_codes(rng, 2, bits)])
    index = HammingIndex(bits, method="flat", threads=threads)
    index.add(db)
    ids = np.arange(n, dtype=np.int64)
    for k in (1, 100, 4096):
        check_knn(index, db, ids, q, k)
    # A batch of queries (query groups, register blocks of 8 and their remainders).
    q2 = random_codes(rng, 45, bits)
    check_knn(index, db, ids, q2, 10)


@pytest.mark.parametrize("bits", [24, 32, 64, 128])
def test_queries_with_very_different_limits_in_one_block(isa, bits):
    """Real codes: some queries sit in dense clusters (tight k-th distances), others far from
    everything (loose ones), side by side in one register block of the scan. Each query must get
    its own exact neighbours whatever its neighbours in the block accept."""
    rng = np.random.default_rng(bits)
    centres = random_codes(rng, 20, bits)
    n = 30_011
    db = centres[rng.integers(0, 20, size=n)].copy()
    flips = rng.random((n, bits)) < 0.04  # near-duplicates around each centre
    db ^= np.packbits(flips, axis=1, bitorder="little")
    db[::5] = random_codes(rng, len(db[::5]), bits)  # and a scattered background
    near = centres[rng.integers(0, 20, size=9)] ^ np.packbits(rng.random((9, bits)) < 0.02, axis=1,
                                                                bitorder="little")
    far = random_codes(rng, 9, bits)
    q = np.stack([near, far], axis=1).reshape(18, bits // 8)  # alternate tight and loose queries
    index = HammingIndex(bits, method="flat", threads=2)
    index.add(db)
    ids = np.arange(n, dtype=np.int64)
    for k in (1, 10, 100):
        check_knn(index, db, ids, q, k)


@pytest.mark.parametrize("bits", [8, 64, 96, 256])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("method", ["flat", "mih"])
def test_range_matches_reference(isa, bits, n, method):
    rng = np.random.default_rng(bits + n)
    db = clustered_codes(rng, n, bits, distinct=max(2, n // 4))
    ids = rng.permutation(n).astype(np.int64)
    q = np.concatenate([db[:2], random_codes(rng, 3, bits)])
    index = HammingIndex(bits, method=method, threads=2)
    index.add(db, ids)
    for radius in (0, 1, bits // 4, bits // 2, bits):
        lims, d, i = index.range_search(q, radius)
        rl, rd, ri = range_reference(db, ids, q, radius)
        np.testing.assert_array_equal(lims, rl)
        np.testing.assert_array_equal(d, rd)
        np.testing.assert_array_equal(i, ri)


def test_mih_matches_flat_on_a_larger_database():
    rng = np.random.default_rng(5)
    n, bits = 200_000, 64
    db = random_codes(rng, n, bits)
    q = np.concatenate([db[:5] ^ np.uint8(1), random_codes(rng, 20, bits)])
    flat = HammingIndex(bits, method="flat")
    mih = HammingIndex(bits, method="mih")
    flat.add(db)
    mih.add(db)
    for k in (1, 10, 100):
        fd, fi = flat.search(q, k)
        md, mi = mih.search(q, k)
        np.testing.assert_array_equal(md, fd)
        np.testing.assert_array_equal(mi, fi)
    for radius in (3, 12):
        for a, b in zip(mih.range_search(q, radius), flat.range_search(q, radius), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("substrings", [3, 4, 7, 8, 16])
def test_mih_one_query_at_a_time_matches_flat(isa, substrings):
    # The benchmark's case at a CI size: 64-bit codes sent one call at a time (both threads share
    # the query) and in a batch; ties among planted duplicates. The tables keep each code without
    # their substring, split into 32 bits read first and a tail read only for codes that the
    # first part and the pigeonhole bound on the tail's whole substrings do not rule out: 3
    # substrings keep 42/43 bits (no whole substring in the tail), 4 keep 48 (one, after or
    # before the table's own), 7 keep 54-55, 8 keep 56 (three) and 16 keep 60 (seven).
    rng = np.random.default_rng(40 + substrings)
    n, bits = 120_000, 64
    db = random_codes(rng, n, bits)
    db[rng.integers(0, n, size=300)] = db[7]  # many codes at distance 0 of some queries
    ids = rng.permutation(4 * n)[:n].astype(np.int64)  # unsorted: ties go to the smaller id
    q = np.concatenate([db[7:8], db[100:103] ^ np.uint8(16), random_codes(rng, 8, bits)])
    flat = HammingIndex(bits, method="flat", threads=2)
    mih = HammingIndex(bits, method="mih", threads=2, mih_substrings=substrings)
    flat.add(db, ids)
    mih.add(db, ids)
    for k in (1, 10, 100, 400):
        fd, fi = flat.search(q, k)
        for j in range(len(q)):
            md, mi = mih.search(q[j : j + 1], k)
            np.testing.assert_array_equal(md[0], fd[j])
            np.testing.assert_array_equal(mi[0], fi[j])
        md, mi = mih.search(q, k)
        np.testing.assert_array_equal(md, fd)
        np.testing.assert_array_equal(mi, fi)
    for radius in (0, 6, 14):
        for a, b in zip(mih.range_search(q[:3], radius), flat.range_search(q[:3], radius), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("serial_start_us", [0, 1, 20, 10**6])
def test_mih_lone_query_handoff_matches_reference(serial_start_us):
    # A lone query runs on the calling thread for serial_start_us, then both threads share what
    # is left: from the start (0), after the first chunk of buckets (1), the default (20), never
    # in practice (10**6). Clustered codes give buckets of thousands and many ties.
    rng = np.random.default_rng(11)
    db = np.concatenate([clustered_codes(rng, 30_000, 64, distinct=40), random_codes(rng, 90_000, 64)])
    ids = rng.permutation(len(db)).astype(np.int64)
    q = np.concatenate([db[:3] ^ np.uint8(5), random_codes(rng, 5, 64)])
    threads = _C.HammingThreads(2)
    tables = _C.mih_build(threads, db, 4)
    for k in (1, 10, 300):
        ref_d, ref_i = knn_reference(db, ids, q, k)
        for j in range(len(q)):
            d, i, _ = _C.mih_knn(threads, tables, ids, False, q[j : j + 1], k, serial_start_us)
            np.testing.assert_array_equal(d[0], ref_d[j])
            np.testing.assert_array_equal(i[0], ref_i[j])
    with pytest.raises(ValueError, match="serial_start_us"):
        _C.mih_knn(threads, tables, ids, False, q[:1], 1, -1)


def test_mih_stats_count_what_the_probes_read():
    # 64-bit codes in 4 tables of 16 bits: every result is a code whose tail was read (a
    # survivor of the head bound), every survivor a candidate; the 1 + 16 buckets of substring
    # radius 0 and 1 of each table come first.
    rng = np.random.default_rng(8)
    db = random_codes(rng, 50_000, 64)
    threads = _C.HammingThreads(1)
    tables = _C.mih_build(threads, db, 4)
    d, i, stats = _C.mih_knn(threads, tables, None, True, db[:1] ^ np.uint8(3), 10)
    ref_d, ref_i = knn_reference(db, np.arange(len(db), dtype=np.int64), db[:1] ^ np.uint8(3), 10)
    np.testing.assert_array_equal(d, ref_d)
    np.testing.assert_array_equal(i, ref_i)
    assert stats["buckets"] >= 4 * 17
    assert 10 <= stats["survivors"] <= stats["candidates"] < len(db) * 4


@pytest.mark.parametrize("substrings", [2, 3, 5, 8, 40])
def test_mih_any_substring_count(substrings):
    rng = np.random.default_rng(substrings)
    db = random_codes(rng, 2000, 40)
    q = random_codes(rng, 6, 40)
    index = HammingIndex(40, method="mih", mih_substrings=substrings)
    index.add(db)
    check_knn(index, db, np.arange(2000, dtype=np.int64), q, 25)
    assert index.mih_substrings == substrings


def test_distances_matrix_matches_reference():
    rng = np.random.default_rng(3)
    for bits in (8, 96, 1024):
        db, q = random_codes(rng, 59, bits), random_codes(rng, 7, bits)
        index = HammingIndex(bits)
        index.add(db)
        np.testing.assert_array_equal(index.distances(q), distances_reference(db, q))


def test_add_remove_and_ids():
    rng = np.random.default_rng(11)
    bits = 64
    a, b = random_codes(rng, 100, bits), random_codes(rng, 50, bits)
    index = HammingIndex(bits, method="flat")
    index.add(a)
    index.add(b, ids=np.arange(1000, 1050))
    index.add(random_codes(rng, 3, bits))  # default ids continue after the largest id
    assert len(index) == 153
    np.testing.assert_array_equal(index.ids[-3:], [1050, 1051, 1052])
    removed = index.remove(np.array([0, 5, 1000, 99999]))
    assert removed == 3 and len(index) == 150
    db = index.codes
    ids = index.ids
    assert not np.isin([0, 5, 1000], ids).any()
    q = random_codes(rng, 4, bits)
    check_knn(index, db, ids, q, 150)
    for method in ("mih", "flat"):
        other = HammingIndex(bits, method=method)
        other.add(db, ids)
        assert other.remove(ids[:10]) == 10
        check_knn(other, db[10:], ids[10:], q, 20)


def test_index_errors_are_the_shared_typed_errors():
    import cbir_engine.errors as errors
    import cbir_engine.index as index_pkg

    for name in ("IndexArgumentError", "DuplicateIdError", "DeviceUnavailableError"):
        assert getattr(index_pkg, name) is getattr(errors, name)
        assert issubclass(getattr(errors, name), CbirError)
    with pytest.raises(errors.IndexArgumentError):
        HammingIndex(64, method="lsh")


def test_bad_input_is_refused_clearly():
    index = HammingIndex(64)
    rng = np.random.default_rng(0)
    index.add(random_codes(rng, 10, 64))
    with pytest.raises(ShapeError, match="16 bytes"):
        index.add(random_codes(rng, 3, 128))
    with pytest.raises(ShapeError, match="bytes"):
        index.search(random_codes(rng, 3, 32), 1)
    with pytest.raises(ShapeError, match="2-D"):
        index.search(random_codes(rng, 1, 64)[0], 1)
    with pytest.raises(DTypeError, match="pack_bits"):
        index.add(np.ones((3, 64), dtype=np.float32))
    with pytest.raises(DTypeError, match="uint8"):
        index.search(np.zeros((2, 1), dtype=np.uint64), 1)
    with pytest.raises(IndexArgumentError, match="k must be"):
        index.search(random_codes(rng, 2, 64), 0)
    with pytest.raises(IndexArgumentError, match="k must be"):
        index.search(random_codes(rng, 2, 64), 11)
    with pytest.raises(IndexArgumentError, match="radius"):
        index.range_search(random_codes(rng, 2, 64), -1)
    with pytest.raises(DuplicateIdError, match="already"):
        index.add(random_codes(rng, 2, 64), ids=np.array([3, 100]))
    with pytest.raises(DuplicateIdError, match="repeat"):
        index.add(random_codes(rng, 2, 64), ids=np.array([200, 200]))
    with pytest.raises(DTypeError):
        index.add(random_codes(rng, 2, 64), ids=np.array([1.5, 2.5]))
    with pytest.raises(ShapeError):
        index.add(random_codes(rng, 2, 64), ids=np.array([300]))
    with pytest.raises(ShapeError, match="multiple of 8"):
        HammingIndex(12)
    with pytest.raises(IndexArgumentError, match="method"):
        HammingIndex(64, method="hnsw")
    with pytest.raises(IndexArgumentError, match="mih_substrings"):
        HammingIndex(64, method="mih", mih_substrings=2)  # 32-bit substrings: tables too large
    assert len(index) == 10  # nothing half-added
    # Every error is a typed one; the argument errors are ValueErrors too.
    assert issubclass(IndexArgumentError, CbirError) and issubclass(DuplicateIdError, ValueError)


def test_duplicate_check_with_out_of_order_ids():
    index = HammingIndex(8)
    index.add(np.arange(4, dtype=np.uint8)[:, None], ids=np.array([10, 3, 7, 1]))
    with pytest.raises(DuplicateIdError):
        index.add(np.zeros((1, 1), np.uint8), ids=np.array([7]))
    index.add(np.zeros((1, 1), np.uint8), ids=np.array([5]))
    assert len(index) == 5


def test_empty_queries_and_empty_index():
    index = HammingIndex(32)
    with pytest.raises(IndexArgumentError):
        index.search(np.zeros((1, 4), np.uint8), 1)
    lims, d, i = index.range_search(np.zeros((2, 4), np.uint8), 3)
    assert lims.tolist() == [0, 0, 0] and d.size == 0 and i.size == 0
    index.add(np.zeros((3, 4), np.uint8))
    d, i = index.search(np.zeros((0, 4), np.uint8), 2)
    assert d.shape == (0, 2) and i.shape == (0, 2)


def test_cuda_device_without_a_gpu_is_a_clear_error():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU (tests/gpu covers it)")
    from cbir_engine.index import DeviceUnavailableError

    with pytest.raises(DeviceUnavailableError, match="GPU"):
        HammingIndex(64, device="cuda")
    with pytest.raises(IndexArgumentError, match="gpu_backend"):
        HammingIndex(64, device="cuda", gpu_backend="opencl")


def test_auto_picks_mih_for_millions_of_short_codes_with_flat_results():
    rng = np.random.default_rng(9)
    n = (1 << 22) + 3
    db = random_codes(rng, n, 64)
    q = np.concatenate([db[:2] ^ np.uint8(3), random_codes(rng, 3, 64)])
    auto = HammingIndex(64, method="auto")
    auto.add(db)
    small = HammingIndex(64, method="auto")
    small.add(db[:1000])
    small.search(q, 5)
    assert small.last_method == "flat"
    flat = HammingIndex(64, method="flat")
    flat.add(db)
    for k in (1, 10):
        ad, ai = auto.search(q, k)
        assert auto.last_method == "mih"
        fd, fi = flat.search(q, k)
        np.testing.assert_array_equal(ad, fd)
        np.testing.assert_array_equal(ai, fi)
    auto.search(q, 1000)
    assert auto.last_method == "flat"  # many results: the scan


def lsh_like_codes(rng: np.random.Generator, n: int, centers: int = 2000, flip: float = 0.06) -> np.ndarray:
    """64-bit codes around `centers` random centers, each bit flipped with probability `flip`:
    the structure learned or LSH codes of clustered data have, which multi-index hashing exploits."""
    c = rng.integers(0, 256, (centers, 8), dtype=np.uint8)
    noise = np.packbits(rng.random((n, 64)) < flip, axis=1, bitorder="little")
    return c[rng.integers(0, centers, n)] ^ noise


class FakeClock:
    """perf_counter for the auto trial: each (MIH, flat) pair of timed calls takes the given times."""

    def __init__(self, mih: float, flat: float) -> None:
        self.calls, self.now, self.steps = 0, 0.0, (0.0, mih, flat)

    def perf_counter(self) -> float:
        self.now += self.steps[self.calls % 3]
        self.calls += 1
        return self.now


@pytest.mark.parametrize("mih_time,expect", [(1.0, "mih"), (10.0, "flat")])
def test_auto_trial_between_1m_and_4m_codes(monkeypatch, mih_time: float, expect: str) -> None:
    import cbir_engine.index.hamming as hamming

    clock = FakeClock(mih=mih_time, flat=11.0)  # 11x faster, or 1.1x: under the 1.25x margin
    monkeypatch.setattr(hamming, "time", clock)
    rng = np.random.default_rng(21)
    db = random_codes(rng, 1_000_000, 64)
    q = np.concatenate([db[:3] ^ np.uint8(5), random_codes(rng, 9, 64)])
    auto, flat = HammingIndex(64), HammingIndex(64, method="flat")
    auto.add(db)
    flat.add(db)
    for k in (10, 1):
        ad, ai = auto.search(q, k)
        assert auto.last_method == expect
        fd, fi = flat.search(q, k)
        np.testing.assert_array_equal(ad, fd)
        np.testing.assert_array_equal(ai, fi)
    assert clock.calls == 3 * 8  # one trial of 8 queries, kept for the second search
    assert (auto._mih is not None) == (expect == "mih")  # the losing tables are dropped
    auto.range_search(q[:2], 3)
    assert auto.last_method == "flat"  # radius searches below 4M codes keep the scan
    auto.search(q, 300)
    assert auto.last_method == "flat"  # k > 256: the scan
    auto.add(random_codes(rng, 10, 64))  # a change: the next search tries again
    auto.search(q[:2], 5)
    assert clock.calls == 3 * 8 + 3 * 2


def test_auto_trial_not_run_below_1m_codes_or_for_pinned_methods(monkeypatch) -> None:
    import cbir_engine.index.hamming as hamming

    clock = FakeClock(mih=1.0, flat=11.0)
    monkeypatch.setattr(hamming, "time", clock)
    rng = np.random.default_rng(22)
    db = random_codes(rng, 999_999, 64)
    small = HammingIndex(64)
    small.add(db)
    small.search(db[:4], 10)
    pinned = HammingIndex(64, method="flat")
    pinned.add(np.concatenate([db, db[:5]]))
    pinned.search(db[:4], 10)
    assert clock.calls == 0
    assert small.last_method == pinned.last_method == "flat"


def test_auto_trial_keeps_mih_on_clustered_codes_with_real_timing() -> None:
    # At 1M LSH-like codes MIH runs about 5x the flat scan one query at a time (2-core Zen 4),
    # far above the trial's 1.25x margin.
    rng = np.random.default_rng(23)
    codes = lsh_like_codes(rng, 1_000_016)  # queries from the same clusters as the database
    db, q = codes[:1_000_000], codes[1_000_000:]
    auto, flat = HammingIndex(64), HammingIndex(64, method="flat")
    auto.add(db)
    flat.add(db)
    ad, ai = auto.search(q, 10)
    assert auto.last_method == "mih"
    fd, fi = flat.search(q, 10)
    np.testing.assert_array_equal(ad, fd)
    np.testing.assert_array_equal(ai, fi)
