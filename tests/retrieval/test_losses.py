"""Losses, CNNH stage 1 and the hashing baselines against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbir_engine.errors import ShapeError
from cbir_engine.retrieval.baselines import ITQ, LSH, pack_signs
from cbir_engine.train.cnnh import learn_codes, objective
from cbir_engine.train.losses import ContrastiveLoss, TripletLoss, pairwise_distances

# Distances carry sqrt(d^2 + 1e-12), so a distance of 0 reads as 1e-6.
HAND = 1e-5


def _t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_contrastive_pairs_by_hand():
    loss = ContrastiveLoss(margin=6.0)
    a = _t([[0, 0], [0, 0], [1, 1]])
    b = _t([[3, 4], [3, 4], [1, 1]])
    y = torch.tensor([1, 0, 0])
    # d = 5, match: 25/2; d = 5, non-match: (6-5)^2/2; d = 0, non-match: 6^2/2
    assert float(loss(a, b, y)) == pytest.approx((12.5 + 0.5 + 18.0) / 3, abs=HAND)
    # beyond the margin a non-matching pair costs nothing
    assert float(ContrastiveLoss(4.0)(a[:1], b[:1], torch.tensor([0]))) == pytest.approx(0.0, abs=HAND)


def test_contrastive_batch_by_hand():
    x = _t([[0], [1], [3]])
    labels = torch.tensor([0, 0, 1])
    # pairs: (0,1) d=1 match -> 1/2; (0,2) d=3 > 2.5 -> 0; (1,2) d=2 -> (0.5)^2/2
    assert float(ContrastiveLoss(2.5).batch(x, labels)) == pytest.approx((0.5 + 0 + 0.125) / 3, abs=HAND)


X4 = _t([[0], [1], [4], [2.5]])
Y4 = torch.tensor([0, 0, 1, 1])
# distances: d01=1 d02=4 d03=2.5 d12=3 d13=1.5 d23=1.5


def test_triplet_batch_hard_by_hand():
    # anchors: 0: relu(1 - 2.5 + 1) = 0; 1: relu(1 - 1.5 + 1) = .5; 2: relu(1.5 - 3 + 1) = 0;
    # 3: relu(1.5 - 1.5 + 1) = 1
    assert float(TripletLoss(1.0, "batch_hard")(X4, Y4)) == pytest.approx(1.5 / 4, abs=HAND)


def test_triplet_semi_hard_by_hand():
    # (a,p)=(0,1): nearest negative beyond 1 is 2.5 -> 0; (1,0): 1.5 -> .5; (2,3): 3 -> 0;
    # (3,2): beyond 1.5 strictly only 2.5 -> 0
    assert float(TripletLoss(1.0, "semi_hard")(X4, Y4)) == pytest.approx(0.5 / 4, abs=HAND)
    # no negative beyond the positive: the farthest negative is used
    x, y = _t([[0], [2], [1]]), torch.tensor([0, 0, 1])
    # (0,1): d_ap=2, only negative at 1 -> relu(2 - 1 + 1) = 2; (1,0): same
    assert float(TripletLoss(1.0, "semi_hard")(x, y)) == pytest.approx(2.0, abs=HAND)


def test_triplet_all_by_hand():
    # 8 triplets, non-zero: (1,0,3): relu(1 - 1.5 + 1) = .5; (3,2,1): relu(1.5 - 1.5 + 1) = 1
    assert float(TripletLoss(1.0, "all")(X4, Y4)) == pytest.approx(1.5 / 8, abs=HAND)


def test_triplet_gradients_are_finite_at_zero_distance():
    x = torch.zeros(4, 3, requires_grad=True)
    loss = TripletLoss(0.5, "batch_hard")(x, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert float(loss) == pytest.approx(0.5, abs=HAND) and torch.isfinite(x.grad).all()


def test_loss_argument_errors():
    with pytest.raises(ValueError):
        TripletLoss(1.0, "hardest")
    with pytest.raises(ValueError):
        ContrastiveLoss(0.0)
    with pytest.raises(ShapeError):
        TripletLoss()(torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(ShapeError):
        pairwise_distances(torch.zeros(3))


def test_cnnh_objective_by_hand():
    # labels (0, 0, 1) and codes (1, 1, -1) with q = 1: H H^T = S exactly
    assert objective(np.array([[1.0], [1.0], [-1.0]]), labels=np.array([0, 0, 1])) == pytest.approx(0.0)
    # labels (0, 1), codes (1, 1): residual [[0, -2], [-2, 0]] -> mean square 8 / 4
    h = np.array([[1.0], [1.0]])
    assert objective(h, labels=np.array([0, 1])) == pytest.approx(2.0)
    assert objective(h, s=np.array([[1.0, -1.0], [-1.0, 1.0]])) == pytest.approx(2.0)


def test_cnnh_stage1_codes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    h = learn_codes(16, labels=labels, iters=200, seed=0)
    assert h.shape == (300, 16) and set(np.unique(h)) <= {-1, 1}
    # every class gets one code, different classes different codes
    codes = {c: {tuple(r) for r in h[labels == c]} for c in range(4)}
    assert all(len(v) == 1 for v in codes.values())
    assert len({next(iter(v)) for v in codes.values()}) == 4
    random = np.where(rng.random((300, 16)) < 0.5, 1.0, -1.0)
    assert objective(h.astype(float), labels=labels) < objective(random, labels=labels) - 0.1
    # with 4 classes the optimum has cross-class inner products near -q/3; check we are close:
    # 3/4 of pairs at (-1 + 1/3)^2 -> 1/3 overall at best
    assert objective(h.astype(float), labels=labels) < 0.40
    # the dense-S path gives the same codes
    s = np.where(labels[:, None] == labels[None, :], 1.0, -1.0)
    np.testing.assert_array_equal(learn_codes(16, s=s, iters=200, seed=0), h)


def test_lsh_matches_the_angle_law():
    # P(bit differs) = angle / pi for random hyperplanes through the origin
    a = np.array([[1.0, 0.0]])
    b = np.array([[np.cos(np.pi / 3), np.sin(np.pi / 3)]])
    lsh = LSH(8192, seed=1).fit(np.zeros((2, 2)))
    differ = np.mean(np.sign(lsh.project(a)) != np.sign(lsh.project(b)))
    assert differ == pytest.approx(1 / 3, abs=0.02)


def test_itq_lowers_quantisation_error():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 32)) @ rng.standard_normal((32, 32))
    x /= 4 * np.abs(x).std()  # projections of order 1, where the rotation matters against the +-1 corners
    errors = [ITQ(16, iters=it, seed=0).fit(x).quantization_error(x) for it in (0, 5, 20, 50)]
    # each Procrustes step cannot raise ||B - VR||; 50 steps gain about 4.5% on this data
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < errors[0] * 0.97
    with pytest.raises(ShapeError):
        ITQ(64).fit(x)


def test_pack_signs_pads_to_bytes():
    codes, bits = pack_signs(np.array([[1.0] * 12, [-1.0] * 12]))
    assert bits == 16 and codes.tolist() == [[255, 15], [0, 0]]
