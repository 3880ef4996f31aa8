"""ShardedHammingIndex over Ray actors returns exactly what one HammingIndex over all the codes
returns (k-NN with ties by id, and range search), on 1M codes in 4 shards; a dead shard is an
error, or with allow_partial the other shards' exact answer plus the missing shard's number;
shards loaded from files come back after their actor is killed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cbir_engine.distributed import ShardedHammingIndex, ShardUnavailableError, merge_topk
from cbir_engine.index import HammingIndex, IndexArgumentError

N_CODES = 1_000_000


def test_merge_topk_equals_one_sort_by_distance_then_id():
    """The merge alone (no Ray): random per-part lists, heavy ties."""
    rng = np.random.default_rng(3)
    parts, all_d, all_i = [], [], []
    ids = rng.permutation(400).reshape(4, 100)
    for p in range(4):
        d = rng.integers(0, 5, (7, 100))
        i = np.broadcast_to(ids[p], (7, 100))
        order = np.array([np.lexsort((i[r], d[r])) for r in range(7)])  # each part sorted by (d, id)
        d = np.take_along_axis(d, order, 1)
        i = np.take_along_axis(i, order, 1)
        parts.append((d[:, :10], i[:, :10]))
        all_d.append(d)
        all_i.append(i)
    d_all = np.concatenate(all_d, 1)
    i_all = np.concatenate(all_i, 1)
    md, mi = merge_topk(parts, 10)
    for r in range(7):
        order = np.lexsort((i_all[r], d_all[r]))[:10]
        assert np.array_equal(md[r], d_all[r][order]) and np.array_equal(mi[r], i_all[r][order])


@pytest.fixture(scope="module")
def million():
    """1M random 64-bit codes with shuffled, gapped ids, the same codes in one HammingIndex, and
    queries: random codes plus stored codes (distance 0) plus near copies (ties)."""
    rng = np.random.default_rng(7)
    codes = rng.integers(0, 256, (N_CODES, 8), dtype=np.uint8)
    codes[1000:1100] = codes[0]  # a block of duplicates: ties at distance 0 across shards
    ids = rng.permutation(3 * N_CODES)[:N_CODES].astype(np.int64)
    one = HammingIndex(64, method="flat")
    one.add(codes, ids)
    queries = np.concatenate([rng.integers(0, 256, (40, 8), dtype=np.uint8), codes[:20],
                              codes[rng.integers(0, N_CODES, 20)] ^ np.uint8(1)])
    return codes, ids, one, queries


@pytest.fixture(scope="module")
def four_shards(ray_cluster, million):
    codes, ids, _, _ = million
    index = ShardedHammingIndex(64, shards=4, cpus_per_shard=0.25)
    t0 = time.perf_counter()
    index.add(codes, ids)
    print(f"\n1M codes into 4 shard actors: {time.perf_counter() - t0:.2f} s")
    yield index
    index.close()


@pytest.mark.parametrize("k", [1, 10, 100])
def test_four_shards_equal_one_index(four_shards, million, k):
    _, _, one, queries = million
    assert four_shards.ntotal == N_CODES
    t0 = time.perf_counter()
    got = four_shards.search(queries, k)
    t_sharded = time.perf_counter() - t0
    want_d, want_i = one.search(queries, k)
    assert got.complete and got.missing_shards == ()
    assert np.array_equal(got.distances, want_d) and np.array_equal(got.ids, want_i)
    if k == 100:
        print(f"\n{len(queries)} queries, k={k}: 4 shards {t_sharded * 1e3:.0f} ms")
    # The duplicates really tie across shards and come back in id order.
    zero = got.distances[40] == 0
    assert zero.sum() == min(k, 101)


def test_four_shards_range_search_equals_one_index(four_shards, million):
    _, _, one, queries = million
    for radius in (0, 12):
        got = four_shards.range_search(queries, radius)
        lims, d, i = one.range_search(queries, radius)
        assert got.missing_shards == ()
        assert np.array_equal(got.lims, lims)
        assert np.array_equal(got.distances, d) and np.array_equal(got.ids, i)
    assert lims[-1] > len(queries)  # radius 12 finds more than the exact copies


def test_bad_arguments(four_shards, million):
    _, _, _, queries = million
    with pytest.raises(IndexArgumentError):
        four_shards.search(queries, 0)
    with pytest.raises(IndexArgumentError):
        four_shards.search(queries, N_CODES + 1)
    with pytest.raises(Exception, match="bytes"):
        four_shards.search(queries[:, :4], 5)


def _wait_until_dead(actor, timeout: float = 30.0) -> None:
    """ray.kill only asks; a call made at once may still be served."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ntotal.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError("the killed shard actor kept answering")


