"""The compiled entry points accept arrays by dtype equality, not by dtype object identity: arrays
that crossed a process boundary (pickle: Ray, multiprocessing) carry equal but distinct dtype
objects and must not be refused."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import cbir_engine
from cbir_engine import _C


def test_pickled_dtypes_are_the_same_dtype() -> None:
    codes = np.random.default_rng(0).integers(0, 256, (59, 8), dtype=np.uint8)
    moved = pickle.loads(pickle.dumps(codes, protocol=5))
    assert moved.dtype is not codes.dtype and moved.dtype == codes.dtype
    ids = pickle.loads(pickle.dumps(np.arange(59, dtype=np.int64)))
    d, i = _C.hamming_knn(_C.HammingThreads(1), moved, ids, True, moved[:7], 3)
    assert (d[:, 0] == 0).all() and (i[:, 0] == np.arange(7)).all()


def test_pickled_float_input_runs_in_the_engine() -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    engine = cbir_engine.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = pickle.loads(pickle.dumps(np.linspace(-1, 1, 15, dtype=np.float32).reshape(3, 5)))
    np.testing.assert_array_equal(engine(x), np.maximum(x, 0))


def test_other_dtypes_still_refused() -> None:
    with pytest.raises(TypeError):
        _C.hamming_knn(_C.HammingThreads(1), np.zeros((4, 8), np.int8), None, True,
                       np.zeros((1, 8), np.uint8), 1)
