"""The GPU engine's lowering run end to end on the CPU: TRITON_INTERPRET=1 runs its Triton
kernels on CPU tensors (device="cpu"), and the outputs are compared with the CPU engine's.
Run by test_gpu_engine.py in a child process; prints 'ok CASES'."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import cbir_engine
from cbir_engine.gpu.engine import from_onnx
from cbir_engine.retrieval.heads import NetVLAD
from cbir_engine.torch_backend import export_onnx

# max |gpu - cpu| / max |cpu| per compute dtype (the tiers for fp16 and fp32; bf16 has 3
# fewer mantissa bits than fp16).
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}


class Mixed(nn.Module):
    """Every lowering of the GPU path in one small net: conv+BN+ReLU, a residual block, max and
    average pooling (count_include_pad, ceil_mode), a depthwise conv, 1x7 / 7x1 convs, a grouped
    conv, a concat, an SE-style channel gate (broadcast Mul), global pooling, flatten and Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(16, 16, 3, 1, 1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, 1, 1, bias=False),
            nn.BatchNorm2d(16),
        )
        self.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.ReLU())
        self.fact = nn.Sequential(
            nn.Conv2d(16, 7, (1, 7), 1, (0, 3)), nn.ReLU(), nn.Conv2d(7, 9, (7, 1), 1, (3, 0))
        )
        self.grouped = nn.Conv2d(16, 8, 3, 1, 1, groups=4)
        self.avg = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(33, 33, 1), nn.Sigmoid())
        self.fc = nn.Linear(33, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.body(x) + x)
        x = self.pool(x)
        y = torch.cat([self.dw(x), self.fact(x), self.grouped(x)], dim=1)
        y = self.avg(y)
        y = y * self.gate(y)
        return self.fc(torch.flatten(nn.functional.adaptive_max_pool2d(y, 1), 1))


class VladNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 24, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = NetVLAD(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class PreactSE(nn.Module):
    """The two CPU-side fusions the GPU path must honour: a pre-activation BN+ReLU folded into the
    1x1 conv after it (DenseNet), and an SE tail (scale Mul + residual Add + ReLU) as one Mul."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, 1, 1)
        self.pre = nn.Sequential(nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 12, 1))
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(12, 12, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.pre(x)
        return torch.relu(y * self.gate(y) + x)


class Transition(nn.Module):
    """DenseNet's transition after a concat: BN -> ReLU -> 1x1 conv -> 2x2 average pool, which
    the graph passes turn into pool -> conv (pool_before_pointwise_conv), the pool applying the
    BN+ReLU as it reads (fuse_input_affine)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, 1, 1), nn.Conv2d(3, 4, 1)
        self.t = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.AvgPool2d(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.t(torch.cat([self.a(x), self.b(x)], 1))


def randomize_bn(m: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=gen) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
            mod.bias.data.copy_(torch.randn(mod.num_features, generator=gen) * 0.1)
    return m.eval()


def layout_ops_model() -> bytes:
    """Pad, Slice, Split, Flatten and LpNormalization on run-time tensors, plus Sum
    and Mean (imported as Adds and a Div). ONNX built by hand: torch's exporter writes
    LpNormalization as smaller ops."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 56])
    inits = [
        numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 1, 0], np.int64), "pads"),
        numpy_helper.from_array(np.array([1, 1], np.int64), "starts"),
        numpy_helper.from_array(np.array([5, 9], np.int64), "ends"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
        numpy_helper.from_array(np.array([1, 1], np.int64), "steps"),
        numpy_helper.from_array(np.array([2, 2], np.int64), "split"),
    ]
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], mode="constant"),
        helper.make_node("Slice", ["p", "starts", "ends", "axes", "steps"], ["s"]),
        helper.make_node("Split", ["s", "split"], ["a", "b"], axis=1),
        helper.make_node("Sum", ["a", "b", "a"], ["c"]),
        helper.make_node("Mean", ["c", "b"], ["m"]),
        helper.make_node("Flatten", ["m"], ["f"], axis=1),
        helper.make_node("LpNormalization", ["f"], ["y"], axis=1, p=2),
    ]
    graph = helper.make_graph(nodes, "layout", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def check_layout_ops() -> int:
    onnx_bytes = layout_ops_model()
    cpu = cbir_engine.load(onnx_bytes, threads=1)
    assert {n.op for n in cpu.graph.nodes} == {
        "Pad",
        "Slice",
        "Split",
        "Add",
        "Div",
        "Flatten",
        "LpNormalization",
    }
    x = torch.randn(2, 4, 6, 6)
    ref = cpu(x.numpy()).astype(np.float64)
    gpu = from_onnx(onnx_bytes, device="cpu", precision="fp32")
    err = float(np.abs(gpu(x).numpy() - ref).max() / np.abs(ref).max())
    assert err <= TOLERANCE["fp32"], f"layout ops: {err:.3g}"
    return 1


def main() -> int:
    torch.manual_seed(0)
    cases = 0
    expected_ops = {
        "Mixed": {"Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Mul", "Flatten", "Gemm"},
        "VladNet": {"Conv", "MaxPool", "NetVLAD"},
        "PreactSE": {"Conv", "GlobalAveragePool", "Mul"},
        "Transition": {"Conv", "Concat", "AveragePool"},
    }
    worst: dict[str, float] = {}
    for net, size in ((Mixed(), 19), (VladNet(), 10), (PreactSE(), 9), (Transition(), 8)):
        net = randomize_bn(net, 1)
        onnx_bytes = export_onnx(net, torch.zeros(1, 3, size, size), opset=17)
        cpu = cbir_engine.load(onnx_bytes, threads=1)
        ops = {n.op for n in cpu.graph.nodes}
        assert ops == expected_ops[type(net).__name__], ops
        convs = [n for n in cpu.graph.nodes if n.op == "Conv"]
        if isinstance(net, Mixed):  # the fused epilogues and the depthwise path are exercised
            assert any(n.input(3) for n in convs) and any(n.attrs.get("activation") for n in convs)
            assert any(n.attrs.get("group", 1) == 16 for n in convs)
        if isinstance(net, PreactSE):
            assert any(n.input(4) and n.attrs.get("input_activation") == "Relu" for n in convs)
            assert any(n.op == "Mul" and len(n.inputs) == 3 for n in cpu.graph.nodes)
        if isinstance(net, Transition):  # the pool applies the BN+ReLU as it reads; the last conv reads it
            order = [n.op for n in cpu.graph.nodes]
            assert order.index("AveragePool") < len(order) - 1 and order[-1] == "Conv", order
            pool = next(n for n in cpu.graph.nodes if n.op == "AveragePool")
            assert pool.input(1) and pool.attrs.get("input_activation") == "Relu", pool.inputs
        for batch in (1, 2):
            x = torch.randn(batch, 3, size, size)
            ref = cpu(x.numpy()).astype(np.float64)
            for precision, tol in TOLERANCE.items():
                gpu = from_onnx(onnx_bytes, device="cpu", precision=precision)
                out = gpu(x)
                assert out.dtype == torch.float32 and tuple(out.shape) == ref.shape, (out.dtype, out.shape)
                err = float(np.abs(out.numpy() - ref).max() / np.abs(ref).max())
                assert err <= tol, (
                    f"{type(net).__name__} batch {batch} {precision}: {err:.3g} > {tol} ({ops})"
                )
                worst[precision] = max(worst.get(precision, 0.0), err)
                cases += 1
    print("worst relative errors:", {k: f"{v:.2g}" for k, v in worst.items()})
    return cases + check_layout_ops()


if __name__ == "__main__":
    from cbir_engine.gpu.engine import interpreting

    assert interpreting(), "run with TRITON_INTERPRET=1"
    count = main()
    print("ok", count)
