"""The ONNX node test cases that the onnx package ships, run through the engine.

Every case whose operators the engine claims must pass. A case is skipped, with the reason, only
when the engine refuses it up front with UnsupportedOpError or DTypeError (an op it does not
claim, an attribute value it does not implement, a non-float32 tensor); any other error or a
wrong number fails. Ops the engine folds as shape computations (Shape, Gather, Cast, ...) are run
with their inputs turned into constants, which is how the engine meets them.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx.backend.test.case.node import collect_testcases

import cbir_engine
from cbir_engine.errors import DTypeError, UnsupportedOpError
from cbir_engine.onnx.registry import REGISTRY

CASES = collect_testcases()


def _inputs_as_constants(model: onnx.ModelProto, inputs: list[np.ndarray]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    names = [i.name for i in g.input]
    for name, arr in zip(names, inputs, strict=False):
        g.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
    del g.input[:]
    return m


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def _id(case) -> str:
    return case.name


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_node_case(case) -> None:
    model = case.model
    ops = _ops(model)
    unclaimed = sorted(op for op in ops if op not in REGISTRY)
    if unclaimed:
        pytest.skip(f"ops not claimed: {', '.join(unclaimed)}")
    if any(n.domain not in ("", "ai.onnx") for n in model.graph.node):
        pytest.skip("custom domain")
    fold_only = all(REGISTRY[op].fold_only or op == "Constant" for op in ops)
    for inputs, expected in case.data_sets:
        arrays = [*inputs, *expected]
        if any(not isinstance(x, np.ndarray) for x in arrays):
            pytest.skip("sequence or optional values (the engine runs tensors)")
        if any(x.dtype.kind not in "biuf" for x in arrays):
            pytest.skip("tensors of a type numpy has no native dtype for (float8, int4, ...)")
        if fold_only:
            model_run = _inputs_as_constants(model, inputs)
            feed = {}
        else:
            model_run = model
            feed = dict(zip([i.name for i in model.graph.input], inputs, strict=False))
        try:
            engine = cbir_engine.load(model_run.SerializeToString(), threads=2)
            got = engine.run({k: v for k, v in feed.items()})
        except (UnsupportedOpError, DTypeError) as e:
            pytest.skip(f"{type(e).__name__}: {e}")
        outs = list(got.values())
        assert len(outs) == len(expected)
        rtol = case.rtol if case.rtol is not None else 1e-3
        atol = case.atol if case.atol is not None else 1e-7
        for out, ref in zip(outs, expected, strict=True):
            ref = np.asarray(ref)
            out = np.asarray(out)
            assert out.shape == ref.shape, f"shape {out.shape} != {ref.shape}"
            if ref.dtype.kind == "f":
                np.testing.assert_allclose(out.astype(np.float64), ref.astype(np.float64),
                                           rtol=max(rtol, 1e-4), atol=max(atol, 1e-5))
            else:
                np.testing.assert_array_equal(out, ref)
