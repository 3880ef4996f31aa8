"""Each CPU kernel against the ONNX reference implementation (onnx.reference), through the
engine, over odd shapes and the attribute combinations the seed networks use."""

from __future__ import annotations

import numpy as np
import pytest

import cbir_engine
from tests.helpers import TOL, ort_reference, reference, rel_err, single_node_model

RNG = np.random.default_rng(1234)

# gemm_isa (tests/conftest.py) runs a test on each instruction set of the conv/GEMM micro-kernels.


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def check(op: str, inputs: dict, attrs: dict | None = None, initializers: dict | None = None,
          tol: float = TOL["float32"], threads: int = 2, opset: int = 17, ref_impl: str = "onnx") -> None:
    model = single_node_model(op, inputs, attrs, initializers, opset=opset)
    engine = cbir_engine.load(model.SerializeToString(), threads=threads)
    got = engine.run(inputs)["y0"]
    ref = (ort_reference if ref_impl == "ort" else reference)(model, inputs)[0]
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= tol, f"{op} {attrs}: rel err {rel_err(got, ref):.2e}"


CONV_CASES = [
    # (N, C, H, W, K, kernel, attrs)
    (1, 3, 7, 7, 8, (3, 3), {"pads": [1, 1, 1, 1]}),
    (2, 5, 13, 11, 7, (3, 3), {"strides": [2, 2]}),
    (1, 16, 9, 9, 1, (1, 1), {}),
    (3, 7, 8, 10, 59, (1, 1), {"strides": [2, 2]}),
    (1, 8, 17, 17, 8, (1, 7), {"pads": [0, 3, 0, 3]}),
    (1, 8, 17, 17, 8, (7, 1), {"pads": [3, 0, 3, 0]}),
    (1, 4, 12, 12, 6, (3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    (2, 8, 10, 10, 8, (3, 3), {"group": 8, "pads": [1, 1, 1, 1]}),
    (1, 6, 11, 11, 12, (3, 3), {"group": 6, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    (1, 8, 9, 9, 12, (3, 3), {"group": 4}),
    (1, 3, 15, 15, 4, (5, 5), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    (1, 3, 14, 14, 4, (4, 4), {"auto_pad": "SAME_LOWER", "strides": [3, 3]}),
    (1, 3, 14, 14, 4, (3, 3), {"auto_pad": "VALID"}),
    (1, 3, 227, 227, 16, (11, 11), {"strides": [4, 4], "pads": [2, 2, 2, 2]}),
    (1, 64, 56, 56, 64, (3, 3), {"pads": [1, 1, 1, 1]}),
    (2, 1023, 3, 3, 7, (1, 1), {}),
    (1, 3, 10, 9, 5, (2, 3), {"pads": [1, 0, 0, 2], "strides": [1, 2]}),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[:5]}k{c[5]}{c[6]}")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("const_weight", [True, False])
def test_conv2d(case, bias: bool, const_weight: bool, gemm_isa: str) -> None:
    n, c, h, w, k, ks, attrs = case
    g = attrs.get("group", 1)
    weight = rand(k, c // g, *ks)
    inits = {"w": weight} if const_weight else {}
    inputs = {"x": rand(n, c, h, w)} | ({} if const_weight else {"w": weight})
    if bias:
        inits["b"] = rand(k)
    check("Conv", inputs, attrs, inits, tol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3, 7])  # tiles of 1-3 rows keep 2 or 4 partial sums a row
@pytest.mark.parametrize("c", [1, 2, 3, 6, 262])  # reduction lengths 0-3 past a multiple of 4
def test_conv_short_tiles(k: int, c: int, gemm_isa: str) -> None:
    """1x1 convs whose GEMM tiles have too few rows to fill the FMA units on one running sum:
    the partial sums over interleaved reduction steps, and the steps left over, add up right
    (24 pixels: a full 16-column tile and an 8-column one)."""
    check("Conv", {"x": rand(1, c, 4, 6)}, None, {"w": rand(k, c, 1, 1), "b": rand(k)}, tol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 13])  # every tile height, and a tail of 1 row
@pytest.mark.parametrize("pixels", [(4, 4), (7, 7), (5, 13)])  # 16 columns, 49 = 3 x 16 + 1, 65
@pytest.mark.parametrize("tail", ["residual_relu", "clip", "relu"])
def test_conv_fused_epilogue(k: int, pixels: tuple, tail: str, gemm_isa: str) -> None:
    """1x1 conv + bias with the residual Add and the activation fused into the GEMM tile."""
    from onnx import TensorProto, helper, numpy_helper

    h, w = pixels
    x, r = rand(2, 37, h, w), rand(2, k, h, w)
    x[0, 0, 0, 0] = np.nan  # the activation must keep it
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[1, 1])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))]
    feeds = {"x": x}
    if tail == "residual_relu":
        nodes += [helper.make_node("Add", ["c", "r"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, list(r.shape)))
        feeds["r"] = r
    elif tail == "clip":
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"]))
    else:
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    inits = [numpy_helper.from_array(rand(k, 37, 1, 1), "w"), numpy_helper.from_array(rand(k), "b"),
             numpy_helper.from_array(np.array(-0.7, np.float32), "lo"),
             numpy_helper.from_array(np.array(0.9, np.float32), "hi")]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "fused", inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    engine = cbir_engine.load(model.SerializeToString())
    steps = engine.plan_for({n: v.shape for n, v in feeds.items()}).steps
    assert len(steps) == 1 and steps[0].label.startswith("conv2d/gemm"), [st.label for st in steps]
    got, ref = engine.run(feeds)["y"], reference(model, feeds)[0]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert np.isnan(got).sum() == k  # the NaN pixel, in every output channel of image 0
    finite = ~np.isnan(ref)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attrs", [{"pads": [2, 1]}, {"strides": [3]}, {"dilations": [2]}])
def test_conv1d(attrs: dict) -> None:
    check("Conv", {"x": rand(2, 5, 23)}, attrs, {"w": rand(4, 5, 3), "b": rand(4)})


POOL_CASES = [
    ({"kernel_shape": [3, 3], "strides": [2, 2]}, (1, 3, 7, 7)),
    ({"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, (2, 4, 8, 8)),
    ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, (1, 7, 59, 59)),
    ({"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, (1, 2, 7, 9)),
    ({"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}, (1, 5, 6, 6)),
    ({"kernel_shape": [5, 3], "strides": [2, 1], "pads": [2, 1, 2, 1]}, (1, 3, 11, 9)),
    ({"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, (1, 2, 9, 9)),
    ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, (1, 2, 5, 4100)),  # wide rows
    ({"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}, (2, 3, 9, 37)),
    ({"kernel_shape": [5, 5], "strides": [1, 1], "pads": [2, 1, 2, 3]}, (1, 3, 11, 59)),
    # stride-1 "same" windows: pooled as flat planes
    ({"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}, (1, 7, 7, 7)),
    ({"kernel_shape": [5, 3], "strides": [1, 1], "pads": [2, 1, 2, 1]}, (2, 3, 17, 13)),
    ({"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}, (1, 2, 1, 3)),
    ({"kernel_shape": [7, 7], "strides": [1, 1], "pads": [3, 3, 3, 3]}, (1, 2, 5, 6)),
    # 3x3 ones in one pass: rows of exactly 1 and 2 vectors, a 1-wide and a 1-high plane, tails
    ({"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}, (2, 3, 8, 8)),
    ({"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}, (1, 2, 5, 16)),
    ({"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}, (1, 3, 6, 1)),
    ({"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}, (1, 3, 1, 11)),
    ({"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}, (3, 5, 17, 23)),
    # 1x1 windows (adaptive pooling to the input's own size exports as these)
    ({"kernel_shape": [1, 1], "strides": [1, 1]}, (1, 7, 6, 6)),
    ({"kernel_shape": [3, 1], "strides": [1, 1], "pads": [1, 0, 1, 0]}, (1, 3, 9, 7)),
]


@pytest.mark.parametrize("attrs,shape", POOL_CASES)
def test_maxpool(attrs: dict, shape: tuple) -> None:
    # ONNX Runtime as reference: onnx.reference pairs the pads of asymmetric windows wrongly.
    check("MaxPool", {"x": rand(*shape)}, attrs, ref_impl="ort")


@pytest.mark.parametrize("attrs,shape", POOL_CASES)
@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_avgpool(attrs: dict, shape: tuple, count_include_pad: int) -> None:
    check("AveragePool", {"x": rand(*shape)}, attrs | {"count_include_pad": count_include_pad},
          ref_impl="ort")


@pytest.mark.parametrize("shape", [(1, 2, 7, 7), (1, 1, 9, 17), (2, 3, 5, 8)])
@pytest.mark.parametrize("kernel", [3, 5])
def test_maxpool_same_window_keeps_nan(shape: tuple, kernel: int) -> None:
    """A window holding a NaN gives NaN, wherever the NaN sits (row ends, plane corners)."""
    from onnx import TensorProto, helper

    x = rand(*shape)
    x[0, 0, 0, -1] = np.nan
    x[-1, -1, shape[2] // 2, 0] = np.nan
    r = kernel // 2
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[kernel, kernel], pads=[r] * 4)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "g", [x_info], [y_info])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    got = cbir_engine.load(model.SerializeToString()).run({"x": x})["y"]
    padded = np.pad(x, [(0, 0), (0, 0), (r, r), (r, r)], constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel, kernel), axis=(2, 3))
    want = np.where(np.isnan(windows).any(axis=(-2, -1)), np.nan, np.nanmax(windows, axis=(-2, -1)))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got).any()
    np.testing.assert_array_equal(got[~np.isnan(got)], want[~np.isnan(want)])


def test_maxpool_dilations() -> None:
    check("MaxPool", {"x": rand(1, 3, 13, 13)}, {"kernel_shape": [3, 3], "dilations": [2, 2]})


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 7, 5, 5), (2, 1023, 7, 7), (1, 59, 13, 1)])
def test_global_pool(op: str, shape: tuple) -> None:
    check(op, {"x": rand(*shape)})


@pytest.mark.parametrize("size,shape", [(5, (1, 7, 5, 5)), (3, (2, 16, 9, 9)), (1, (1, 3, 2, 2)),
                                        (4, (1, 10, 3, 3))])
def test_lrn(size: int, shape: tuple) -> None:
    # onnx.reference's LRN loops over the batch dim instead of channels, so the references here
    # are torch (odd sizes, where its window equals ONNX's) and a direct reading of the spec.
    x = rand(*shape)
    attrs = {"size": size, "alpha": 1e-2, "beta": 0.75, "bias": 2.0}
    model = single_node_model("LRN", {"x": x}, attrs)
    got = cbir_engine.load(model.SerializeToString()).run({"x": x})["y0"]
    sq = x.astype(np.float64) ** 2
    lo, hi = (size - 1) // 2, -(-(size - 1) // 2)
    window = np.stack([sq[:, max(0, c - lo):c + hi + 1].sum(1) for c in range(shape[1])], axis=1)
    spec = x / (2.0 + 1e-2 / size * window) ** 0.75
    assert rel_err(got, spec) <= 1e-5
    if size % 2:
        torch = pytest.importorskip("torch")
        ref = torch.nn.functional.local_response_norm(torch.from_numpy(x), size, 1e-2, 0.75, 2.0)
        assert rel_err(got, ref.numpy()) <= 1e-5


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 59, 1023), (7, 25, 59), (3, 1023, 7), (16, 64, 33)])
@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("const_b", [True, False])
@pytest.mark.parametrize("alpha,beta", [(0.5, 2.0), (1.0, 1.0)])  # (1, 1): the bias fused in the tile
def test_gemm(m: int, k: int, n: int, trans_a: int, trans_b: int, const_b: bool, alpha: float, beta: float,
              gemm_isa: str) -> None:
    a = rand(k, m) if trans_a else rand(m, k)
    b = rand(n, k) if trans_b else rand(k, n)
    inputs = {"a": a} | ({} if const_b else {"b": b})
    inits = ({"b": b} if const_b else {}) | {"c": rand(n)}
    check("Gemm", inputs, {"transA": trans_a, "transB": trans_b, "alpha": alpha, "beta": beta}, inits)


@pytest.mark.parametrize("c_shape", [(), (1,), (7,), (3, 1), (3, 7), (1, 7)])
@pytest.mark.parametrize("const_c", [True, False])
def test_gemm_bias_shapes(c_shape: tuple, const_c: bool) -> None:
    c = rand(*c_shape)
    inputs = {"a": rand(3, 5)} | ({} if const_c else {"c": c})
    inits = {"b": rand(5, 7)} | ({"c": c} if const_c else {})
    if not const_c:  # input order is a, c, b: put b first through the initializer order
        inputs = {"a": inputs["a"]}
        model_inputs = {"a": rand(3, 5)}
        del model_inputs
    check("Gemm", inputs, {"beta": 0.5}, inits)


@pytest.mark.parametrize("a_shape,b_shape", [
    ((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((4,), (4, 5)), ((3, 4), (4,)),
    ((2, 1, 3, 4), (1, 5, 4, 6)), ((1, 7, 59), (59, 1)),
])
@pytest.mark.parametrize("const_b", [True, False])
def test_matmul(a_shape: tuple, b_shape: tuple, const_b: bool, gemm_isa: str) -> None:
    b = rand(*b_shape)
    check("MatMul", {"a": rand(*a_shape)} | ({} if const_b else {"b": b}), None,
          {"b": b} if const_b else None)


BROADCAST = [((1,), (1,)), ((7,), ()), ((2, 3, 4, 5), (1, 3, 1, 1)), ((2, 3, 4, 5), (5,)),
             ((3, 1, 5), (1, 4, 1)), ((1, 1023), (59, 1)), ((2, 64, 7, 7), (2, 64, 1, 1)),
             # rows longer than a task's grain, split across tasks (same shape: one long row)
             ((1, 64, 56, 57), (1, 64, 56, 57)), ((3, 40000), (40000,)), ((2, 33001), (2, 1))]


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min"])
@pytest.mark.parametrize("a_shape,b_shape", BROADCAST)
def test_binary_broadcast(op: str, a_shape: tuple, b_shape: tuple) -> None:
    b = rand(*b_shape)
    if op == "Div":
        b = np.where(np.abs(b) < 0.1, 1.0, b).astype(np.float32)
    check(op, {"a": rand(*a_shape), "b": b})


def test_pow_gem_style() -> None:
    x = np.abs(rand(2, 8, 5, 5)) + 0.1
    check("Pow", {"x": x}, None, {"p": np.array(3.0, np.float32)})


@pytest.mark.parametrize("op,attrs", [
    ("Relu", {}), ("Sigmoid", {}), ("Tanh", {}), ("LeakyRelu", {"alpha": 0.1}), ("Exp", {}),
    ("Abs", {}), ("Neg", {}), ("Floor", {}), ("Ceil", {}), ("Softplus", {}), ("Elu", {"alpha": 0.7}),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}), ("Erf", {}),
])
@pytest.mark.parametrize("n", [1, 7, 59, 1023, 40000])
def test_unary(op: str, attrs: dict, n: int) -> None:
    check(op, {"x": rand(n)}, attrs)


@pytest.mark.parametrize("op", ["Sqrt", "Log", "Reciprocal"])
def test_unary_positive(op: str) -> None:
    check(op, {"x": np.abs(rand(3, 1023)) + 0.01})


@pytest.mark.parametrize("bounds", [(-0.5, 0.5), (0.0, 6.0), (None, 1.0), (-1.0, None)])
def test_clip(bounds: tuple) -> None:
    names = ["_skip_lo" if bounds[0] is None else "lo", "_skip_hi" if bounds[1] is None else "hi"]
    inits = {n: np.array(v if v is not None else 0, np.float32) for n, v in zip(names, bounds, strict=True)}
    check("Clip", {"x": rand(7, 59)}, None, inits)


@pytest.mark.parametrize("axis", [0, 1, -1, 2])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax(axis: int, op: str) -> None:
    check(op, {"x": rand(3, 7, 59) * 5}, {"axis": axis}, tol=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_softmax_legacy_opset11(axis: int) -> None:
    # Before opset 13 Softmax flattens the input to 2-D at `axis` (onnx.reference lacks this).
    x = rand(3, 4, 5) * 3
    model = single_node_model("Softmax", {"x": x}, {"axis": axis}, opset=11)
    got = cbir_engine.load(model.SerializeToString()).run({"x": x})["y0"]
    flat = x.reshape(int(np.prod(x.shape[:axis])), -1).astype(np.float64)
    e = np.exp(flat - flat.max(1, keepdims=True))
    assert rel_err(got, (e / e.sum(1, keepdims=True)).reshape(x.shape)) <= 1e-5


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2",
                                "ReduceL1", "ReduceSumSquare"])
@pytest.mark.parametrize("axes,keepdims", [([2, 3], 1), ([1], 0), ([0, 2], 1), ([-1], 1), (None, 0)])
def test_reduce(op: str, axes: list | None, keepdims: int) -> None:
    inits = {} if axes is None else {"axes": np.array(axes, np.int64)}
    x = rand(2, 7, 5, 59)
    if op not in ("ReduceSum", "ReduceMean"):
        check(op, {"x": x}, {"keepdims": keepdims}, inits, opset=18)
        return
    # Signed sums cancel: the error of a float32 sum is bounded relative to the sum of |x|, not to
    # the (possibly tiny) result, so the scale is the same reduction over |x|.
    model = single_node_model(op, {"x": x}, {"keepdims": keepdims}, inits, opset=18)
    got = cbir_engine.load(model.SerializeToString(), threads=2).run({"x": x})["y0"]
    ref = reference(model, {"x": x})[0]
    scale = reference(model, {"x": np.abs(x)})[0]
    assert got.shape == ref.shape
    err = np.abs(got.astype(np.float64) - ref).max() / np.abs(scale).max()
    assert err <= TOL["float32"], f"{op} axes={axes}: error {err:.2e} of the sum of |x|"


@pytest.mark.parametrize("axis,p", [(1, 2), (-1, 2), (0, 1), (2, 1), (0, 2)])
def test_lp_normalization(axis: int, p: int) -> None:
    # onnx.reference sums x**p without |.| (wrong for p=1) and reads axis=0 as the default.
    x = rand(3, 7, 5)
    model = single_node_model("LpNormalization", {"x": x}, {"axis": axis, "p": p})
    got = cbir_engine.load(model.SerializeToString()).run({"x": x})["y0"]
    norm = (np.abs(x.astype(np.float64)) ** p).sum(axis, keepdims=True) ** (1 / p)
    assert rel_err(got, x / norm) <= 1e-5


@pytest.mark.parametrize("axis", [0, 1, 3, -1])
def test_concat(axis: int) -> None:
    shapes = [(2, 3, 4, 5)] * 3
    inputs = {}
    for i, s in enumerate(shapes):
        s = list(s)
        s[axis] = i + 1
        inputs[f"x{i}"] = rand(*s)
    check("Concat", inputs, {"axis": axis})


@pytest.mark.parametrize("perm", [[0, 2, 3, 1], [3, 2, 1, 0], [1, 0, 2, 3], None])
def test_transpose(perm: list | None) -> None:
    check("Transpose", {"x": rand(2, 7, 5, 3)}, {} if perm is None else {"perm": perm})


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("pads", [[0, 0, 1, 2, 0, 0, 2, 1], [0, 1, 0, 0, 0, 0, 0, 3],
                                  [0, 0, -1, 1, 0, 0, 1, -2]])
def test_pad(mode: str, pads: list) -> None:
    x = rand(2, 3, 5, 6)
    inits = {"pads": np.array(pads, np.int64)}
    if mode == "constant":
        inits["value"] = np.array(1.5, np.float32)
    model = single_node_model("Pad", {"x": x}, {"mode": mode}, inits, opset=19)
    got = cbir_engine.load(model.SerializeToString()).run({"x": x})["y0"]
    # Negative pads crop first (np.pad, behind onnx.reference, refuses them).
    r = x.ndim
    crop = x[tuple(slice(max(0, -pads[i]), x.shape[i] - max(0, -pads[r + i])) for i in range(r))]
    width = [(max(0, pads[i]), max(0, pads[r + i])) for i in range(r)]
    kw = {"constant_values": 1.5} if mode == "constant" else {}
    np.testing.assert_array_equal(got, np.pad(crop, width, mode=mode, **kw))


def test_slice_runtime_tensor() -> None:
    inits = {"starts": np.array([1, 2], np.int64), "ends": np.array([5, -1], np.int64),
             "axes": np.array([2, 3], np.int64)}
    check("Slice", {"x": rand(2, 3, 7, 9)}, None, inits)


def test_batchnorm_standalone() -> None:
    c = 7
    inits = {"s": rand(c), "b": rand(c), "m": rand(c), "v": np.abs(rand(c)) + 0.5}
    check("BatchNormalization", {"x": rand(2, c, 5, 5)}, {"epsilon": 1e-3}, inits)


def test_batchnorm_runtime_statistics() -> None:
    c = 7
    inputs = {"x": rand(2, c, 5, 5), "s": rand(c), "b": rand(c), "m": rand(c), "v": np.abs(rand(c)) + 0.5}
    check("BatchNormalization", inputs, {"epsilon": 1e-3})


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(threads: int) -> None:
    check("Conv", {"x": rand(2, 16, 19, 19)}, {"pads": [1, 1, 1, 1]}, {"w": rand(32, 16, 3, 3)},
          threads=threads)


def test_pool_jobs_after_idle_gaps_and_back_to_back() -> None:
    """Workers that wake late (after a gap, when they went to sleep) must neither be waited for
    nor run a task of a job that has ended: many short jobs with gaps of 0-3 ms in between, every
    result bit-identical to one thread's."""
    import time

    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(rand(24, 16, 3, 3), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 12, 12])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x_info], [y_info], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    one, two = cbir_engine.load(model, threads=1), cbir_engine.load(model, threads=2)
    gaps = np.random.default_rng(3).uniform(0, 0.003, 120)
    for i, gap in enumerate(gaps):
        x = rand(1, 16, 12, 12)
        if i % 3:
            time.sleep(float(gap))
        np.testing.assert_array_equal(two(x), one(x))


WINOGRAD_CASES = [
    # (N, C, H, W, K, pads): partial 4x4 tiles, no padding, several chunks of tiles
    (1, 16, 13, 13, 16, [1, 1, 1, 1]),
    (2, 17, 19, 14, 23, [0, 0, 0, 0]),
    (1, 64, 56, 56, 64, [1, 1, 1, 1]),
    (4, 16, 130, 130, 16, [1, 1, 1, 1]),
    (1, 128, 14, 14, 59, [1, 1, 1, 1]),
    (3, 32, 15, 17, 32, [2, 0, 1, 1]),
    (1, 300, 14, 13, 20, [1, 1, 1, 1]),  # input channels span two K blocks of the GEMMs
    # F(2x2,3x3) on small planes: odd sizes (partial 2x2 tiles), batch, several K blocks
    (1, 64, 7, 7, 64, [1, 1, 1, 1]),
    (2, 17, 9, 5, 23, [1, 1, 1, 1]),
    (2, 300, 8, 8, 16, [0, 1, 2, 1]),
    (1, 16, 6, 13, 59, [0, 0, 0, 0]),
    # small planes whose batch gives F(4x4,3x3) 16 tiles or more: partial 4x4 tiles
    (3, 17, 9, 5, 23, [1, 1, 1, 1]),
    (4, 32, 7, 7, 24, [1, 1, 1, 1]),
]


@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=lambda c: f"{c}")
@pytest.mark.parametrize("fused", [False, True])
def test_winograd_conv3x3(case, fused: bool) -> None:
    """Winograd (F(4x4,3x3), or F(2x2,3x3) on small planes) against the reference and against the
    GEMM path, epilogue included."""
    from onnx import TensorProto, helper, numpy_helper

    n, c, h, w, k, pads = case
    x, r = rand(n, c, h, w), None
    weight, bias = rand(k, c, 3, 3) / np.sqrt(9 * c), rand(k)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=pads)]
    out = "c"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))]
    feeds = {"x": x}
    if fused:
        oh, ow = h + pads[0] + pads[2] - 2, w + pads[1] + pads[3] - 2
        r = rand(n, k, oh, ow)
        nodes += [helper.make_node("Add", ["c", "r"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, list(r.shape)))
        feeds["r"] = r
        out = "y"
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    wino = cbir_engine.load(model.SerializeToString())
    gemm = cbir_engine.load(model.SerializeToString(), winograd=False)
    plan = wino.plan_for({k_: v.shape for k_, v in feeds.items()})
    oh, ow = h + pads[0] + pads[2] - 2, w + pads[1] + pads[3] - 2
    # F(2x2) on small planes unless the batch gives F(4x4) 16 tiles or more
    small = min(oh, ow) < 12 and n * -(-oh // 4) * -(-ow // 4) < 16
    assert plan.steps[0].label.startswith("conv2d/winograd_f2 " if small else "conv2d/winograd ")
    assert ("+residual +relu" in plan.steps[0].label) == fused
    got, base = wino.run(feeds)[out], gemm.run(feeds)[out]
    ref = reference(model, feeds)[0]
    assert rel_err(base, ref) <= 1e-5
    assert rel_err(got, ref) <= 5e-5


@pytest.mark.parametrize("relu,residual,shape", [(True, False, (1, 7, 9, 11)), (False, True, (2, 59, 5, 5)),
                                                 (True, True, (1, 300, 7, 7))])
def test_input_affine_folded_into_pointwise_conv(tmp_path, relu: bool, residual: bool, shape: tuple) -> None:
    """BN (+ReLU) -> 1x1 conv runs as one conv that applies the affine while packing its input
    (DenseNet's pre-activation), also after a save/load of the plan; a BN with a second consumer
    stays a node of its own."""
    from onnx import TensorProto, helper, numpy_helper

    n, c, h, w = shape
    k = 13
    x = rand(*shape)
    scale, bias, mean = rand(c), rand(c), rand(c)
    var = np.abs(rand(c)) + 0.3
    inits = [numpy_helper.from_array(a, nm) for a, nm in
             ((scale, "s"), (bias, "b"), (mean, "m"), (var, "v"), (rand(k, c, 1, 1) / np.sqrt(c), "w"),
              (rand(k), "cb"))]
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["bn"], epsilon=1e-3)]
    src = "bn"
    if relu:
        nodes.append(helper.make_node("Relu", ["bn"], ["act"]))
        src = "act"
    nodes.append(helper.make_node("Conv", [src, "w", "cb"], ["y"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))]
    feeds = {"x": x}
    out = "y"
    if residual:
        nodes.append(helper.make_node("Add", ["y", "r"], ["z"]))
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [n, k, h, w]))
        feeds["r"] = rand(n, k, h, w)
        out = "z"
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    engine = cbir_engine.load(model.SerializeToString(), threads=2)
    labels = [s.label for s in engine.plan_for({kk: v.shape for kk, v in feeds.items()}).steps]
    assert labels == ["conv2d/gemm 1x1/s1 +input_affine" + ("_relu" if relu else "")
                      + (" +residual" if residual else "")]
    ref = reference(model, feeds)[0]
    assert rel_err(engine.run(feeds)[out], ref) <= TOL["float32"]
    path = tmp_path / "m.plan"
    engine.save(path, {kk: v.shape for kk, v in feeds.items()})
    assert rel_err(cbir_engine.load(path).run(feeds)[out], ref) <= TOL["float32"]

    # The BN's output also leaves the graph: it must be computed, so nothing is folded.
    graph.output.append(helper.make_tensor_value_info(src, TensorProto.FLOAT, None))
    model2 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    e2 = cbir_engine.load(model2.SerializeToString())
    labels2 = [s.label for s in e2.plan_for({kk: v.shape for kk, v in feeds.items()}).steps]
    assert not any("input_affine" in lb for lb in labels2)
    got = e2.run(feeds)
    assert rel_err(got[out], ref) <= TOL["float32"]


@pytest.mark.parametrize("shape", [(1, 7, 9, 11), (2, 59, 5, 5), (1, 64, 56, 57)])
def test_excitation_scale_and_residual_in_one_step(shape: tuple) -> None:
    """Relu(Add(Mul(x, s), r)), the tail of a squeeze-and-excitation block, runs as one step."""
    from onnx import TensorProto, helper

    n, c = shape[:2]
    feeds = {"x": rand(*shape), "s": rand(n, c, 1, 1), "r": rand(*shape)}
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["r", "m"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    inputs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in feeds.items()]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    engine = cbir_engine.load(model.SerializeToString(), threads=2)
    labels = [s.label for s in engine.plan_for({k: v.shape for k, v in feeds.items()}).steps]
    assert labels == ["mul +residual +relu"]
    assert rel_err(engine.run(feeds)["y"], reference(model, feeds)[0]) <= TOL["float32"]
