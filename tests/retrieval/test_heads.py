"""Retrieval heads: torch vs the engine (exported through ONNX), NetVLAD vs a direct numpy
reference, hash codes bit for bit, and the head constructions (k-means, PCA, R-MAC grid)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cbir_engine
from cbir_engine.index import pack_bits
from cbir_engine.models.small import SmallCNN
from cbir_engine.models.zoo import randomize_batchnorm
from cbir_engine.retrieval import heads as H
from cbir_engine.retrieval.kmeans import assign, kmeans
from tests.helpers import TOL, rel_err

SIGN_GUARD = 1e-5  # codes may differ only where the pre-sign value is this close to zero


def _trunk(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return randomize_batchnorm(SmallCNN(), seed).eval()


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(np.float32))


def _local_descriptors(trunk: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        f = trunk(x)
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).numpy()


def _netvlad(trunk: torch.nn.Module, k: int = 8) -> H.NetVLAD:
    return H.NetVLAD(k, trunk.out_channels, alpha=10.0).init_from_kmeans(
        _local_descriptors(trunk, _images(8, seed=9)), seed=0)


def _heads(trunk: SmallCNN) -> dict[str, torch.nn.Module]:
    c = trunk.out_channels
    pca = H.PCAWhitening(c, 32)
    with torch.no_grad():
        pca.fit(H.GeM()(trunk(_images(64, seed=4))).numpy())
    return {
        "mac": H.MAC(), "spoc": H.SPoC(), "gem": H.GeM(p=2.5), "rmac": H.RMAC(),
        "netvlad": _netvlad(trunk),
        "gem+pcaw": torch.nn.Sequential(H.GeM(), pca),
        "hash_presign": torch.nn.Sequential(H.GeM(), H.HashLayer(c, 48, binarize=False)),
    }


@pytest.mark.parametrize("name", ["mac", "spoc", "gem", "rmac", "netvlad", "gem+pcaw", "hash_presign"])
def test_engine_equals_torch(name):
    trunk = _trunk()
    model = H.Descriptor(trunk, _heads(trunk)[name]).eval()
    x = _images(3)
    with torch.no_grad():
        ref = model(x).numpy()
    engine = cbir_engine.from_torch(model, x[:1], threads=1)
    out = engine(x.numpy())
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= TOL["float32_deep"], name


def test_hash_codes_bit_for_bit():
    trunk = _trunk(1)
    gem, layer = H.GeM(), H.HashLayer(trunk.out_channels, 48)
    model = H.Descriptor(trunk, gem, layer).eval()
    x = _images(16, seed=2)
    with torch.no_grad():
        pre = layer.fc(gem(trunk(x))).numpy()
        ref = model(x).numpy()
    assert set(np.unique(ref)) <= {-1.0, 1.0}
    engine = cbir_engine.from_torch(model, x[:1], threads=1)
    out = engine(x.numpy())
    assert set(np.unique(out)) <= {-1.0, 1.0}
    differ = out != ref
    assert not (differ & (np.abs(pre) >= SIGN_GUARD)).any()
    # packed codes agree too, and a zero pre-sign value maps to a clear bit in both conventions
    safe = ~(np.abs(pre) < SIGN_GUARD).any(axis=1)
    np.testing.assert_array_equal(pack_bits(out[safe]), pack_bits(pre[safe]))


def test_resnet18_trunk_heads_through_engine():
    from cbir_engine.models.extractors import trunk

    t, _, c = trunk("resnet18")
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 3, 96, 96)).astype(np.float32))
    desc = _local_descriptors(t, x)
    for head in (H.GeM(), H.NetVLAD(4, c, alpha=10.0).init_from_kmeans(desc)):
        model = H.Descriptor(t, head).eval()
        with torch.no_grad():
            ref = model(x).numpy()
        out = cbir_engine.from_torch(model, x[:1], threads=1)(x.numpy())
        assert rel_err(out, ref) <= TOL["float32_deep"], type(head).__name__


def test_netvlad_equals_numpy_reference():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((2, 16, 5, 6)).astype(np.float32))
    # Without input normalisation the logits scale with ||x||^2; a small alpha keeps every cluster
    # some weight (a cluster with ~1e-30 total weight is intra-normalised from rounding noise).
    for normalize, alpha in ((True, 5.0), (False, 0.1)):
        head = H.NetVLAD(6, 16, alpha=alpha, normalize_input=normalize).init_from_kmeans(
            x.permute(0, 2, 3, 1).reshape(-1, 16).numpy())
        with torch.no_grad():
            out = head(x).numpy()
        ref = H.netvlad_reference(x.numpy(), head.assign.weight.detach().numpy(),
                                  head.assign.bias.detach().numpy(), head.centroids.detach().numpy(),
                                  normalize_input=normalize)
        assert rel_err(out, ref) <= TOL["float32"]
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_netvlad_kmeans_init_gives_hard_assignment_to_nearest_centroid():
    rng = np.random.default_rng(1)
    d = rng.standard_normal((200, 8)).astype(np.float32)
    head = H.NetVLAD(5, 8, alpha=1000.0).init_from_kmeans(d)
    dn = d / np.linalg.norm(d, axis=1, keepdims=True)
    with torch.no_grad():
        a = torch.softmax(head.assign(torch.from_numpy(dn)[:, :, None, None]), 1)[:, :, 0, 0].numpy()
    # w.x + b = -alpha (||x - c||^2 - ||x||^2): the largest logit is the nearest centroid
    assert (a.argmax(1) == assign(dn, head.centroids.detach().numpy())).all()


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(2)
    centres = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
    x = np.concatenate([c + rng.standard_normal((50, 2)) * 0.3 for c in centres])
    c = kmeans(x, 3, seed=0)
    order = np.argsort(c[:, 0] + 100 * c[:, 1])
    np.testing.assert_allclose(c[order], centres[[0, 1, 2]], atol=0.15)
    with pytest.raises(ValueError):
        kmeans(x, 1000)


def test_pca_whitening_decorrelates():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2000, 6)) @ rng.standard_normal((6, 6))).astype(np.float32) + 3.0
    w = H.PCAWhitening(6, 4, normalize=False).fit(x)
    with torch.no_grad():
        y = w(torch.from_numpy(x)).double().numpy()
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(4), atol=1e-3)


def test_rmac_grid_by_hand():
    # 7x7 map, 3 levels: side 7 (1 region); side floor(14/3)=4 at 0 and 3 (2x2); side
    # floor(14/4)=3 at 0, 2, 4 (3x3): 14 regions.
    r = H.rmac_regions(7, 7, 3)
    assert len(r) == 14
    assert r[0] == (0, 0, 7, 7)
    assert r[1:5] == [(0, 0, 4, 4), (0, 3, 4, 7), (3, 0, 7, 4), (3, 3, 7, 7)]
    assert r[5] == (0, 0, 3, 3) and r[-1] == (4, 4, 7, 7)
    # a wide map gets extra regions along its long side
    assert len(H.rmac_regions(7, 12, 3)) > 14


def test_head_rejects_wrong_rank():
    from cbir_engine.errors import ShapeError

    with pytest.raises(ShapeError):
        H.GeM()(torch.zeros(2, 3))
