"""Concatenations at batch > 1 without copies: the convs and pools that produce a concat's inputs
write channel slices of its buffer in place (a batch stride between images), and the convs that
read an earlier, shorter concat read a prefix of the same buffer (DenseNet). Where a slice would
be read or written by a step that takes no batch stride, the concat copies as before."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import cbir_engine
from cbir_engine import _C
from tests.helpers import reference, rel_err

RNG = np.random.default_rng(11)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


class Builder:
    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []

    def const(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def conv(self, x: str, cin: int, cout: int, k: tuple[int, int], name: str, group: int = 1) -> str:
        w = self.const(
            f"{name}_w",
            (rand(cout, cin // group, *k) / np.sqrt(cin * k[0] * k[1] / group)).astype(np.float32),
        )
        b = self.const(f"{name}_b", rand(cout))
        pads = [k[0] // 2, k[1] // 2, k[0] // 2, k[1] // 2]
        self.nodes.append(
            helper.make_node("Conv", [x, w, b], [name], kernel_shape=list(k), pads=pads, group=group)
        )
        return name

    def bn_relu(self, x: str, c: int, name: str) -> str:
        ins = [x] + [
            self.const(f"{name}_{p}", v)
            for p, v in (("s", rand(c)), ("b", rand(c)), ("m", rand(c)), ("v", np.abs(rand(c)) + 0.5))
        ]
        self.nodes.append(helper.make_node("BatchNormalization", ins, [f"{name}_bn"]))
        self.nodes.append(helper.make_node("Relu", [f"{name}_bn"], [name]))
        return name

    def model(self, cin: int, size: int, out: str) -> bytes:
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, size, size])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
            self.inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def dense_block(layers: int = 3, growth: int = 8) -> bytes:
    """A stem max pool, then DenseNet layers: BN-ReLU-1x1 conv-BN-ReLU-3x3 conv, each concatenating
    everything before it."""
    b = Builder()
    b.nodes.append(
        helper.make_node("MaxPool", ["x"], ["x0"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    )
    feats, c = ["x0"], 16
    for i in range(layers):
        cat = f"cat{i}"
        b.nodes.append(helper.make_node("Concat", list(feats), [cat], axis=1))
        h = b.conv(b.bn_relu(cat, c, f"pre{i}"), c, 4 * growth, (1, 1), f"bott{i}")
        feats.append(b.conv(b.bn_relu(h, 4 * growth, f"mid{i}"), 4 * growth, growth, (3, 3), f"new{i}"))
        c += growth
    b.nodes.append(helper.make_node("Concat", list(feats), ["block"], axis=1))
    return b.model(16, 29, "block")


def inception_module() -> bytes:
    """Branches of every conv kind (1x1 GEMM, 3x3 Winograd, 1x7 direct, grouped) and a max pool,
    concatenated."""
    b = Builder()
    x = b.conv("x", 3, 24, (3, 3), "stem")
    branches = [
        b.conv(x, 24, 16, (1, 1), "b1"),
        b.conv(x, 24, 32, (3, 3), "b3"),
        b.conv(x, 24, 16, (1, 7), "b7"),
        b.conv(x, 24, 24, (3, 3), "bg", group=3),
    ]
    b.nodes.append(helper.make_node("MaxPool", [x], ["bp"], kernel_shape=[3, 3], pads=[1] * 4))
    b.nodes.append(helper.make_node("Concat", [*branches, "bp"], ["y"], axis=1))
    return b.model(3, 17, "y")


def run_and_plan(onnx_bytes: bytes, x: np.ndarray, out: str):
    """Runs the model on x, checks the output against the ONNX reference, returns x's plan."""
    engine = cbir_engine.load(onnx_bytes, threads=2)
    ref = reference(onnx.load_from_string(onnx_bytes), {"x": x})[0]
    assert rel_err(engine.run({"x": x})[out], ref) <= 1e-5
    return engine.plan_for({"x": x.shape})


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_dense_block_concatenates_in_place(gemm_isa: str, batch: int) -> None:
    plan = run_and_plan(dense_block(), rand(batch, 16, 29, 29), "block")
    assert not [s for s in plan.steps if s.kernel == "concat"]
    # At batch 1 the slices are contiguous; beyond it every slice and prefix steps over the block's
    # whole buffer (16 + 3 * 8 channels of 15 x 15) from one image to the next.
    assert set(plan.batch_strides.values()) == (set() if batch == 1 else {40 * 15 * 15})


