"""The GPU engine without a GPU: `load(device="cuda")` raises DeviceUnavailableError here, bad
arguments and operators without a GPU kernel get typed errors, and the whole lowering runs end to
end under the Triton interpreter against the CPU engine (gpu_engine_checks.py, child process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import cbir_engine  # noqa: E402
from cbir_engine.gpu.engine import GPU_OPS, GpuEngine, from_onnx, interpreting  # noqa: E402
from cbir_engine.torch_backend import export_onnx  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")


@pytest.fixture(scope="module")
def tiny_onnx() -> bytes:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 1, 1), torch.nn.ReLU()).eval()
    return export_onnx(net, torch.zeros(1, 3, 8, 8), opset=17)


@no_gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_load_cuda_without_gpu_raises_device_unavailable(tiny_onnx, precision):
    with pytest.raises(cbir_engine.DeviceUnavailableError, match="no CUDA GPU"):
        cbir_engine.load(tiny_onnx, device="cuda", precision=precision)


@no_gpu
def test_device_unavailable_is_a_typed_cbir_error(tiny_onnx):
    with pytest.raises(cbir_engine.CbirError):
        cbir_engine.load(tiny_onnx, device="cuda:0", gpu_backend="cuda")


def test_cpu_interpreter_mode_needs_triton_interpret(tiny_onnx):
    if interpreting():
        pytest.skip("TRITON_INTERPRET is set in this process")
    with pytest.raises(cbir_engine.DeviceUnavailableError, match="TRITON_INTERPRET"):
        from_onnx(tiny_onnx, device="cpu")


def test_bad_arguments(tiny_onnx):
    with pytest.raises(ValueError, match="precision"):
        from_onnx(tiny_onnx, device="cuda", precision="fp8")
    with pytest.raises(ValueError, match="backend"):
        from_onnx(tiny_onnx, device="cuda", backend="opencl")
    with pytest.raises(ValueError, match="needs device='cuda'"):
        cbir_engine.load(tiny_onnx, precision="fp16")
    assert isinstance(cbir_engine.load(tiny_onnx, precision="fp32"), cbir_engine.Engine)


def test_operator_without_gpu_kernel_is_named(monkeypatch):
    """An op the CPU runs on run-time data but the GPU path lacks is refused at load, by name."""
    from onnx import TensorProto, helper

    assert "ReduceProd" not in GPU_OPS
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1])
    node = helper.make_node("ReduceProd", ["x"], ["y"], name="prod_me", axes=[1], keepdims=1)
    model = helper.make_model(
        helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets device="cpu" through to the operator check
    with pytest.raises(cbir_engine.UnsupportedOpError, match="ReduceProd.*prod_me.*no GPU kernel"):
        from_onnx(model.SerializeToString(), device="cpu")
    assert cbir_engine.load(model.SerializeToString()) is not None  # the CPU engine runs it


def test_gpu_engine_matches_cpu_engine_under_interpreter():
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    out = subprocess.run(
        [sys.executable, str(REPO / "tests" / "cpu" / "gpu_engine_checks.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.split("\n")[-2] == "ok 25", out.stdout  # 4 nets x 2 batches x 3 precisions + 1


def test_repr_and_names():
    assert GpuEngine.__doc__ and "cbir_engine.load" in GpuEngine.__doc__


def test_auto_backend_keeps_the_faster_kernel():
    from cbir_engine.gpu.engine import pick_fastest

    times = {"triton": 2.0, "cuda": 1.5}
    assert pick_fastest({"triton": "t", "cuda": "c"}, lambda fn: times[{"t": "triton", "c": "cuda"}[fn]]) == (
        "cuda",
        times,
    )
    assert pick_fastest({"triton": 1, "cuda": 2}, lambda fn: 1.0)[0] == "triton"  # a tie: the first

    def flaky(fn):
        if fn == "c":
            raise RuntimeError("no kernel for this shape")
        return 3.0

    name, got = pick_fastest({"triton": "t", "cuda": "c"}, flaky)
    assert name == "triton" and got["cuda"] == float("inf")
    with pytest.raises(RuntimeError, match="no kernel"):
        pick_fastest({"cuda": "c"}, flaky)


def test_auto_backend_needs_a_gpu(tiny_onnx, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(cbir_engine.DeviceUnavailableError, match="'auto'"):
        from_onnx(tiny_onnx, device="cpu", backend="auto")


def test_epilogue_activation_codes():
    import math

    from cbir_engine.gpu.engine import epilogue_activation
    from cbir_engine.graph.ir import Node
    from cbir_engine.kernels.common import ACT_CLIP, ACT_LEAKY, ACT_NONE, ACT_RELU, ACT_SIGMOID

    def conv(act: str = "", **attrs) -> Node:
        return Node("Conv", ["x", "w"], ["y"], {"activation": act, "activation_attrs": attrs} if act else {})

    assert epilogue_activation(conv()) == (ACT_NONE, 0.0, 0.0)
    assert epilogue_activation(conv("Relu")) == (ACT_RELU, 0.0, 0.0)
    assert epilogue_activation(conv("Sigmoid"))[0] == ACT_SIGMOID
    assert epilogue_activation(conv("Clip", min=0.0, max=6.0)) == (ACT_CLIP, 0.0, 6.0)
    assert epilogue_activation(conv("Clip", max=6.0)) == (ACT_CLIP, -math.inf, 6.0)
    assert epilogue_activation(conv("LeakyRelu", alpha=0.2)) == (ACT_LEAKY, 0.2, 0.0)
    with pytest.raises(cbir_engine.UnsupportedOpError, match="fused activation Gelu"):
        epilogue_activation(conv("Gelu"))
