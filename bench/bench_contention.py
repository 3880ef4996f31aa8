"""Inference while another process keeps one CPU busy: cbir-engine on 2 threads and on 1,
against ONNX Runtime on 2 threads, interleaved in one process.

A server rarely has its cores to itself. When one of the two is taken, a thread pool's threads
end up queued behind each other on the other core, and whatever a thread spins on there holds the
core its partner needs. The busy process is a Python loop pinned to the last CPU this process may
use (Linux); the benchmark runs while it does.

    python bench/bench_contention.py                    # GoogLeNet and ResNet-50 at batch 1
    python bench/bench_contention.py --models resnet50 --batches 1,8
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import cpu_name, git_rev, onnx_file, save_rows, timed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "contention.csv"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="googlenet,resnet50")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    import cbir_engine

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs at least 2 CPUs")
    busy_cpu = cpus[-1]
    busy_loop = f"import os\nos.sched_setaffinity(0, {{{busy_cpu}}})\nwhile True: pass"
    hog = subprocess.Popen([sys.executable, "-c", busy_loop])
    rows = []
    try:
        time.sleep(0.5)
        print(f"{cpu_name()}, CPU {busy_cpu} busy with another process; median ms of {args.rounds} rounds")
        print(f"{'model':<14}{'batch':>6}{'ours 2t':>10}{'ours 1t':>10}{'ORT 2t':>10}{'ours/ORT':>10}")
        for name in args.models.split(","):
            path, size = onnx_file(name)
            two, one = cbir_engine.load(path, threads=2), cbir_engine.load(path, threads=1)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 2
            opts.inter_op_num_threads = 1
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feed = sess.get_inputs()[0].name
            for batch in (int(b) for b in args.batches.split(",")):
                x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
                runs = {
                    "ours2": lambda x=x, e=two: e(x),
                    "ours1": lambda x=x, e=one: e(x),
                    "ort2": lambda x=x, s=sess, f=feed: s.run(None, {f: x}),
                }
                for fn in runs.values():
                    fn()
                times: dict[str, list[float]] = {k: [] for k in runs}
                ratios = []
                for r in range(args.rounds):
                    order = list(runs.items())
                    order = order[r % 3 :] + order[: r % 3]
                    got = {}
                    for key, fn in order:
                        got[key], _ = timed(fn, 0.05)  # ONNX Runtime's threads spin after a run
                        times[key].append(got[key])
                    ratios.append(got["ours2"] / got["ort2"])
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                ratio = statistics.median(ratios)
                print(
                    f"{name:<14}{batch:>6}{med['ours2']:>10.1f}{med['ours1']:>10.1f}{med['ort2']:>10.1f}"
                    f"{ratio:>10.2f}",
                    flush=True,
                )
                rows.append(
                    {
                        "date": dt.datetime.now().isoformat(timespec="seconds"),
                        "machine": cpu_name(),
                        "version": git_rev(),
                        "model": name,
                        "batch": batch,
                        "busy_cpus": 1,
                        "ours_2t_ms": round(med["ours2"], 2),
                        "ours_1t_ms": round(med["ours1"], 2),
                        "ort_2t_ms": round(med["ort2"], 2),
                        "ours_over_ort": round(ratio, 3),
                    }
                )
    finally:
        hog.kill()
        hog.wait()
    save_rows(RESULTS, rows, not args.no_csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
