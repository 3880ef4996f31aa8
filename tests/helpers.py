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
