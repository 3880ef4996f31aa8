"""Bad input gets a clear typed error, never a crash or silent garbage."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import cbir_engine
from cbir_engine.errors import DTypeError, ModelFormatError, NonFiniteError, ShapeError, UnsupportedOpError
from tests.helpers import single_node_model


def conv_relu_model(opset: int = 17) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_truncated_file(tmp_path) -> None:
    data = conv_relu_model().SerializeToString()
    for cut in (len(data) // 3, len(data) // 2, len(data) - 7):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError):
            cbir_engine.load(path)


def test_random_bytes(tmp_path) -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        blob = rng.integers(0, 256, size=int(rng.integers(1, 5000)), dtype=np.uint8).tobytes()
        with pytest.raises(ModelFormatError):
            cbir_engine.load(blob)
    path = tmp_path / "noise.onnx"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFormatError):
        cbir_engine.load(path)


def test_empty_and_text_files(tmp_path) -> None:
    for content in (b"", b"this is not a model\n"):
        p = tmp_path / "bad.onnx"
        p.write_bytes(content)
        with pytest.raises(ModelFormatError):
            cbir_engine.load(p)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        cbir_engine.load(tmp_path / "nope.onnx")


def test_wrong_source_type() -> None:
    with pytest.raises(TypeError):
        cbir_engine.load(12345)


def test_unsupported_op_names_op_node_and_opset() -> None:
    node = helper.make_node("Hardmax", ["x"], ["y"], name="the_hardmax")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UnsupportedOpError) as err:
        cbir_engine.load(model.SerializeToString())
    assert err.value.op_type == "Hardmax" and err.value.node == "the_hardmax" and err.value.opset == 13
    assert "Hardmax" in str(err.value) and "the_hardmax" in str(err.value) and "13" in str(err.value)


def test_unsupported_attribute_value() -> None:
    model = single_node_model("MaxPool", {"x": np.zeros((1, 1, 4, 4, 4), np.float32)},
                              {"kernel_shape": [2, 2, 2]})
    engine = cbir_engine.load(model.SerializeToString())
    with pytest.raises(UnsupportedOpError, match="3-D pooling"):
        engine(np.zeros((1, 1, 4, 4, 4), np.float32))


def test_custom_domain_op() -> None:
    node = helper.make_node("Foo", ["x"], ["y"], domain="com.example", name="foo")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedOpError, match="com.example.Foo"):
        cbir_engine.load(model.SerializeToString())


def test_dangling_input_is_a_format_error() -> None:
    model = conv_relu_model()
    model.graph.node[1].input[0] = "nowhere"
    with pytest.raises(ModelFormatError, match="nowhere"):
        cbir_engine.load(model.SerializeToString())


@pytest.fixture(scope="module")
def engine() -> cbir_engine.Engine:
    return cbir_engine.load(conv_relu_model().SerializeToString())


def test_wrong_rank(engine) -> None:
    with pytest.raises(ShapeError, match="rank"):
        engine(np.zeros((3, 8, 8), np.float32))


def test_wrong_shape(engine) -> None:
    with pytest.raises(ShapeError, match="axis 1"):
        engine(np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(ShapeError, match="axis 3"):
        engine(np.zeros((1, 3, 8, 9), np.float32))


def test_empty_batch(engine) -> None:
    with pytest.raises(ShapeError, match="empty"):
        engine(np.zeros((0, 3, 8, 8), np.float32))


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int64, np.uint8, bool])
def test_wrong_dtype(engine, dtype) -> None:
    with pytest.raises(DTypeError, match="float32"):
        engine(np.zeros((1, 3, 8, 8), dtype))


def test_wrong_input_names(engine) -> None:
    with pytest.raises(ShapeError, match="missing"):
        engine.run({"X": np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(ShapeError):
        engine(np.zeros((1, 3, 8, 8), np.float32), np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(TypeError):
        engine.run([np.zeros((1, 3, 8, 8), np.float32)])


def test_non_contiguous_input_is_accepted(engine) -> None:
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 3)).astype(np.float32)
    view = x.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(engine(view), engine(np.ascontiguousarray(view)))


def test_nan_propagates_like_torch() -> None:
    torch = pytest.importorskip("torch")
    model = conv_relu_model()
    engine = cbir_engine.load(model.SerializeToString())
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    x[0, 1, 4, 4] = np.nan
    got = engine(x)
    w = torch.from_numpy(numpy_helper.to_array(model.graph.initializer[0]).copy())
    ref = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), w, padding=1)).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert np.isnan(got).sum() == 4 * 9  # the 3x3 neighbourhood in every output channel
    finite = ~np.isnan(ref)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-5, atol=1e-5)



def conv_act_model(c: int, k: int, size: int, kernel: int, act: str, pre_bn_relu: bool) -> onnx.ModelProto:
    """Conv (+ a fused activation), optionally after BatchNorm + ReLU (DenseNet's order, which the
    lowering folds into the conv's input packing)."""
    rng = np.random.default_rng(5)
    weight = (rng.standard_normal((k, c, kernel, kernel)) * 0.2).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w"),
             numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "b"),
             numpy_helper.from_array(np.array(-0.5, np.float32), "lo"),
             numpy_helper.from_array(np.array(0.5, np.float32), "hi")]
    nodes, src = [], "x"
    if pre_bn_relu:
        for name, values in [("s", rng.uniform(0.5, 2, c)), ("t", rng.standard_normal(c)),
                             ("m", rng.standard_normal(c)), ("v", rng.uniform(0.5, 2, c))]:
            inits.append(numpy_helper.from_array(values.astype(np.float32), name))
        nodes += [helper.make_node("BatchNormalization", ["x", "s", "t", "m", "v"], ["bn"]),
                  helper.make_node("Relu", ["bn"], ["bnr"])]
        src = "bnr"
    pad = kernel // 2
    nodes.append(helper.make_node("Conv", [src, "w", "b"], ["c"], kernel_shape=[kernel] * 2, pads=[pad] * 4))
    nodes.append(helper.make_node("Relu", ["c"], ["y"]) if act == "relu" else
                 helper.make_node("Clip", ["c", "lo", "hi"], ["y"]))
    graph = helper.make_graph(nodes, "conv_act",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# Every conv kernel applies its fused activation itself (GEMM tile, direct tile, both Winograd
# output transforms, the input packing of BN + ReLU): each must let a NaN through, as torch does.
@pytest.mark.parametrize("method,c,size,kernel,pre_bn_relu", [
    ("gemm", 16, 9, 3, False),
    ("direct", 16, 9, 3, False),
    ("winograd", 16, 14, 3, False),
    ("winograd_f2", 16, 8, 3, False),
    ("gemm", 21, 9, 1, True),  # BN + ReLU applied while the 1x1 conv packs its input
])
@pytest.mark.parametrize("act", ["relu", "clip"])
def test_nan_survives_every_conv_kernel(monkeypatch, method: str, c: int, size: int, kernel: int,
                                        pre_bn_relu: bool, act: str) -> None:
    import cbir_engine.plan.lower as lower
    from tests.helpers import reference

    monkeypatch.setattr(lower, "direct_pays", lambda *args: method == "direct")
    model = conv_act_model(c, 16, size, kernel, act, pre_bn_relu)
    engine = cbir_engine.load(model.SerializeToString(), winograd=method.startswith("winograd"))
    x = np.random.default_rng(1).standard_normal((1, c, size, size)).astype(np.float32)
    x[0, 3, 4, 5] = np.nan
    label = engine.plan_for({"x": x.shape}).steps[-1].label
    assert label.startswith(f"conv2d/{method}"), label
    got, ref = engine(x), reference(model, {"x": x})[0]
    assert np.isnan(ref).sum() == 16 * kernel * kernel
    if method == "winograd":
        # The output transform mixes a whole 4x4 tile: the NaN covers the tiles under the 3x3
        # neighbourhood, never less than it and never beyond those tiles.
        assert np.isnan(got[np.isnan(ref)]).all()
        tiles = np.zeros(got.shape, bool)
        tiles[:, :, 0:8, 4:8] = True
        assert not np.isnan(got[~tiles]).any()
    else:
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    finite = ~np.isnan(got)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-4, atol=1e-4)

