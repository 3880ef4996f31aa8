"""BatchNorm (+ReLU) -> AveragePool, DenseNet's transition, runs as one pool step that applies the
affine as it reads its input: every average-pool path (stride 2 on both instruction sets, the
row-buffer path for wide rows and for stride-1 windows, the direct path for very wide rows)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import cbir_engine
from tests.helpers import TOL, reference, rel_err

# (pool attributes, input shape)
CASES = [
    ({"kernel_shape": [2, 2], "strides": [2, 2]}, (2, 7, 8, 8)),  # DenseNet's transition
    ({"kernel_shape": [2, 2], "strides": [2, 2]}, (1, 3, 9, 59)),
    (
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
        (1, 5, 7, 33),
    ),
    ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, (1, 2, 6, 150)),  # rows over 128
    ({"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}, (1, 4, 7, 7)),  # same window
    ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, (1, 2, 3, 4100)),  # direct path
]


def _model(attrs: dict, shape: tuple, relu: bool, with_bn_output: bool = False):
    c = shape[1]
    rng = np.random.default_rng(5)
    params = {
        "s": rng.standard_normal(c),
        "b": rng.standard_normal(c),
        "m": rng.standard_normal(c),
        "v": np.abs(rng.standard_normal(c)) + 0.3,
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()]
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["bn"], epsilon=1e-3)]
    src = "bn"
    if relu:
        nodes.append(helper.make_node("Relu", ["bn"], ["act"]))
        src = "act"
    nodes.append(helper.make_node("AveragePool", [src], ["y"], **attrs))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if with_bn_output:
        outputs.append(helper.make_tensor_value_info(src, TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))], outputs, inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("attrs,shape", CASES)
@pytest.mark.parametrize("relu", [True, False])
def test_batchnorm_relu_folded_into_average_pool(
    gemm_isa: str, tmp_path, attrs: dict, shape: tuple, relu: bool
) -> None:
    model = _model(attrs, shape, relu)
    x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    engine = cbir_engine.load(model.SerializeToString(), threads=2)
    labels = [s.label for s in engine.plan_for({"x": shape}).steps]
    assert len(labels) == 1 and labels[0].endswith("+input_affine" + ("_relu" if relu else "")), labels
    ref = reference(model, {"x": x})[0]
    assert rel_err(engine.run({"x": x})["y"], ref) <= TOL["float32"]
    path = tmp_path / "m.plan"
    engine.save(path, {"x": shape})
    assert rel_err(cbir_engine.load(path).run({"x": x})["y"], ref) <= TOL["float32"]


def test_batchnorm_with_another_reader_is_not_folded() -> None:
    """The activated tensor also leaves the graph: it must be computed, so nothing is folded."""
    shape = (1, 3, 8, 8)
    model = _model({"kernel_shape": [2, 2], "strides": [2, 2]}, shape, relu=True, with_bn_output=True)
    engine = cbir_engine.load(model.SerializeToString())
    labels = [s.label for s in engine.plan_for({"x": shape}).steps]
    assert not any("input_affine" in lb for lb in labels), labels
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    got, ref = engine.run({"x": x}), reference(model, {"x": x})
    assert rel_err(got["y"], ref[0]) <= TOL["float32"]
    assert rel_err(got["act"], ref[1]) <= TOL["float32"]


def test_folded_average_pool_keeps_nan(gemm_isa: str) -> None:
    """A NaN pixel makes NaN exactly the windows that hold it, through the affine and the ReLU."""
    shape = (1, 2, 8, 20)
    model = _model({"kernel_shape": [2, 2], "strides": [2, 2]}, shape, relu=True)
    x = np.random.default_rng(8).standard_normal(shape).astype(np.float32)
    x[0, 1, 3, 19] = np.nan
    got = cbir_engine.load(model.SerializeToString()).run({"x": x})["y"]
    want = np.zeros(got.shape, bool)
    want[0, 1, 1, 9] = True
    np.testing.assert_array_equal(np.isnan(got), want)
