"""One conv layer on two of the engine's kernels, interleaved: the measurements behind the
lowering's choice of conv method (`direct_pays`, `winograd_method` in cbir_engine/plan/lower.py).

Each shape becomes a one-node ONNX model (Conv + bias + ReLU); the engine is loaded twice with the
lowering forced to each method, the two are run alternately (A B A B ...) and the ratio is the
median of the per-pair ratios. Outputs are checked against each other.

    python bench/bench_conv_methods.py                          # the shapes the rule was set on
    python bench/bench_conv_methods.py --shapes 192x192@17k1x7 --methods gemm,direct
    python bench/bench_conv_methods.py --methods winograd,direct --shapes 128x32@56k3

A shape is CINxCOUT@SIZE, then optionally kKHxKW (or kK for square), sS (stride), pP (padding on
every side; default: half the kernel). Methods: gemm, direct, winograd (Winograd where the plan
would use it, F(4x4) or F(2x2)), and ort (ONNX Runtime's CPU provider on the same model, the peer).
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import cpu_name, git_rev, save_rows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "conv_methods.csv"
DEFAULT_SHAPES = [
    "192x192@17k1x7", "192x192@17k7x1", "48x64@35k5", "512x2048@7k1", "2048x512@7k1",
    "1024x2048@14k1s2p0", "512x1024@28k1s2p0", "512x512@14k3s2", "96x96@35k3s2p0", "288x384@35k3s2p0",
    "192x320@17k3s2p0", "1024x256@14k1", "384x384@8k1x3", "3x64@224k7s2",
]
SHAPE = re.compile(r"^(\d+)x(\d+)@(\d+)(?:k(\d+)(?:x(\d+))?)?(?:s(\d+))?(?:p(\d+))?$")


def parse_shape(text: str) -> dict:
    m = SHAPE.match(text)
    if not m:
        raise SystemExit(f"bad shape {text!r}: expected CINxCOUT@SIZE[kKH[xKW]][sS][pP]")
    cin, cout, size = int(m[1]), int(m[2]), int(m[3])
    kh = int(m[4] or 1)
    kw = int(m[5] or kh)
    stride = int(m[6] or 1)
    pads = [int(m[7])] * 4 if m[7] is not None else [kh // 2, kw // 2, kh // 2, kw // 2]
    return dict(cin=cin, cout=cout, size=size, kh=kh, kw=kw, stride=stride, pads=pads)


def conv_model(s: dict) -> tuple[bytes, float]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((s["cout"], s["cin"], s["kh"], s["kw"])) / np.sqrt(s["cin"] * s["kh"] * s["kw"])
    w, b = w.astype(np.float32), rng.standard_normal(s["cout"]).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[s["kh"], s["kw"]],
                              strides=[s["stride"]] * 2, pads=s["pads"]),
             helper.make_node("Relu", ["c"], ["y"])]
    p = s["pads"]
    oh = (s["size"] + p[0] + p[2] - s["kh"]) // s["stride"] + 1
    ow = (s["size"] + p[1] + p[3] - s["kw"]) // s["stride"] + 1
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, s["cin"], s["size"], s["size"]])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, s["cout"], oh, ow])
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    graph = helper.make_graph(nodes, "conv", [x_info], [y_info], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString(), 2.0 * s["cin"] * s["cout"] * s["kh"] * s["kw"] * oh * ow


class OrtRunner:
    """ONNX Runtime on the same one-conv model (all graph optimizations, same thread count), so a
    shape's kernel can be set against the peer's."""

    def __init__(self, model: bytes, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": x})[0]


def load_with(model: bytes, method: str, x: np.ndarray, threads: int):
    """The engine with the lowering forced to `method` (specialised while the override holds), or
    ONNX Runtime for method "ort"."""
    if method == "ort":
        return OrtRunner(model, threads)
    import cbir_engine
    import cbir_engine.plan.lower as lower

    saved = lower.direct_pays
    lower.direct_pays = (lambda *a: True) if method == "direct" else (lambda *a: False)
    try:
        engine = cbir_engine.load(model, threads=threads, winograd=method == "winograd")
        engine(x)
        label = engine.plan_for({"x": x.shape}).steps[0].label
    finally:
        lower.direct_pays = saved
    want = {"gemm": "conv2d/gemm", "direct": "conv2d/direct", "winograd": "conv2d/winograd"}[method]
    if not label.startswith(want):
        raise SystemExit(f"{method} does not apply to this shape (the plan runs {label!r})")
    return engine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES))
    ap.add_argument("--methods", default="gemm,direct", help="two of gemm, direct, winograd, ort")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=11)
    ap.add_argument("--gap-ms", type=float, default=50.0,
                    help="idle time before each timing: ONNX Runtime's threads keep spinning after a run")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    a_name, b_name = args.methods.split(",")

    print(f"{cpu_name()}, {args.threads} thread(s); ratio = {b_name} time / {a_name} time")
    print(f"{'shape':<24}{a_name + ' GF/s':>14}{b_name + ' GF/s':>14}{'ratio':>8}{'p25-p75':>12}"
          f"{'rel diff':>10}")
    rows = []
    for text in args.shapes.split(","):
        s = parse_shape(text)
        model, flops = conv_model(s)
        x = np.random.default_rng(1).standard_normal((1, s["cin"], s["size"], s["size"])).astype(np.float32)
        ea, eb = load_with(model, a_name, x, args.threads), load_with(model, b_name, x, args.threads)
        ya, yb = np.asarray(ea(x)), np.asarray(eb(x))
        diff = float(np.abs(ya - yb).max() / max(np.abs(ya).max(), 1e-30))
        reps = max(3, int(0.02 / (flops / 80e9)))  # about 20 ms per timing

        def timed(engine, reps=reps, x=x):
            time.sleep(args.gap_ms / 1e3)
            t0 = time.perf_counter()
            for _ in range(reps):
                engine(x)
            return (time.perf_counter() - t0) / reps

        timed(ea), timed(eb)
        ta, tb, ratios = [], [], []
        for i in range(args.pairs):
            if i % 2:
                t_a, t_b = timed(ea), timed(eb)
            else:
                t_b, t_a = timed(eb), timed(ea)
            ta.append(t_a), tb.append(t_b), ratios.append(t_b / t_a)
        q25, ratio, q75 = statistics.quantiles(ratios, n=4)
        row = {
            "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": cpu_name(),
            "version": git_rev(), "threads": args.threads, "shape": text, "method_a": a_name,
            "method_b": b_name, "gflops_a": round(flops / statistics.median(ta) / 1e9, 1),
            "gflops_b": round(flops / statistics.median(tb) / 1e9, 1), "b_over_a": round(ratio, 3),
            "p25": round(q25, 3), "p75": round(q75, 3), "rel_diff": f"{diff:.1e}",
        }
        rows.append(row)
        print(f"{text:<24}{row['gflops_a']:>14.1f}{row['gflops_b']:>14.1f}{ratio:>8.2f}"
              f"{f'{q25:.2f}-{q75:.2f}':>12}{diff:>10.1e}", flush=True)
    save_rows(RESULTS, rows, not args.no_csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
