"""The average pool that reads a pointwise conv moves in front of it (pool_before_pointwise_conv)
only where that keeps the result, and the engine still matches the ONNX reference either way."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import cbir_engine
from tests.helpers import reference, rel_err

RNG = np.random.default_rng(77)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def model(
    pool: str,
    pool_attrs: dict,
    *,
    kernel: int = 1,
    pre_bn_relu: bool = False,
    relu_after_conv: bool = False,
    conv_also_output: bool = False,
    cin: int = 12,
    cout: int = 5,
    size: int = 7,
    batch: int | str = 2,
) -> bytes:
    """x -> [BN -> ReLU] -> Conv (bias) -> [ReLU] -> pool."""
    inits = [
        numpy_helper.from_array(rand(cout, cin, kernel, kernel), "w"),
        numpy_helper.from_array(rand(cout), "b"),
    ]
    nodes = []
    x = "x"
    if pre_bn_relu:
        inits += [
            numpy_helper.from_array(rand(cin), "s"),
            numpy_helper.from_array(rand(cin), "t"),
            numpy_helper.from_array(rand(cin), "m"),
            numpy_helper.from_array(np.abs(rand(cin)) + 0.5, "v"),
        ]
        nodes += [
            helper.make_node("BatchNormalization", ["x", "s", "t", "m", "v"], ["bn"]),
            helper.make_node("Relu", ["bn"], ["act"]),
        ]
        x = "act"
    nodes.append(
        helper.make_node("Conv", [x, "w", "b"], ["c"], kernel_shape=[kernel, kernel], pads=[kernel // 2] * 4)
    )
    pooled_from = "c"
    if relu_after_conv:
        nodes.append(helper.make_node("Relu", ["c"], ["r"]))
        pooled_from = "r"
    nodes.append(helper.make_node(pool, [pooled_from], ["y"], **pool_attrs))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if conv_also_output:
        outputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, size, size])],
        outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def pooled_first(engine) -> bool:
    """Whether the optimised graph pools before its conv."""
    g = engine.graph
    producers = g.producers()
    conv = next(n for n in g.nodes if n.op == "Conv")
    src = producers.get(conv.inputs[0])
    return src is not None and src.op in ("AveragePool", "GlobalAveragePool")


CASES = [
    # (pool op, attributes, model options, moved)
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, {}, True),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2]}, {}, True),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, {"pre_bn_relu": True}, True),  # DenseNet
    ("GlobalAveragePool", {}, {}, True),
    (
        "AveragePool",
        {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
        {},
        False,
    ),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, {}, False),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [1, 1]}, {}, False),  # keeps the pixel count
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, {"relu_after_conv": True}, False),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, {"kernel": 3}, False),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, {"conv_also_output": True}, False),
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, {}, False),
]


@pytest.mark.parametrize("pool,attrs,options,moved", CASES)
def test_pool_moves_before_pointwise_conv_only_where_exact(
    pool: str, attrs: dict, options: dict, moved: bool
) -> None:
    onnx_bytes = model(pool, attrs, **options)
    engine = cbir_engine.load(onnx_bytes, threads=2)
    x = rand(2, 12, 7, 7)
    got = engine.run({"x": x})
    refs = reference(onnx.load_from_string(onnx_bytes), {"x": x})
    for name, ref in zip(["y", "c"][: len(refs)], refs, strict=True):
        assert got[name].shape == ref.shape
        assert rel_err(got[name], ref) <= 1e-5, name
    assert pooled_first(engine) == moved


def test_moved_pool_shrinks_the_conv_and_keeps_the_batch_dims() -> None:
    """DenseNet's transition at two batch sizes: the conv runs on the pooled pixels."""
    onnx_bytes = model(
        "AveragePool",
        {"kernel_shape": [2, 2], "strides": [2, 2]},
        pre_bn_relu=True,
        cin=16,
        cout=8,
        size=8,
        batch="N",
    )
    engine = cbir_engine.load(onnx_bytes, threads=2)

    m = onnx.load_from_string(onnx_bytes)
    for batch in (2, 3):
        x = rand(batch, 16, 8, 8)
        assert rel_err(engine(x), reference(m, {"x": x})[0]) <= 1e-5
        plan = engine.plan_for({"x": x.shape})
        conv = next(s for s in plan.steps if s.label.startswith("conv2d"))
        assert conv.flops == 2 * batch * 16 * 8 * 4 * 4  # 4x4 pooled pixels, not 8x8


def test_pool_carrying_a_folded_batchnorm_stays() -> None:
    """An average pool with a BatchNorm folded into it (fuse_input_affine: inputs 1 and 2) pools
    the activated tensor, not the conv's output: it must not move in front of the conv."""
    from cbir_engine.graph.passes import pool_before_pointwise_conv
    from cbir_engine.onnx.importer import import_model

    graph, _ = import_model(
        onnx.load_from_string(model("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}))
    )
    pool = next(n for n in graph.nodes if n.op == "AveragePool")
    scale = graph.add_const(np.ones(5, np.float32), "pool_in_scale")
    shift = graph.add_const(np.zeros(5, np.float32), "pool_in_shift")
    pool.inputs = [pool.inputs[0], scale, shift]
    assert not pool_before_pointwise_conv(graph)
    assert [n.op for n in graph.nodes] == ["Conv", "AveragePool"]
