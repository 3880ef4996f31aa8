"""The networks this package defines (BN-Inception, SE-BN-Inception, DenseNet-BC, the small 28x28
nets) run in the engine equal to torch, whole and as trunks under a retrieval head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cbir_engine
from cbir_engine.models import ZOO_ADDITIONS, build
from cbir_engine.models.extractors import trunk
from cbir_engine.retrieval import heads as H
from cbir_engine.torch_backend import export_onnx
from tests.helpers import TOL, rel_err


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO_ADDITIONS))
def test_zoo_addition_matches_torch(name):
    torch.set_num_threads(2)
    module, size = build(name, seed=0)
    chans = ZOO_ADDITIONS[name].in_chans
    engine = cbir_engine.load(export_onnx(module, torch.zeros(1, chans, size, size)), threads=2)
    x = np.random.default_rng(0).standard_normal((2, chans, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    assert np.isfinite(ref).all()
    for batch in (1, 2):
        assert rel_err(engine(x[:batch]), ref[:batch]) <= TOL["float32_deep"], f"{name} batch {batch}"


def test_paper_shapes():
    # BN-Inception: 1024 channels at 7x7 for 224 inputs; DenseNet-BC: 2k + 3 n k channels halved
    # by the two transitions (k=12, n=6: 24 -> 96 -> 48 -> 120 -> 60 -> 132).
    m, _ = build("bn_inception")
    assert m.features(torch.zeros(1, 3, 224, 224)).shape == (1, 1024, 7, 7)
    assert trunk("densenet_bc_40_12")[2] == 132
    assert trunk("densenet_bc_100_24")[2] == 684  # 48 -> 432 -> 216 -> 600 -> 300 -> 684
    n_se = sum(isinstance(mod, H.nn.Module) and type(mod).__name__ == "SqueezeExcite"
               for mod in build("se_bn_inception")[0].modules())
    assert n_se == 10  # one per Inception module


def test_small_trunk_with_gem_through_engine():
    t, size, c = trunk("densenet_bc_40_12_28px")
    model = H.Descriptor(t, H.GeM()).eval()
    x = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    engine = cbir_engine.from_torch(model, torch.zeros(1, 1, 28, 28), threads=1)
    assert "GeM" in [n.op for n in engine.graph.nodes]
    assert ref.shape == (3, c) and rel_err(engine(x), ref) <= TOL["float32_deep"]
