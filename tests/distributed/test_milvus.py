"""Milvus Lite holds the same codes as HammingIndex and answers the same: top-k distances (and,
with ties resolved by id, the same ids), and range search at the same inclusive radius although
Milvus's own range search is exclusive at the radius."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="the distributed extra is not installed")

from cbir_engine.index import HammingIndex, IndexArgumentError  # noqa: E402
from cbir_engine.index.milvus import MilvusHammingIndex  # noqa: E402


def _milvus_children() -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True) if "milvus" in p.name().lower()]


@pytest.fixture(scope="module")
def fashion_codes(hash_model: Path) -> tuple[np.ndarray, np.ndarray]:
    """48-bit codes of the 10,000 Fashion-MNIST test images from the demo model (real codes:
    many duplicates and ties), with shuffled, gapped ids."""
    import cbir_engine
    from cbir_engine.data import DatasetUnavailableError, fashion_mnist
    from cbir_engine.index import pack_bits
    from cbir_engine.store.images import normalise
    from cbir_engine.store.model_info import read_model_info

    try:
        x, _ = fashion_mnist("test")
    except DatasetUnavailableError as e:
        pytest.skip(str(e))
    info = read_model_info(hash_model)
    engine = cbir_engine.load(os.fspath(hash_model))
    codes = np.concatenate([pack_bits(np.asarray(engine(normalise(x[s:s + 500, :, :, None], info))))
                            for s in range(0, len(x), 500)])
    ids = np.random.default_rng(5).permutation(10 * len(x))[: len(x)].astype(np.int64)
    return codes, ids


@pytest.fixture(scope="module")
def both(fashion_codes, tmp_path_factory):
    codes, ids = fashion_codes
    ours = HammingIndex(48)
    ours.add(codes, ids)
    uri = tmp_path_factory.mktemp("milvus") / "codes.db"
    before = set(_milvus_children())
    theirs = MilvusHammingIndex.export(ours, uri, "fashion")
    started = set(_milvus_children()) - before
    assert started, "no Milvus Lite server process was started"
    yield ours, theirs
    theirs.close()
    assert not set(_milvus_children()) & started, "the Milvus Lite server outlived close()"


def test_export_holds_every_code(both):
    ours, theirs = both
    assert theirs.ntotal == ours.ntotal == 10_000
    assert theirs.bits == 48 and theirs.index_type == "BIN_FLAT"


@pytest.mark.parametrize("k", [1, 10, 100])
def test_topk_equals_hamming_index(both, fashion_codes, k):
    ours, theirs = both
    codes, _ = fashion_codes
    rng = np.random.default_rng(k)
    queries = np.concatenate([codes[rng.integers(0, len(codes), 40)],
                              rng.integers(0, 256, (10, 6), dtype=np.uint8)])
    want_d, want_i = ours.search(queries, k)
    got_d, got_i = theirs.search(queries, k)
    assert np.array_equal(got_d, want_d)
    assert np.array_equal(got_i, want_i)  # ties at the k-th distance resolved by id as ours
    # Milvus's own pick among tied codes: the same distances, ids that really are at them.
    raw_d, raw_i = theirs.search(queries, k, exact_ties=False)
    assert np.array_equal(raw_d, want_d)
    recomputed = ours.distances(queries)
    pos = {int(i): j for j, i in enumerate(ours.ids)}
    for r in range(len(queries)):
        assert [recomputed[r, pos[int(i)]] for i in raw_i[r]] == raw_d[r].tolist()


def test_range_search_is_inclusive_like_ours(both, fashion_codes):
    import pymilvus

    ours, theirs = both
    codes, _ = fashion_codes
    queries = codes[:25]
    for radius in (0, 2, 5):
        want = ours.range_search(queries, radius)
        got = theirs.range_search(queries, radius)
        for a, b in zip(got, want, strict=True):
            assert np.array_equal(a, b)
    # What the adjustment is for: asked directly for radius 5, Milvus leaves out distance 5.
    lims, dist, _ = ours.range_search(queries, 5)
    assert (dist == 5).any()
    client = pymilvus.MilvusClient(uri=theirs.uri)
    res = client.search("fashion", data=[q.tobytes() for q in queries], anns_field="code", limit=16384,
                        search_params={"metric_type": "HAMMING", "params": {"radius": 5, "range_filter": 0}})
    direct = [h["distance"] for hits in res for h in hits]
    assert max(direct) < 5 and len(direct) == int((dist < 5).sum())


def test_a_collection_exports_with_its_ids(hash_model, tmp_path):
    """An on-disk index (`cbir index`) goes to Milvus as it is, ids included."""
    from cbir_engine.data import FASHION_MNIST_CLASSES, fashion_mnist
    from cbir_engine.demo import write_pngs
    from cbir_engine.store import Collection

    x, y = fashion_mnist("test")
    write_pngs(x[:150], y[:150], tmp_path / "images", FASHION_MNIST_CLASSES)
    with Collection.create(tmp_path / "small.index", hash_model) as coll:
        coll.update(tmp_path / "images")
        with MilvusHammingIndex.export(coll, tmp_path / "small.db", "small") as m:
            q = np.asarray(coll.index.codes[:10])
            d, i = m.search(q, 5)
            want_d, want_i = coll.index.search(q, 5)
            assert np.array_equal(d, want_d) and np.array_equal(i, want_i)


def test_refusals(tmp_path, both):
    ours, _ = both
    with pytest.raises(IndexArgumentError, match="BIN_IVF_FLAT needs a Milvus server"):
        MilvusHammingIndex.create(tmp_path / "x.db", "c", 48, index_type="BIN_IVF_FLAT")
    with pytest.raises(IndexArgumentError, match="index_type"):
        MilvusHammingIndex.create(tmp_path / "x.db", "c", 48, index_type="HNSW")
    with MilvusHammingIndex.create(tmp_path / "y.db", "c", 16) as m:
        with pytest.raises(IndexArgumentError, match="already has a collection"):
            MilvusHammingIndex.create(tmp_path / "y.db", "c", 16)
        with pytest.raises(IndexArgumentError, match="no collection"):
            MilvusHammingIndex(tmp_path / "y.db", "other")
        with pytest.raises(Exception, match="bytes"):
            m.add(np.zeros((3, 6), np.uint8), np.arange(3))
