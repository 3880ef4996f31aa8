"""Per-layer time of cbir-engine against ONNX Runtime's own profiler, grouped by our kernel label.

ONNX Runtime names each profiled node after its output (with an "_nchwc" suffix on the blocked
path); layers are matched on that output name, or on the conv's node name when the residual Add
is fused on both sides. Medians over the runs, milliseconds.

ONNX Runtime's per-layer times come from its profiler, so the whole-run medians of an unprofiled
session and of our engine (interleaved with the rest) are printed too, as the times that count,
with a bound: our time if every GEMM and direct conv ran at the measured FMA peak (Winograd and
non-conv steps as measured), against ONNX Runtime's whole run.

    python bench/bench_layers_vs_ort.py [--model inception_v3] [--threads 1] [--runs 9] [--batch 8]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import tempfile
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--gap-ms", type=float, default=50.0, help="idle time before each timed run")
    ap.add_argument("--per-layer", type=int, default=0, metavar="N",
                    help="also list the N layers where we lose the most time against ONNX Runtime")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    import cbir_engine
    from cbir_engine.models import build
    from cbir_engine.torch_backend import export_onnx

    module, size = build(args.model, seed=0)
    model = export_onnx(module, torch.zeros(1, 3, size, size), opset=17)
    x = np.random.default_rng(0).standard_normal((args.batch, 3, size, size)).astype(np.float32)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    plain_opts = ort.SessionOptions()
    plain_opts.intra_op_num_threads = args.threads
    plain = ort.InferenceSession(model, plain_opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    engine = cbir_engine.load(model, threads=args.threads)
    engine(x)
    plan, ex = engine._specialised({engine.graph.inputs[0]: x})
    # The two engines alternate run by run, so a busy spell on the host lands on both, each run
    # after an idle gap: ONNX Runtime's pool threads keep spinning after a run and would take the
    # cores from the next one (without the gap our GoogLeNet ran 3x slower).
    sess.run(None, feed)
    plain.run(None, feed)
    runs, ort_whole, ours_whole = [], [], []
    for _ in range(args.runs):
        time.sleep(args.gap_ms / 1e3)
        sess.run(None, feed)
        time.sleep(args.gap_ms / 1e3)
        runs.append(ex.profile([x])[1])
        time.sleep(args.gap_ms / 1e3)
        t0 = time.perf_counter()
        plain.run(None, feed)
        ort_whole.append(time.perf_counter() - t0)
        time.sleep(args.gap_ms / 1e3)
        t0 = time.perf_counter()
        engine(x)
        ours_whole.append(time.perf_counter() - t0)
    ours_ms = [statistics.median(v) / 1e6 for v in zip(*runs, strict=True)]
    per_node: dict[str, list[float]] = collections.defaultdict(list)
    with open(sess.end_profiling()) as f:
        for e in json.load(f):
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                per_node[e["name"][: -len("_kernel_time")]].append(e["dur"] / 1e3)
    ort_ms = {k: statistics.median(v) for k, v in per_node.items()}

    by_output = {n.describe(): n.outputs[0] for n in engine.graph.nodes}
    shapes = {n.describe(): n for n in engine.graph.nodes}
    ours: dict[str, tuple[float, str]] = {}
    detail: dict[str, str] = {}
    for step, ms in zip(plan.steps, ours_ms, strict=True):
        names = []
        if step.node in by_output:
            names.append(by_output[step.node])
        m = re.search(r"'([^']+)'", step.node)
        if m and m.group(1).endswith("/Conv"):
            names.append(m.group(1) + "_output_0")
        for name in names:
            ours.setdefault(name, (ms, step.label))
            node = shapes.get(step.node)
            detail.setdefault(name, _conv_shape(engine, node) if node is not None else "")

    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for name, ms in ort_ms.items():
        key = name[: -len("_nchwc")] if name.endswith("_nchwc") else name
        if key in ours:
            label = ours[key][1].split(" +")[0]
            groups[label][0] += ours[key][0]
            groups[label][1] += ms
            groups[label][2] += 1
    print(f"{args.model}, {args.threads} thread(s), batch {args.batch}: ours {sum(ours_ms):.1f} ms, "
          f"ONNX Runtime {sum(ort_ms.values()):.1f} ms (sums of layer medians)")
    print(f"{'our kernel':<34}{'layers':>7}{'ours ms':>10}{'ORT ms':>10}{'ours/ORT':>10}")
    for label, (o, r, n) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        print(f"{label:<34}{n:>7}{o:>10.2f}{r:>10.2f}{o / r:>10.2f}")
    # One core's FMA peak (best of 3) times the threads, as in bench_models.py.
    peak = args.threads * max(cbir_engine._C.measure_fma_gflops(1, 0.3) for _ in range(3))
    bound = sum(ms if "winograd" in step.label or not step.flops else min(ms, step.flops / peak / 1e6)
                for step, ms in zip(plan.steps, ours_ms, strict=True))
    ort_ms_whole = statistics.median(ort_whole) * 1e3
    print(f"whole runs: ours {statistics.median(ours_whole) * 1e3:.1f} ms, ONNX Runtime (unprofiled) "
          f"{ort_ms_whole:.1f} ms; at the FMA peak ({peak:.0f} GFLOP/s) on every GEMM and direct conv, "
          f"ours would be {bound:.1f} ms = {bound / ort_ms_whole:.2f}x ONNX Runtime")
    if args.per_layer:
        rows = []
        for name, ms in ort_ms.items():
            key = name[: -len("_nchwc")] if name.endswith("_nchwc") else name
            if key in ours:
                label = ours[key][1].split(" +")[0]
                rows.append((ours[key][0] - ms, ours[key][0], ms, label, detail.get(key, "")))
        print(f"\nthe {args.per_layer} layers with the largest loss (ours - ORT):")
        print(f"{'our kernel':<28}{'shape':<34}{'ours ms':>9}{'ORT ms':>9}{'ratio':>7}")
        for _, o, r, label, shape in sorted(rows, reverse=True)[: args.per_layer]:
            print(f"{label:<28}{shape:<34}{o:>9.3f}{r:>9.3f}{o / r:>7.2f}")
    return 0


def _conv_shape(engine, node) -> str:
    """Cin->Cout and the input's spatial size of a conv node ("" for other nodes)."""
    if node.op != "Conv":
        return ""
    w = engine.graph.const(node.inputs[1])
    x_shape = engine.graph.shape(node.inputs[0])
    if w is None:
        return ""
    cout, cin_g = w.shape[0], w.shape[1]
    where = f" @{x_shape[2]}x{x_shape[3]}" if x_shape is not None and len(x_shape) == 4 else ""
    return f"{cin_g * int(node.attrs.get('group', 1))}->{cout}{where}"


if __name__ == "__main__":
    sys.exit(main())
