"""Convs forced onto the im2col GEMM path, against the ONNX reference: panels of 16 output
pixels that cross output rows (small images), padding on both sides and padding wider than the
kernel reaches, stride 1, 2 and 3, dilation, asymmetric padding and a batch of 2."""

from __future__ import annotations

import numpy as np
import pytest

import cbir_engine
import cbir_engine.plan.lower as lower
from tests.helpers import TOL, reference, rel_err, single_node_model

RNG = np.random.default_rng(77)

CASES = [
    # (N, C, H, W, K, kernel, attrs)
    (1, 3, 7, 7, 5, (3, 3), {"pads": [1, 1, 1, 1]}),  # a panel spans 3 output rows
    (2, 4, 40, 40, 6, (3, 3), {"pads": [1, 1, 1, 1]}),  # whole-row runs and both edges
    (1, 5, 17, 17, 7, (1, 7), {"pads": [0, 3, 0, 3]}),
    (1, 5, 17, 17, 7, (7, 1), {"pads": [3, 0, 3, 0]}),
    (1, 3, 12, 13, 4, (3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    (1, 3, 10, 9, 5, (2, 3), {"pads": [1, 0, 0, 2]}),
    (1, 2, 6, 6, 3, (3, 3), {"pads": [4, 4, 4, 4]}),  # rows and columns wholly in the padding
    (1, 2, 1, 1, 3, (3, 3), {"pads": [1, 1, 1, 1]}),
    (1, 4, 56, 56, 8, (3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),  # ResNet's stride-2 3x3
    (2, 3, 61, 61, 8, (7, 7), {"strides": [2, 2], "pads": [3, 3, 3, 3]}),  # the stem, odd width
    (1, 3, 9, 9, 4, (3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    (1, 3, 34, 35, 4, (3, 3), {"strides": [2, 2]}),
    (1, 3, 23, 29, 4, (3, 5), {"strides": [2, 2], "pads": [0, 4, 2, 1]}),
    (1, 3, 21, 21, 4, (3, 3), {"strides": [2, 2], "dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    (1, 3, 14, 14, 4, (4, 4), {"strides": [3, 3], "pads": [1, 2, 2, 1]}),  # element path
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:5]}k{c[5]}{c[6]}")
def test_im2col_gemm_matches_reference(case, monkeypatch, gemm_isa: str) -> None:
    monkeypatch.setattr(lower, "direct_pays", lambda *args: False)
    n, c, h, w, k, ks, attrs = case
    inputs = {"x": RNG.standard_normal((n, c, h, w)).astype(np.float32)}
    inits = {"w": RNG.standard_normal((k, c, *ks)).astype(np.float32),
             "b": RNG.standard_normal(k).astype(np.float32)}
    model = single_node_model("Conv", inputs, attrs, inits)
    engine = cbir_engine.load(model.SerializeToString(), winograd=False, threads=2)
    label = engine.plan_for({"x": inputs["x"].shape}).steps[0].label
    assert label.startswith("conv2d/gemm "), label
    got = engine.run(inputs)["y0"]
    ref = reference(model, inputs)[0]
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= TOL["float32"], f"rel err {rel_err(got, ref):.2e}"
