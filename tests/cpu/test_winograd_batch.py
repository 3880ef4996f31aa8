"""Winograd tile size by batch: F(2x2,3x3) where a batch gives F(4x4,3x3) fewer than 16 tiles,
F(4x4,3x3) from 16 on. One engine serves every batch size (the raw weight is kept to pack the
other tile size from), saved plans too, and a plan saved with only one packing still runs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import cbir_engine
from cbir_engine.plan.lower import winograd_depends_on_batch, winograd_method
from tests.helpers import reference, rel_err

RNG = np.random.default_rng(31)


@pytest.mark.parametrize("c,k,oh,ow,n,expect", [
    (512, 512, 7, 7, 1, "winograd_f2"),  # 4 tiles
    (512, 512, 7, 7, 2, "winograd_f2"),  # 8
    (512, 512, 7, 7, 4, "winograd"),  # 16
    (448, 384, 8, 8, 8, "winograd"),
    (128, 32, 7, 7, 3, "winograd_f2"),  # 12
    (256, 256, 14, 14, 1, "winograd"),  # large planes: F(4x4) at any batch
    (16, 16, 3, 3, 64, None),  # below 4x4: neither
    (8, 64, 14, 14, 1, None),  # too few channels
])
def test_winograd_method_by_batch(c: int, k: int, oh: int, ow: int, n: int, expect: str | None) -> None:
    assert winograd_method(c, k, oh, ow, n) == expect


def test_only_small_planes_depend_on_the_batch() -> None:
    assert winograd_depends_on_batch(64, 64, 7, 7)
    assert winograd_depends_on_batch(64, 64, 11, 4)
    assert not winograd_depends_on_batch(64, 64, 14, 14)
    assert not winograd_depends_on_batch(8, 64, 7, 7)


def conv_model() -> bytes:
    w = (RNG.standard_normal((24, 40, 3, 3)) / np.sqrt(360)).astype(np.float32)
    b = RNG.standard_normal(24).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 40, 7, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def check_batches(engine: cbir_engine.Engine, model, batches=(1, 8, 2, 4, 1)) -> None:
    for n in batches:
        x = RNG.standard_normal((n, 40, 7, 7)).astype(np.float32)
        label = engine.plan_for({"x": x.shape}).steps[0].label
        assert label.startswith("conv2d/winograd_f2 " if n < 4 else "conv2d/winograd "), (n, label)
        assert rel_err(engine.run({"x": x})["y"], reference(model, {"x": x})[0]) <= 5e-5, n


def test_one_engine_switches_tile_size_with_the_batch() -> None:
    model = conv_model()
    engine = cbir_engine.load(model.SerializeToString())
    check_batches(engine, model)


def test_saved_plan_packs_the_other_tile_size_for_a_new_batch(tmp_path) -> None:
    model = conv_model()
    engine = cbir_engine.load(model.SerializeToString())
    engine.run({"x": RNG.standard_normal((1, 40, 7, 7)).astype(np.float32)})  # F(2x2) packed, batch 1
    path = tmp_path / "conv.cbir"
    engine.save(path, {"x": (1, 40, 7, 7)})
    check_batches(cbir_engine.load(path), model, batches=(8, 1, 4))


def test_plan_with_one_packing_and_no_raw_weight_keeps_its_tile_size() -> None:
    """As a plan saved before the tile size followed the batch: only the F(2x2) packing, the raw
    weight dropped. A batch that would take F(4x4) runs F(2x2), with the right results."""
    model = conv_model()
    engine = cbir_engine.load(model.SerializeToString())
    x1 = RNG.standard_normal((1, 40, 7, 7)).astype(np.float32)
    engine.run({"x": x1})
    w = engine.graph.values["w"]
    w.const = np.broadcast_to(np.zeros((), np.float32), w.const.shape)  # what a release leaves
    engine._packed_only = frozenset({"w"})
    x8 = RNG.standard_normal((8, 40, 7, 7)).astype(np.float32)
    assert engine.plan_for({"x": x8.shape}).steps[0].label.startswith("conv2d/winograd_f2 ")
    assert rel_err(engine.run({"x": x8})["y"], reference(model, {"x": x8})[0]) <= 5e-5