@pytest.mark.parametrize("batch", [2, 3])
def test_inception_module_concatenates_in_place(gemm_isa: str, batch: int) -> None:
    plan = run_and_plan(inception_module(), rand(batch, 3, 17, 17), "y")
    labels = {s.label.split(" ")[0] for s in plan.steps}
    assert {"conv2d/gemm", "conv2d/winograd", "conv2d/direct", "maxpool2d"} <= labels, labels
    # The grouped conv runs as a GEMM per group and writes its slice too; only the concat's copy of
    # an input that no kernel could write in place would remain.
    assert not [s for s in plan.steps if s.kernel == "concat"]
    assert len(plan.batch_strides) == 5


@pytest.mark.parametrize("batch,size", [(2, 17), (3, 17), (2, 7)])
def test_prefix_read_by_every_conv_kind(gemm_isa: str, batch: int, size: int) -> None:
    """A shorter concat that is a prefix of a longer one's buffer, read by a Winograd, a direct and
    an im2col GEMM conv (each reading its input at the buffer's batch stride)."""
    b = Builder()
    x = b.conv("x", 3, 16, (3, 3), "stem")
    a, c = b.conv(x, 16, 8, (1, 1), "a"), b.conv(x, 16, 8, (1, 1), "c")
    b.nodes.append(helper.make_node("Concat", [a, c], ["head"], axis=1))
    wino = b.conv("head", 16, 16, (3, 3), "wino")
    direct = b.conv("head", 16, 16, (1, 7), "direct")
    # Dilated: neither Winograd nor the direct kernel, an im2col GEMM.
    b.nodes.append(
        helper.make_node(
            "Conv",
            ["head", b.const("im2col_w", rand(16, 16, 3, 3) / 12)],
            ["im2col"],
            kernel_shape=[3, 3],
            pads=[2] * 4,
            dilations=[2, 2],
        )
    )
    im2col = "im2col"
    b.nodes.append(helper.make_node("Concat", [a, c, wino, direct, im2col], ["y"], axis=1))
    plan = run_and_plan(b.model(3, size, "y"), rand(batch, 3, size, size), "y")
    readers = {
        s.label.split(" ")[0] for s in plan.steps if s.kernel == "conv2d" and s.operands[0].value == "head"
    }
    # Winograd F(4x4) at 17x17, F(2x2) at 7x7 (where the dilated conv also runs direct)
    want = (
        {"conv2d/winograd", "conv2d/direct", "conv2d/gemm"}
        if size > 7
        else {"conv2d/winograd_f2", "conv2d/direct"}
    )
    assert readers >= want, readers
    assert "head" in plan.batch_strides and not [s for s in plan.steps if s.kernel == "concat"]


def test_slice_read_by_a_step_without_batch_strides_is_copied() -> None:
    """A concat input that an elementwise step also reads, and one a depthwise conv writes, stay
    tensors of their own: the concat copies them; the others are still written in place."""
    b = Builder()
    x = b.conv("x", 3, 8, (3, 3), "stem")
    a = b.conv(x, 8, 8, (1, 1), "a")
    d = b.conv(x, 8, 8, (3, 3), "dw", group=8)
    c = b.conv(x, 8, 8, (1, 1), "c")
    b.nodes.append(helper.make_node("Concat", [a, d, c], ["cat"], axis=1))
    b.nodes.append(helper.make_node("Relu", [a], ["ra"]))
    b.nodes.append(helper.make_node("Concat", ["cat", "ra"], ["y"], axis=1))
    plan = run_and_plan(b.model(3, 9, "y"), rand(2, 3, 9, 9), "y")
    copied = {
        op.value for s in plan.steps if s.kernel == "concat" for op in s.operands[:-1] if op is not None
    }
    assert {"a", "dw"} <= copied and "c" not in copied and "c" in plan.batch_strides


def test_executor_refuses_a_batch_stride_where_the_kernel_takes_none() -> None:
    copy_step = ("copy", [], [], [(False, 0, [2, 3], 6), (False, 64, [2, 3])])
    with pytest.raises(ValueError, match="batch stride"):
        _C.Executor(_C.ThreadPool(1), 256, [], [copy_step], [], [])
    with pytest.raises(ValueError, match="batch stride"):  # shorter than one item
        _C.Executor(
            _C.ThreadPool(1),
            256,
            [],
            [("copy", [], [], [(False, 0, [2, 3], 2), (False, 64, [2, 3])])],
            [],
            [],
        )