@pytest.mark.parametrize("op,attrs", [("MaxPool", {"kernel_shape": [2, 2]}),
                                      ("MaxPool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
                                      ("GlobalMaxPool", {}),
                                      ("GlobalAveragePool", {}), ("Relu", {}), ("Sigmoid", {}),
                                      ("Softmax", {"axis": 1})])
def test_nan_propagates_through_ops(op: str, attrs: dict) -> None:
    x = np.ones((1, 2, 4, 4), np.float32)
    x[0, 0, 1, 1] = np.nan
    model = single_node_model(op, {"x": x}, attrs)
    got = cbir_engine.load(model.SerializeToString())(x)
    assert np.isnan(got[0, 0]).any(), f"{op} dropped a NaN"
    if op != "Softmax":
        assert not np.isnan(got[0, 1]).any()


def test_check_finite_turns_nan_into_an_error() -> None:
    engine = cbir_engine.load(conv_relu_model().SerializeToString(), check_finite=True)
    x = np.zeros((1, 3, 8, 8), np.float32)
    assert np.isfinite(engine(x)).all()
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="NaN"):
        engine(x)
    x[0, 0, 0, 0] = np.inf
    with pytest.raises(NonFiniteError):
        engine(x)


def test_bad_threads() -> None:
    with pytest.raises(ValueError):
        cbir_engine.load(conv_relu_model().SerializeToString(), threads=0)


def test_unknown_device() -> None:
    with pytest.raises(ValueError, match="device"):
        cbir_engine.load(conv_relu_model().SerializeToString(), device="tpu")


def test_opset_version_not_covered() -> None:
    model = conv_relu_model(opset=6)
    with pytest.raises(UnsupportedOpError, match="opset"):
        cbir_engine.load(model.SerializeToString())


def test_runtime_shape_computation_is_refused_clearly() -> None:
    # Gather on run-time data (not a shape computation): refused at planning, naming the op.
    x = np.zeros((4, 3), np.float32)
    model = single_node_model("Gather", {"x": x, "i": np.array([0, 2], np.int64)}, {"axis": 0})
    with pytest.raises(DTypeError, match="int64"):
        cbir_engine.load(model.SerializeToString())