def test_dead_shard_is_an_error_or_a_named_gap(ray_cluster):
    import ray

    rng = np.random.default_rng(11)
    codes = rng.integers(0, 256, (20_000, 4), dtype=np.uint8)
    ids = np.arange(20_000, dtype=np.int64) * 5
    index = ShardedHammingIndex(32, shards=4, cpus_per_shard=0.25)
    try:
        index.add(codes, ids)
        queries = codes[:30]
        ray.kill(index.actors[2], no_restart=True)
        _wait_until_dead(index.actors[2])
        with pytest.raises(ShardUnavailableError, match="shard 2 ") as err:
            index.search(queries, 10)
        assert err.value.shards == (2,)
        with pytest.raises(ShardUnavailableError):
            index.range_search(queries, 3)
        got = index.search(queries, 10, allow_partial=True)
        assert got.missing_shards == (2,) and not got.complete
        # Exactly the answer of the three live shards' codes.
        live = index.shard_of(ids) != 2
        rest = HammingIndex(32)
        rest.add(codes[live], ids[live])
        want_d, want_i = rest.search(queries, 10)
        assert np.array_equal(got.distances, want_d) and np.array_equal(got.ids, want_i)
        r = index.range_search(queries, 3, allow_partial=True)
        lims, d, i = rest.range_search(queries, 3)
        assert r.missing_shards == (2,) and np.array_equal(r.ids, i) and np.array_equal(r.lims, lims)
    finally:
        index.close()


def test_shards_from_files_come_back_after_a_kill(ray_cluster, tmp_path):
    import ray

    rng = np.random.default_rng(12)
    codes = rng.integers(0, 256, (8_000, 6), dtype=np.uint8)
    ids = rng.permutation(50_000)[:8_000].astype(np.int64)
    one = HammingIndex(48)
    one.add(codes, ids)
    first = ShardedHammingIndex(48, shards=2, cpus_per_shard=0.25)
    first.add(codes, ids)
    paths = first.save_shards(tmp_path / "shards")
    first.close()
    index = ShardedHammingIndex.from_files(paths, cpus_per_shard=0.25)
    try:
        actor = index.actors[0]
        before = ray.get(actor.pid.remote())
        ray.kill(actor, no_restart=False)  # Ray restarts it; it reloads its file
        deadline = time.monotonic() + 180  # a restart starts a worker process: slow on a busy machine
        after = before
        while after == before and time.monotonic() < deadline:
            try:
                after = ray.get(actor.pid.remote(), timeout=10)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                time.sleep(0.2)
        assert after != before, "the shard actor was not restarted"
        got = index.search(codes[:25], 7)
        want_d, want_i = one.search(codes[:25], 7)
        assert got.complete
        assert np.array_equal(got.distances, want_d) and np.array_equal(got.ids, want_i)
    finally:
        index.close()


def test_in_memory_shards_are_never_restarted_empty(ray_cluster):
    with pytest.raises(IndexArgumentError, match="come back empty"):
        ShardedHammingIndex(64, shards=2, max_restarts=1)
