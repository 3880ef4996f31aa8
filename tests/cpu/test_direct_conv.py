"""The direct conv kernel (output channels in the lanes, input broadcast from an NHWC copy)
against the ONNX reference and the GEMM path: odd channel counts (partial 16-channel blocks,
copies with channel tails), every tile width 1..6, strides, dilations, asymmetric padding, the
sampled copy of unpadded 1x1 convs, batches, the fused residual and activations, threads, and
plan files. The lowering's choice is forced here; which shapes it picks by itself is checked
at the end."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import cbir_engine
import cbir_engine.plan.lower as lower
from tests.helpers import TOL, reference, rel_err

RNG = np.random.default_rng(77)

# (N, C, H, W, K, (kh, kw), strides, pads [t, l, b, r], dilations)
CASES = [
    (1, 16, 7, 7, 16, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),  # one full tile + a 1-pixel tile
    (2, 59, 14, 14, 7, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1)),  # sampled copy, channel tail
    (1, 17, 13, 11, 59, (1, 1), (3, 3), (0, 0, 0, 0), (1, 1)),  # stride 3, K tail
    (1, 24, 17, 17, 32, (1, 7), (1, 1), (0, 3, 0, 3), (1, 1)),
    (1, 24, 17, 17, 33, (7, 1), (1, 1), (3, 0, 3, 0), (1, 1)),
    (3, 33, 15, 15, 16, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    (1, 40, 17, 17, 48, (3, 3), (2, 2), (0, 0, 0, 0), (1, 1)),  # 8-wide rows: two 4-pixel tiles
    (1, 16, 12, 12, 20, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),  # dilation
    (1, 19, 10, 9, 21, (2, 3), (1, 2), (1, 0, 0, 2), (1, 1)),  # asymmetric everything
    (1, 3, 30, 30, 64, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1)),  # stem-like: 3 channels
    (1, 300, 3, 5, 1023, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),  # long reduction (several slices)
    (1, 64, 1, 1, 16, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    (1, 130, 9, 9, 18, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # 9-wide rows: 5 + 4
    # 7x7 outputs (tiles of 4 + 3), 9 channel blocks, 2 images: with AVX-512 and 2 threads, 4 pairs
    # of blocks and a single one with a K tail
    (2, 24, 14, 14, 140, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    # pixels exactly C floats apart (C an odd number of 16-float lines): kernel rows merged
    (2, 48, 11, 11, 20, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    (1, 16, 17, 17, 16, (1, 7), (1, 1), (0, 3, 0, 3), (1, 1)),
    (1, 48, 9, 9, 16, (3, 3), (2, 1), (0, 2, 1, 0), (1, 1)),
    (1, 20, 7, 7, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # 7-wide rows: 4 + 3 (odd-channel sums)
    (1, 18, 4, 2, 17, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # 2-wide rows
    # padding rows skipped per output row: rows that see only padding, stride and dilation mixed in
    (1, 16, 3, 5, 16, (3, 3), (1, 1), (4, 1, 4, 1), (1, 1)),
    (2, 20, 9, 8, 24, (5, 1), (2, 1), (3, 0, 1, 0), (1, 1)),
    (1, 17, 8, 8, 16, (3, 3), (1, 1), (3, 1, 2, 1), (2, 1)),
    # 1xK with left/right padding: the transposed copy (padded taps skipped per output column)
    (2, 20, 6, 9, 19, (1, 3), (1, 1), (0, 2, 0, 0), (1, 1)),
    (1, 16, 5, 4, 16, (1, 5), (1, 1), (0, 1, 0, 3), (1, 1)),
    (1, 33, 13, 17, 40, (1, 7), (1, 1), (0, 3, 0, 3), (1, 1)),
]


def conv_model(case, fused: str) -> tuple[bytes, dict, float]:
    n, c, h, w, k, (kh, kw), strides, pads, dil = case
    x = RNG.standard_normal((n, c, h, w)).astype(np.float32)
    weight = (RNG.standard_normal((k, c, kh, kw)) / np.sqrt(c * kh * kw)).astype(np.float32)
    bias = RNG.standard_normal(k).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[kh, kw], strides=list(strides),
                              pads=list(pads), dilations=list(dil))]
    oh = (h + pads[0] + pads[2] - dil[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (w + pads[1] + pads[3] - dil[1] * (kw - 1) - 1) // strides[1] + 1
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))]
    feeds = {"x": x}
    out = "c"
    if fused == "residual_relu":
        feeds["r"] = RNG.standard_normal((n, k, oh, ow)).astype(np.float32)
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [n, k, oh, ow]))
        nodes += [helper.make_node("Add", ["c", "r"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
        out = "y"
    elif fused == "clip":
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"]))
        out = "y"
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b"),
             numpy_helper.from_array(np.float32(-0.5), "lo"), numpy_helper.from_array(np.float32(0.5), "hi")]
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, feeds, out


@pytest.fixture
def force_direct(monkeypatch):
    monkeypatch.setattr(lower, "direct_pays", lambda *args: True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:5]}k{c[5]}s{c[6]}p{c[7]}d{c[8]}")
@pytest.mark.parametrize("fused", ["none", "residual_relu", "clip"])
def test_direct_conv_matches_reference(case, fused: str, force_direct, gemm_isa: str) -> None:
    model, feeds, out = conv_model(case, fused)
    engine = cbir_engine.load(model.SerializeToString(), winograd=False, threads=2)
    plan = engine.plan_for({k: v.shape for k, v in feeds.items()})
    assert plan.steps[0].label.startswith("conv2d/direct "), plan.steps[0].label
    if fused == "residual_relu":
        assert "+residual +relu" in plan.steps[0].label
    got = engine.run(feeds)[out]
    ref = reference(model, feeds)[0]
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= TOL["float32"], f"rel err {rel_err(got, ref):.2e}"


@pytest.mark.parametrize("threads", [1, 3])
def test_direct_conv_thread_counts_agree(threads: int, force_direct, gemm_isa: str) -> None:
    model, feeds, out = conv_model(CASES[5], "residual_relu")
    one = cbir_engine.load(model.SerializeToString(), threads=1).run(feeds)[out]
    many = cbir_engine.load(model.SerializeToString(), threads=threads).run(feeds)[out]
    np.testing.assert_array_equal(one, many)  # same reduction order whatever the split


def test_direct_conv_plan_file_round_trip(tmp_path, force_direct) -> None:
    model, feeds, out = conv_model(CASES[3], "none")
    engine = cbir_engine.load(model.SerializeToString())
    want = engine.run(feeds)[out]
    path = tmp_path / "direct.cbir"
    engine.save(path)
    again = cbir_engine.load(path)
    assert "conv2d/direct" in again.summary()
    np.testing.assert_array_equal(again.run(feeds)[out], want)


@pytest.mark.parametrize("shape,direct", [
    ((512, 2048, 1, 1, 1, 1, 7, 7), True),  # 49 pixels: GEMM panels waste 15 of 64 columns
    ((160, 192, 1, 7, 1, 1, 17, 17), True),  # 1x7 at 17x17
    ((1024, 2048, 1, 1, 2, 2, 7, 7), True),  # strided 1x1
    ((512, 1024, 1, 1, 2, 2, 14, 14), False),  # strided 1x1 at 14x14: the GEMM's gather is a copy
    ((256, 512, 1, 1, 2, 2, 28, 28), False),  # 784 pixels: exact panels
    ((48, 64, 5, 5, 1, 1, 35, 35), True),  # 25 taps: the im2col gather costs more than the waste
    ((192, 320, 3, 3, 2, 2, 8, 8), False),
    ((1024, 256, 1, 1, 1, 1, 14, 14), False),  # 196 pixels fill the panels well
    ((384, 384, 1, 3, 1, 1, 8, 8), False),  # 64 pixels: exact panels
    ((3, 64, 7, 7, 2, 2, 112, 112), False),  # the stem
])
def test_lowering_picks_direct_where_it_measured_faster(shape, direct: bool) -> None:
    c, k, kh, kw, sh, sw, oh, ow = shape
    assert lower.direct_pays(c, k, kh, kw, sh, sw, oh, ow) is direct
