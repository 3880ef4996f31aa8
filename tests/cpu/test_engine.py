"""Engine behaviour: passes, memory plan, dynamic batch, old opsets, torch in/out."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import cbir_engine
from cbir_engine.graph.ir import Graph
from cbir_engine.graph.passes import fold_batchnorm, fuse_activation, fuse_residual, optimize
from cbir_engine.plan.memory import Buffer, plan_offsets
from tests.helpers import ort_reference, reference, rel_err, resnet_block_model

RNG = np.random.default_rng(5)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("opset,inits_as_inputs",
                         [(9, True), (11, False), (13, False), (17, False), (21, False)])
def test_block_matches_reference_at_several_batches(opset: int, inits_as_inputs: bool) -> None:
    model = resnet_block_model(opset, inits_as_inputs)
    engine = cbir_engine.load(model.SerializeToString())
    for batch in (1, 3, 2, 7):
        x = rand(batch, 8, 6, 6)
        got = engine(x)
        # ONNX Runtime as the reference: onnx.reference's BatchNormalization-9 mixes batch
        # statistics in whenever `momentum` is set, which is not inference.
        ref = ort_reference(model, {"x": x})[0]
        assert got.shape == ref.shape == (batch, 8 * 36)
        assert rel_err(got, ref) <= 1e-5
    assert len(engine._plans) == 4  # one specialisation per batch size, one loaded model


def test_block_is_fused_to_two_convs() -> None:
    engine = cbir_engine.load(resnet_block_model().SerializeToString())
    ops = [n.op for n in engine.graph.nodes]
    # BN folded, ReLUs and the residual Add fused, Dropout removed; Shape chain left for batch.
    assert ops.count("Conv") == 2
    assert not {"BatchNormalization", "Relu", "Add", "Dropout", "Identity"} & set(ops)
    conv2 = [n for n in engine.graph.nodes if n.op == "Conv"][1]
    assert conv2.attrs["activation"] == "Relu" and conv2.input(3) == "x"
    plan = engine.plan_for({"x": (2, 8, 6, 6)})
    assert [s.kernel for s in plan.steps] == ["conv2d", "conv2d"]  # the flatten is a view
    text = engine.summary({"x": (2, 8, 6, 6)})
    assert "+residual +relu" in text and "arena" in text


def test_summary_describes_the_plan_that_ran(monkeypatch) -> None:
    engine = cbir_engine.load(resnet_block_model().SerializeToString())
    engine(rand(2, 8, 6, 6))

    def no_replanning(shapes):
        raise AssertionError(f"re-planned for {shapes}")

    monkeypatch.setattr(engine, "plan_for", no_replanning)
    assert "+residual +relu" in engine.summary()  # the last shapes run
    assert "[2, 8, 6, 6]" in engine.summary({"x": (2, 8, 6, 6)})
    assert engine.memory({"x": (2, 8, 6, 6)})["arena_bytes"] > 0
    with pytest.raises(AssertionError, match="re-planned"):
        engine.summary({"x": (3, 8, 6, 6)})  # shapes never run still get a plan of their own


def test_sum_op_of_old_model_zoos() -> None:
    x = rand(2, 3)
    node = helper.make_node("Sum", ["a", "b", "c"], ["y"])
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in "abc"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    engine = cbir_engine.load(model.SerializeToString())
    out = engine.run({"a": x, "b": 2 * x, "c": 3 * x})["y"]
    np.testing.assert_allclose(out, 6 * x, rtol=1e-6)


def test_bn_folding_is_exact_to_float32() -> None:
    model = resnet_block_model()
    unfused = cbir_engine.load(model.SerializeToString(), optimize=False)
    fused = cbir_engine.load(model.SerializeToString())
    x = rand(3, 8, 6, 6)
    ref = reference(model, {"x": x})[0]
    assert rel_err(fused(x), ref) <= 1e-5
    assert rel_err(unfused(x), ref) <= 1e-5
    assert not any(n.op == "BatchNormalization" for n in fused.graph.nodes)
    assert sum(n.op == "BatchNormalization" for n in unfused.graph.nodes) == 0  # folding always runs


def test_passes_report_change_and_reach_a_fixpoint() -> None:
    from cbir_engine.onnx import import_model

    g, _ = import_model(resnet_block_model())
    optimize(g)
    assert not fold_batchnorm(g) and not fuse_activation(g) and not fuse_residual(g)


def test_memory_plan_reuses_and_never_overlaps_live_buffers() -> None:
    bufs = [Buffer(f"b{i}", int(RNG.integers(1, 5000)), i, i + int(RNG.integers(0, 4))) for i in range(60)]
    offsets, arena = plan_offsets(bufs)
    for a in bufs:
        for b in bufs:
            if a.name < b.name and not (a.last < b.first or b.last < a.first):
                ra = (offsets[a.name], offsets[a.name] + a.nbytes)
                rb = (offsets[b.name], offsets[b.name] + b.nbytes)
                assert ra[1] <= rb[0] or rb[1] <= ra[0], (a, b)
    assert arena < sum(b.nbytes for b in bufs)
    assert all(o % 64 == 0 for o in offsets.values())


def test_memory_report_for_a_chain() -> None:
    # A chain of 10 convs needs two live activations at a time, not ten.
    c = 16
    nodes, inits = [], []
    prev = "x"
    for i in range(10):
        w = rand(c, c, 3, 3) * 0.1
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        prev = f"c{i}"
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 32, 32])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    engine = cbir_engine.load(model.SerializeToString())
    m = engine.memory({"x": (1, c, 32, 32)})
    one = c * 32 * 32 * 4
    assert m["intermediate_bytes"] == 11 * one
    assert m["arena_bytes"] <= 3 * one


def test_concurrent_calls_are_serialised_correctly() -> None:
    engine = cbir_engine.load(resnet_block_model().SerializeToString())
    xs = [rand(b, 8, 6, 6) for b in (1, 2, 3, 4)]
    expected = [engine(x) for x in xs]
    errors = []

    def work(i: int) -> None:
        for _ in range(20):
            if not np.array_equal(engine(xs[i % 4]), expected[i % 4]):
                errors.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_more_threads_than_cpus_agree_with_one_thread() -> None:
    """Pool threads that share one CPU (the others taken) hand it to each other instead of
    spinning on it: same results as one thread, and no run waits on a thread that cannot run."""
    code = ("import os, numpy as np, cbir_engine\n"
            "from tests.helpers import resnet_block_model\n"
            "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
            "m = resnet_block_model().SerializeToString()\n"
            "x = np.random.default_rng(0).standard_normal((4, 8, 6, 6)).astype(np.float32)\n"
            "three, one = cbir_engine.load(m, threads=3), cbir_engine.load(m, threads=1)\n"
            "want = one(x)\n"
            "assert all(np.array_equal(three(x), want) for _ in range(200))\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_profile_lists_every_step() -> None:
    engine = cbir_engine.load(resnet_block_model().SerializeToString())
    rows = engine.profile(rand(2, 8, 6, 6), repeat=2)
    assert [r["kernel"].split("/")[0] for r in rows] == ["conv2d", "conv2d"]
    assert all(r["ms"] > 0 and r["gflops"] > 0 for r in rows)


def test_engine_imports_without_torch() -> None:
    code = ("import sys, numpy as np, cbir_engine\n"
            "from tests.helpers import resnet_block_model\n"
            "e = cbir_engine.load(resnet_block_model().SerializeToString())\n"
            "e(np.zeros((1, 8, 6, 6), np.float32))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_supported_ops_lists_kernels_and_folds() -> None:
    ops = cbir_engine.supported_ops()
    for op in ("Conv", "BatchNormalization", "LRN", "Gemm", "MatMul", "Concat", "Softmax",
               "ReduceL2", "LpNormalization", "Pad", "MaxPool", "AveragePool", "Sum"):
        assert ops[op].startswith("kernel"), op
    for op in ("Shape", "Gather", "Cast", "ConstantOfShape"):
        assert ops[op].startswith("fold"), op


def test_graph_copy_shares_constants() -> None:
    g = Graph()
    name = g.add_const(np.ones(3, np.float32))
    h = g.copy()
    assert h.values[name].const is g.values[name].const


torch = pytest.importorskip("torch")


def test_from_torch_torch_in_torch_out() -> None:
    from cbir_engine.models import randomize_batchnorm

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 4, 1), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(4, 5),
    )
    randomize_batchnorm(net, 1)
    net.eval()
    engine = cbir_engine.from_torch(net, torch.zeros(1, 3, 16, 16))
    for batch in (1, 4):
        x = torch.randn(batch, 3, 16, 16)
        y = engine(x)
        assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.device == x.device
        with torch.no_grad():
            ref = net(x)
        assert rel_err(y.numpy(), ref.numpy()) <= 1e-5


def test_dynamo_exported_resnet18() -> None:
    torchvision = pytest.importorskip("torchvision")
    from cbir_engine.models import randomize_batchnorm

    torch.manual_seed(0)
    net = randomize_batchnorm(torchvision.models.resnet18(), 3).eval()
    engine = cbir_engine.from_torch(net, torch.zeros(1, 3, 64, 64), dynamo=True, opset=18)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            ref = net(x)
        assert rel_err(engine(x).numpy(), ref.numpy()) <= 1e-4


def test_gemm_relu_and_matmul_add_fuse() -> None:
    w, b, w2, b2 = rand(16, 32), rand(16), rand(16, 8), rand(8)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1),
             helper.make_node("Relu", ["g"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["m"]),
             helper.make_node("Add", ["m", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in
                               {"w": w, "b": b, "w2": w2, "b2": b2}.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    engine = cbir_engine.load(model.SerializeToString())
    assert [n.op for n in engine.graph.nodes] == ["Gemm", "Gemm"]
    assert engine.graph.nodes[0].attrs["activation"] == "Relu"
    x = rand(5, 32)
    assert rel_err(engine(x), reference(model, {"x": x})[0]) <= 1e-5


def test_concat_inputs_written_in_place_at_batch_1() -> None:
    """Inception-style branches: at batch 1 each branch writes its slice of the concat output
    (no copy step); at batch 2 the slices are strided and the concat copies."""
    c = 8
    w1, w2, w3 = rand(4, c, 1, 1), rand(6, c, 3, 3), rand(5, c, 1, 1)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]),
             helper.make_node("Conv", ["x", "w2"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["p", "w3"], ["d"]),
             helper.make_node("Concat", ["a", "b", "x", "d"], ["y"], axis=1)]  # x is a graph input
    graph = helper.make_graph(nodes, "branches",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k)
                               for k, v in {"w1": w1, "w2": w2, "w3": w3}.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    engine = cbir_engine.load(model.SerializeToString())
    one = engine.plan_for({"x": (1, c, 9, 9)})
    concat = [s for s in one.steps if s.kernel == "concat"]
    assert len(concat) == 1 and sum(o is not None for o in concat[0].operands[:-1]) == 1  # only x copied
    assert [s.kernel for s in engine.plan_for({"x": (2, c, 9, 9)}).steps].count("concat") == 1
    for batch in (1, 2):
        x = rand(batch, c, 9, 9)
        assert rel_err(engine(x), reference(model, {"x": x})[0]) <= 1e-5


def test_raw_weights_released_once_packed() -> None:
    model = resnet_block_model()
    engine = cbir_engine.load(model.SerializeToString())
    x = rand(2, 8, 6, 6)
    first = engine(x)
    conv_weights = [engine.graph.values[n.inputs[1]].const for n in engine.graph.nodes if n.op == "Conv"]
    assert all(0 in w.strides for w in conv_weights)  # placeholders, no memory behind them
    for batch in (1, 2, 5):  # other batch sizes reuse the packed weights
        xb = rand(batch, 8, 6, 6) if batch != 2 else x
        assert rel_err(engine(xb), ort_reference(model, {"x": xb})[0]) <= 1e-5
    np.testing.assert_array_equal(engine(x), first)
