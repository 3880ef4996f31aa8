"""ONNX model -> Graph IR."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cbir_engine.errors import ModelFormatError, UnsupportedOpError
from cbir_engine.graph.ir import Graph
from cbir_engine.onnx import ops as _ops  # noqa: F401  (registers the importers)
from cbir_engine.onnx.registry import Ctx, resolve

MIN_OPSET = 7  # the oldest opset whose op versions the importers cover


def read_model(src: Any):
    """Loads an ONNX ModelProto from a path, bytes or a ModelProto; ModelFormatError if unreadable."""
    import onnx
    from google.protobuf.message import DecodeError

    if isinstance(src, onnx.ModelProto):
        model = src
    elif isinstance(src, (bytes, bytearray, memoryview)):
        try:
            model = onnx.load_model_from_string(bytes(src))
        except (DecodeError, ValueError, RuntimeError) as e:
            raise ModelFormatError(f"bytes are not an ONNX model: {e}") from e
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"no model file at {path}")
        try:
            model = onnx.load(str(path))
        except (DecodeError, ValueError, RuntimeError, OSError) as e:
            raise ModelFormatError(f"{path} is not an ONNX model: {e}") from e
    else:
        raise TypeError(f"expected a path, bytes or onnx.ModelProto, got {type(src).__name__}")
    _check_structure(model)
    return model


def _check_structure(model) -> None:
    """Catches what a truncated or random file parses into: no graph, dangling names."""
    g = model.graph
    if model.ir_version <= 0 or not g.output or (not g.node and not g.initializer and not g.input):
        raise ModelFormatError("not an ONNX model (no graph outputs or version); truncated file?")
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        raise ModelFormatError("the model imports no version of the default ONNX operator set")
    known = {i.name for i in g.input} | {t.name for t in g.initializer}
    for node in g.node:
        for name in node.input:
            if name and name not in known:
                raise ModelFormatError(
                    f"node '{node.name}' ({node.op_type}) reads '{name}', which nothing defines "
                    "before it (truncated or unsorted graph)"
                )
        known.update(o for o in node.output if o)
    for o in g.output:
        if o.name not in known:
            raise ModelFormatError(f"graph output '{o.name}' is never computed")


def _attr_value(attr) -> Any:
    from onnx import AttributeProto, numpy_helper

    t = attr.type
    if t == AttributeProto.INT:
        return int(attr.i)
    if t == AttributeProto.FLOAT:
        return float(attr.f)
    if t == AttributeProto.STRING:
        return attr.s.decode("utf-8", "replace")
    if t == AttributeProto.INTS:
        return [int(v) for v in attr.ints]
    if t == AttributeProto.FLOATS:
        return [float(v) for v in attr.floats]
    if t == AttributeProto.STRINGS:
        return [s.decode("utf-8", "replace") for s in attr.strings]
    if t == AttributeProto.TENSOR:
        return numpy_helper.to_array(attr.t)
    return attr  # graphs and sparse tensors: importers that accept them decide


def _tensor(t, where: str) -> np.ndarray:
    from onnx import numpy_helper

    try:
        arr = numpy_helper.to_array(t)
    except Exception as e:  # wrong raw_data length, unknown type, missing external file
        raise ModelFormatError(f"cannot read tensor '{t.name}' ({where}): {e}") from e
    return np.asarray(arr, order="C")


def _value_type(vi, where: str) -> tuple[np.dtype, tuple | None]:
    from onnx import helper

    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        raise UnsupportedOpError("(graph input)", vi.name, None, f"{where} '{vi.name}' is not a tensor")
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
    except Exception as e:
        raise ModelFormatError(f"{where} '{vi.name}' has unknown element type {tt.elem_type}") from e
    if not tt.HasField("shape"):
        return dtype, None
    dims: list[int | str] = []
    for i, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value") and d.dim_value >= 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(str(d.dim_param))
        else:
            dims.append(f"{vi.name}_d{i}")
    return dtype, tuple(dims)


def import_model(model) -> tuple[Graph, int]:
    """Builds the IR of `model` (a ModelProto). Returns the graph and the default-domain opset."""
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    g = Graph()
    graph = model.graph
    for t in graph.initializer:
        g.set_const(t.name, _tensor(t, "initializer"))
    for vi in graph.input:
        if vi.name in g.values and g.values[vi.name].is_const:
            continue  # an initializer listed as an input (IR < 4 files): a constant
        dtype, shape = _value_type(vi, "input")
        v = g.value(vi.name)
        v.dtype, v.shape = dtype, shape
        g.inputs.append(vi.name)
    for node in graph.node:
        name = node.name or (node.output[0] if node.output else node.op_type)
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(f"{node.domain}.{node.op_type}", name, opset, "custom domain")
        if opset < MIN_OPSET:
            raise UnsupportedOpError(node.op_type, name, opset, f"opsets below {MIN_OPSET}")
        op = resolve(node.op_type, opset, name)
        kwargs: dict[str, Any] = {}
        for attr in node.attribute:
            key = attr.name if attr.name in op.attrs else f"{attr.name}_"
            if key not in op.attrs:
                raise UnsupportedOpError(node.op_type, name, opset, f"attribute '{attr.name}'")
            kwargs[key] = _attr_value(attr)
        inputs = [i if i else None for i in node.input]
        ctx = Ctx(g, node.op_type, name, opset, list(node.output))
        try:
            op.fn(ctx, *inputs, **kwargs)
        except TypeError as e:  # wrong number of inputs for the op
            raise ModelFormatError(f"node '{name}' ({node.op_type}): {e}") from e
    g.outputs = [o.name for o in graph.output]
    g.output_names = list(g.outputs)
    return g, opset
