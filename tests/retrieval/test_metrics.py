"""Metrics against rankings worked out by hand (the comments show the arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest

from cbir_engine.errors import ShapeError
from cbir_engine.retrieval import metrics as M

EXACT = 1e-12

# One database of 5 items, labels 0/1; three queries.
DB_Y = np.array([0, 1, 0, 1, 0])
Q_Y = np.array([0, 1, 7])
DIST = np.array([
    [3, 1, 1, 2, 0],   # ranking by (distance, id): 4, 1, 2, 3, 0 -> relevant: 1 0 1 0 1
    [0, 0, 0, 0, 0],   # all tied: 0, 1, 2, 3, 4               -> relevant: 0 1 0 1 0
    [1, 2, 3, 4, 5],   # label 7: nothing relevant
])


def test_rank_breaks_ties_by_smaller_id():
    ids = M.rank(DIST)
    assert ids[0].tolist() == [4, 1, 2, 3, 0]
    assert ids[1].tolist() == [0, 1, 2, 3, 4]


def test_average_precision_by_hand():
    ids = M.rank(DIST)
    rel = M._ranked_rel(ids, Q_Y, DB_Y)
    ap = M.average_precision(rel)
    # q0: hits at ranks 1, 3, 5 -> (1/1 + 2/3 + 3/5) / 3; q1: ranks 2, 4 -> (1/2 + 2/4) / 2; q2: 0
    assert ap[0] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3, abs=EXACT)
    assert ap[1] == pytest.approx(0.5, abs=EXACT)
    assert ap[2] == 0.0
    assert M.mean_average_precision(ids, Q_Y, DB_Y) == pytest.approx(
        ((1 + 2 / 3 + 3 / 5) / 3 + 0.5 + 0) / 3, abs=EXACT)
    # AP@3: q0 hits at ranks 1, 3 among the top 3 -> (1 + 2/3) / 2; q1: rank 2 -> (1/2) / 1
    ap3 = M.average_precision(rel, 3)
    assert ap3[0] == pytest.approx((1 + 2 / 3) / 2, abs=EXACT)
    assert ap3[1] == pytest.approx(0.5, abs=EXACT)


def test_tie_order_changes_the_answer():
    # With ties broken the other way (id 2 before id 1) q0 would score (1 + 1 + 3/5) / 3;
    # the stated rule gives the smaller value, so the rule is what the metric follows.
    ids = M.rank(DIST[:1])
    assert M.mean_average_precision(ids, Q_Y[:1], DB_Y) != pytest.approx((1 + 1 + 0.6) / 3)


def test_precision_and_recall_at_k_by_hand():
    ids = M.rank(DIST)
    # top 2: q0 -> {4, 1}: 1 relevant; q1 -> {0, 1}: 1; q2 -> 0
    assert M.precision_at(ids, Q_Y, DB_Y, 2) == pytest.approx((0.5 + 0.5 + 0) / 3, abs=EXACT)
    # recall@2: q0 1 of 3, q1 1 of 2; q2 has no relevant item and is left out
    assert M.recall_at(ids, Q_Y, DB_Y, 2) == pytest.approx((1 / 3 + 1 / 2) / 2, abs=EXACT)
    assert M.recall_at(ids, Q_Y, DB_Y, 5) == pytest.approx(1.0, abs=EXACT)


def test_precision_within_radius_by_hand():
    # radius 1: q0 gets {1, 2, 4}, 2 relevant -> 2/3; q1 gets all five, 2 relevant -> 2/5;
    # q2 gets {0}, none relevant -> 0
    p, got = M.precision_within_radius(DIST, Q_Y, DB_Y, radius=1)
    assert p == pytest.approx((2 / 3 + 2 / 5 + 0) / 3, abs=EXACT)
    assert got == 1.0
    # radius 0 for q2 retrieves nothing: it counts as precision 0 and as not retrieving
    p0, got0 = M.precision_within_radius(DIST[2:], Q_Y[2:], DB_Y, radius=0)
    assert (p0, got0) == (0.0, 0.0)


def test_hamming_pr_curve_by_hand():
    p, r = M.hamming_pr_curve(DIST[:1], Q_Y[:1], DB_Y, bits=3)
    # r=0: {4} -> 1/1, 1/3; r=1: {4,1,2} -> 2/3, 2/3; r=2: +{3} -> 2/4, 2/3; r=3: all -> 3/5, 1
    np.testing.assert_allclose(p, [1, 2 / 3, 2 / 4, 3 / 5], atol=EXACT)
    np.testing.assert_allclose(r, [1 / 3, 2 / 3, 2 / 3, 1], atol=EXACT)


def test_map_equals_sklearn_when_no_ties():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    dist = rng.random((20, 300))
    qy, dy = rng.integers(0, 4, 20), rng.integers(0, 4, 300)
    ours = M.mean_average_precision(M.rank(dist), qy, dy)
    ref = np.mean([average_precision_score(dy == qy[i], -dist[i]) for i in range(20)])
    assert ours == pytest.approx(ref, abs=1e-12)


def test_multi_hot_labels_share_any_label():
    q = np.array([[1, 0, 1]])
    db = np.array([[0, 0, 1], [0, 1, 0], [1, 1, 0]])
    assert M.relevance(q, db).tolist() == [[True, False, True]]
    ids = M.rank(np.array([[2, 0, 1]]))      # ranking 1, 2, 0 -> relevant 0 1 1
    assert M.mean_average_precision(ids, q, db) == pytest.approx((1 / 2 + 2 / 3) / 2, abs=EXACT)


def test_evaluate_hamming_matches_distance_ranking():
    from cbir_engine.index import HammingIndex, pack_bits

    rng = np.random.default_rng(1)
    bits = 16
    db = pack_bits(rng.integers(0, 2, (500, bits)))
    q = pack_bits(rng.integers(0, 2, (40, bits)))
    dy, qy = rng.integers(0, 5, 500), rng.integers(0, 5, 40)
    index = HammingIndex(bits, method="flat", threads=1)
    index.add(db)
    res = M.evaluate_hamming(index, q, qy, dy, ks=(10, 100), ns=(1, 50))
    dist = index.distances(q)
    ids = M.rank(dist)   # many ties with 16 bits: the index's order must equal the stable sort
    _, idx_ids = index.search(q, 500)
    np.testing.assert_array_equal(ids, idx_ids)
    assert res.map_all == pytest.approx(M.mean_average_precision(ids, qy, dy), abs=EXACT)
    assert res.map_at[10] == pytest.approx(M.mean_average_precision(ids, qy, dy, 10), abs=EXACT)
    assert res.precision_at[100] == pytest.approx(M.precision_at(ids, qy, dy, 100), abs=EXACT)
    assert res.recall_at[50] == pytest.approx(M.recall_at(ids, qy, dy, 50), abs=EXACT)
    assert res.precision_r2 == pytest.approx(M.precision_within_radius(dist, qy, dy, 2)[0], abs=EXACT)
    p, r = res.pr
    assert r[-1] == pytest.approx(1.0) and len(p) == bits + 1


def test_evaluate_float_cosine_and_l2():
    q = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    db = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.0]], np.float32)
    qy, dy = np.array([0, 1]), np.array([0, 1, 1, 0])
    # cosine: q0 ties db0 and db3 (both angle 0) -> 0, 3, 2, 1: relevant 1 1 0 0 -> AP 1
    # q1: db1 (angle 0), db2 (45 deg), then db0/db3 tied -> 1, 2, 0, 3: relevant 1 1 0 0 -> AP 1
    res = M.evaluate_float(q, db, qy, dy, metric="cosine", ks=(2,), ns=(1,), pr=False)
    assert res.map_all == pytest.approx(1.0, abs=EXACT)
    # l2: q0 -> distances 1, sqrt2, 1, 0.5 -> 3, 0, 2, 1: relevant 1 1 0 0
    # q1 -> distances sqrt5, 1, sqrt2, sqrt4.25 -> 1, 2, 3, 0: relevant 1 1 0 0
    res = M.evaluate_float(q, db, qy, dy, metric="l2", ks=(2,), ns=(1,))
    assert res.map_all == pytest.approx(1.0, abs=EXACT)
    assert res.precision_at[2] == pytest.approx(1.0, abs=EXACT)


def test_bad_shapes_raise_typed_errors():
    with pytest.raises(ShapeError):
        M.rank(np.zeros(3))
    with pytest.raises(ShapeError):
        M.relevance(np.zeros(3), np.zeros((3, 2)))
    with pytest.raises(ShapeError):
        M.evaluate_float(np.zeros((2, 3)), np.zeros((4, 2)), np.zeros(2), np.zeros(4))
