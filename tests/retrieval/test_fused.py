"""Fused NetVLAD and GeM: the pass finds the exported subgraphs, one kernel runs each, and the
output equals the unfused graph (and torch, and the numpy references); Sign for hash codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cbir_engine
from cbir_engine.graph.passes.fuse_netvlad import netvlad_forward
from cbir_engine.models.small import SmallCNN
from cbir_engine.models.zoo import randomize_batchnorm
from cbir_engine.retrieval import heads as H
from cbir_engine.torch_backend import export_onnx
from tests.helpers import TOL, reference, rel_err, single_node_model

FUSED_VS_UNFUSED = 1e-5  # same float32 maths in another order


def _trunk() -> SmallCNN:
    torch.manual_seed(0)
    return randomize_batchnorm(SmallCNN(), 0).eval()


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(np.float32)


def _ops(engine: cbir_engine.Engine) -> list[str]:
    return [n.op for n in engine.graph.nodes]


def _check(model: torch.nn.Module, fused_op: str, dynamo: bool = False, threads: int = 1) -> None:
    x = _x(4)
    onnx_bytes = export_onnx(model, torch.from_numpy(x[:1]), dynamo=dynamo, opset=18 if dynamo else 17)
    fused = cbir_engine.load(onnx_bytes, threads=threads)
    plain = cbir_engine.load(onnx_bytes, threads=threads, optimize=False)
    assert fused_op in _ops(fused) and fused_op not in _ops(plain)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    for batch in (1, 4):  # the batch dim stays dynamic through the fusion
        out, unf = fused(x[:batch]), plain(x[:batch])
        assert rel_err(out, unf) <= FUSED_VS_UNFUSED
        assert rel_err(out, ref[:batch]) <= TOL["float32_deep"]
    kernels = [row["kernel"] for row in fused.profile(x)]
    assert sum(k.startswith(fused_op.lower() + " ") for k in kernels) == 1


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dynamo", [False, True])
def test_netvlad_fuses(normalize, dynamo):
    t = _trunk()
    with torch.no_grad():
        desc = t(torch.from_numpy(_x(6, 1))).permute(0, 2, 3, 1).reshape(-1, 128).numpy()
    alpha = 10.0 if normalize else 0.05
    head = H.NetVLAD(8, 128, alpha=alpha, normalize_input=normalize).init_from_kmeans(desc)
    _check(H.Descriptor(t, head).eval(), "NetVLAD", dynamo=dynamo, threads=2)


@pytest.mark.parametrize("p", [3.0, 2.4])
def test_gem_fuses(p):
    _check(H.Descriptor(_trunk(), H.GeM(p=p)).eval(), "GeM")


def test_gem_fuses_dynamo():
    _check(H.Descriptor(_trunk(), H.GeM()).eval(), "GeM", dynamo=True)


class _TwoOutputs(torch.nn.Module):
    """NetVLAD whose soft-assignment is also an output: fusing would lose it."""

    def __init__(self, head: H.NetVLAD) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(x), torch.softmax(self.head.assign(H.l2n(x, 1)), 1)


def test_no_fusion_when_an_intermediate_is_used_elsewhere():
    head = H.NetVLAD(4, 16)
    x = torch.randn(1, 16, 5, 5)
    engine = cbir_engine.load(export_onnx(_TwoOutputs(head).eval(), x))
    assert "NetVLAD" not in _ops(engine)
    # ... but the shared Conv/Softmax are still computed once and correctly
    with torch.no_grad():
        ref = head(x).numpy()
    assert rel_err(engine(x.numpy())[0], ref) <= TOL["float32"]

    class GemAndMean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pooled = torch.nn.functional.adaptive_avg_pool2d(x.clamp(min=1e-6).pow(3.0), 1)
            return pooled.pow(1 / 3.0), pooled

    engine = cbir_engine.load(export_onnx(GemAndMean(), x))
    assert "GeM" not in _ops(engine)


def test_gem_needs_matching_shape_of_clip():
    # Clip with an upper bound is not GeM's clamp.
    class Capped(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x.clamp(1e-6, 5.0).pow(3.0), 1).pow(1 / 3.0)

    engine = cbir_engine.load(export_onnx(Capped(), torch.rand(1, 4, 3, 3)))
    assert "GeM" not in _ops(engine)
    x = np.random.default_rng(0).random((2, 4, 3, 3)).astype(np.float32) * 8
    with torch.no_grad():
        ref = Capped()(torch.from_numpy(x)).numpy()
    assert rel_err(engine(x), ref) <= TOL["float32"]


def test_netvlad_ir_reference_equals_loop_reference():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 12, 4, 5)).astype(np.float32)
    w, b, c = (rng.standard_normal(s).astype(np.float32) for s in ((5, 12), (5,), (5, 12)))
    for normalize in (True, False):
        ours = netvlad_forward(x, w, b, c, normalize, 1e-12, 1e-12, 1e-12)
        ref = H.netvlad_reference(x, w, b, c, normalize_input=normalize)
        assert rel_err(ours, ref) <= TOL["float32"]


def test_sign_kernel_matches_onnx_reference():
    x = np.array([[-2.0, -0.0, 0.0, 1e-30, -1e-30, 3.0, np.inf, -np.inf]], np.float32)
    model = single_node_model("Sign", {"x": x})
    out = cbir_engine.load(model)(x)
    np.testing.assert_array_equal(out, reference(model, {"x": x})[0])
    np.testing.assert_array_equal(out, [[-1, 0, 0, 1, -1, 1, 1, -1]])
