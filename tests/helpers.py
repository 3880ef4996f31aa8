"""Helpers shared by the tests: single-node ONNX models and tolerance tiers."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Named tolerance tiers (max |diff| / max |ref|).
TOL = {"float32": 1e-5, "float32_deep": 1e-4}


def single_node_model(op: str, inputs: dict[str, np.ndarray], attrs: dict[str, Any] | None = None,
                      initializers: dict[str, np.ndarray] | None = None, n_outputs: int = 1,
                      opset: int = 17) -> onnx.ModelProto:
    """A model of one `op` node; `inputs` become graph inputs, `initializers` constants
    (input order: inputs then initializers, '' for a skipped optional input)."""
    initializers = initializers or {}
    names = list(inputs) + list(initializers)
    node = helper.make_node(op, [n if not n.startswith("_skip") else "" for n in names],
                            [f"y{i}" for i in range(n_outputs)], **(attrs or {}))
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for k, v in inputs.items()],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(n_outputs)],
        [numpy_helper.from_array(v, k) for k, v in initializers.items() if not k.startswith("_skip")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feeds)


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    scale = max(float(np.abs(ref).max()), 1e-30)
    return float(np.abs(np.asarray(out, np.float64) - ref).max() / scale)


_RNG = np.random.default_rng(5)


def _rand(*shape: int) -> np.ndarray:
    return _RNG.standard_normal(shape).astype(np.float32)


def ort_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def resnet_block_model(opset: int = 17, initializers_as_inputs: bool = False) -> onnx.ModelProto:
    """conv-BN-relu -> conv-BN -> + x -> relu, with a Dropout and a Shape/Gather/Reshape chain
    that flattens the result with a batch-dependent shape (as exporters emit)."""
    c = 8
    inits = {
        "w1": _rand(c, c, 3, 3) * 0.2, "w2": _rand(c, c, 3, 3) * 0.2,
        "s1": np.abs(_rand(c)) + 0.5, "b1": _rand(c), "m1": _rand(c), "v1": np.abs(_rand(c)) + 0.5,
        "s2": np.abs(_rand(c)) + 0.5, "b2": _rand(c), "m2": _rand(c), "v2": np.abs(_rand(c)) + 0.5,
        "idx0": np.array(0, np.int64), "minus1": np.array([-1], np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "s1", "b1", "m1", "v1"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("BatchNormalization", ["c2", "s2", "b2", "m2", "v2"], ["n2"], name="bn2"),
        helper.make_node("Add", ["n2", "x"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r2"], name="relu2"),
        helper.make_node("Dropout", ["r2"], ["d"], name="drop"),
        helper.make_node("Shape", ["d"], ["shp"], name="shape"),
        helper.make_node("Gather", ["shp", "idx0"], ["n"], axis=0, name="gather"),
        helper.make_node("Unsqueeze", ["n"], ["n1d"], axes=[0], name="unsq") if opset < 13 else
        helper.make_node("Unsqueeze", ["n", "zero_axes"], ["n1d"], name="unsq"),
        helper.make_node("Concat", ["n1d", "minus1"], ["target"], axis=0, name="concat"),
        helper.make_node("Reshape", ["d", "target"], ["y"], name="flatten"),
    ]
    if opset >= 13:
        inits["zero_axes"] = np.array([0], np.int64)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", c, 6, 6])]
    if initializers_as_inputs:
        inputs += [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                   for k, v in inits.items()]
    graph = helper.make_graph(nodes, "block", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if opset < 9:
        model.ir_version = 3
    return model


