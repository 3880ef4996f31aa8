"""Every seed network, exported to ONNX with seeded random weights and randomised BatchNorm
statistics, gives the same outputs in the engine as in ONNX Runtime and in torch, at batch 1 and
batch 3 from one loaded model (max |diff| / max |ref| <= 1e-4, float32)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

import cbir_engine  # noqa: E402
from cbir_engine.models import SEED_NETWORKS, build  # noqa: E402
from cbir_engine.torch_backend import export_onnx  # noqa: E402

TOL = 1e-4


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SEED_NETWORKS))
def test_seed_network_matches_onnxruntime_and_torch(name: str) -> None:
    torch.set_num_threads(2)
    module, size = build(name, seed=0)
    onnx_bytes = export_onnx(module, torch.zeros(1, 3, size, size), opset=17)
    engine = cbir_engine.load(onnx_bytes, threads=2)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        ours = engine(x)
        ref_ort = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        with torch.inference_mode():
            ref_torch = module(torch.from_numpy(x)).numpy()
        assert ours.shape == ref_ort.shape == ref_torch.shape
        assert np.isfinite(ref_torch).all()
        e_ort, e_torch = rel_err(ours, ref_ort), rel_err(ours, ref_torch)
        assert e_ort <= TOL, f"{name} batch {batch}: vs ONNX Runtime {e_ort:.2e}"
        assert e_torch <= TOL, f"{name} batch {batch}: vs torch {e_torch:.2e}"
    # Every BN that follows a conv is folded into it; only pre-activation BNs (DenseNet's, after
    # a concat) remain, as one channel-affine kernel each.
    producers = engine.graph.producers()
    left = [n for n in engine.graph.nodes if n.op == "BatchNormalization"]
    assert all(producers.get(n.inputs[0]) is None or producers[n.inputs[0]].op != "Conv" for n in left)
