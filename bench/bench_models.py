"""CPU inference: cbir-engine against ONNX Runtime and torch eager, interleaved in one process.

For each model and batch size the three runtimes run in turn with the same thread count; the
order rotates every round and each timed run follows an idle gap (--gap-ms), because ONNX Runtime's
and torch's worker threads keep spinning for a while after a run and would otherwise slow whichever
runtime comes next. The table shows median times, the medians of the per-round ratios and our
achieved GFLOP/s against the measured FMA peak; `busy` is the median share of a CPU that other
processes used during the timed runs (a shared machine: rows with a high value are suspect). Rows
are appended to bench/results/cpu_models.csv.

    python bench/bench_models.py [--models resnet50,vgg16] [--batches 1,8] [--threads 2] [--rounds 15]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_MODELS = "resnet50,vgg16,googlenet,inception_v3,densenet121,seresnet50"
RESULTS = Path(__file__).resolve().parent / "results" / "cpu_models.csv"
CACHE = Path(os.environ.get("CBIR_BENCH_CACHE", "/tmp/cbir_bench_models"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def onnx_file(name: str) -> tuple[Path, int]:
    """Exports the seed network once (seeded random weights) and caches the file."""
    import torch

    from cbir_engine.models import SEED_NETWORKS, build
    from cbir_engine.torch_backend import export_onnx

    size = SEED_NETWORKS[name].input_size
    path = CACHE / f"{name}.onnx"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        module, size = build(name, seed=0)
        path.write_bytes(export_onnx(module, torch.zeros(1, 3, size, size)))
    return path, size


def _cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return sum(fields) - fields[3] - fields[4], int(mine[11]) + int(mine[12])
    except (OSError, IndexError, ValueError):
        return 0, 0


def timed(fn, gap_s: float = 0.0) -> tuple[float, float]:
    """Seconds of one call after an idle gap, and the CPUs other processes used meanwhile."""
    if gap_s:
        time.sleep(gap_s)
    (b0, m0), t0 = _cpu_ticks(), time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    b1, m1 = _cpu_ticks()
    others = max(0, (b1 - b0) - (m1 - m0)) / os.sysconf("SC_CLK_TCK")
    return t, others / t


def append_rows(path: Path, rows: list[dict]) -> None:
    """Appends result rows to a CSV, with a header when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


def save_rows(path: Path, rows: list[dict], enabled: bool = True) -> None:
    """Appends a benchmark's rows (if any, and unless --no-csv) and says where they went."""
    if enabled and rows:
        append_rows(path, rows)
        print(f"appended {len(rows)} rows to {path}")


def steal_seconds() -> float:
    """CPU time the hypervisor gave other guests while ours waited (all CPUs; /proc/stat, Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--gap-ms", type=float, default=50.0, help="idle time before each timed run")
    ap.add_argument("--no-torch", action="store_true", help="skip torch eager")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    import cbir_engine
    from cbir_engine import _C
    from cbir_engine.models import build

    torch.set_num_threads(args.threads)
    # One core's peak (best of 3) times the threads: timing all threads at once undercounts
    # whenever the thread pool hands both chunks to one thread (a late wake-up on a busy host).
    peak = args.threads * max(_C.measure_fma_gflops(1, 0.3) for _ in range(3))
    print(f"{cpu_name()}, {args.threads} threads, measured FMA peak {peak:.0f} GFLOP/s (fp32 AVX2)")
    header = (f"{'model':<14}{'batch':>6}{'ours ms':>10}{'ORT ms':>10}{'torch ms':>10}"
              f"{'ours/ORT':>10}{'p25-p75':>11}{'ours/torch':>12}{'GFLOP/s':>9}{'% peak':>8}{'busy':>6}"
              f"{'steal':>7}")
    print(header)
    rows = []
    for name in args.models.split(","):
        path, size = onnx_file(name)
        engine = cbir_engine.load(path, threads=args.threads)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = sess.get_inputs()[0].name
        module = None if args.no_torch else build(name, seed=0)[0]
        for batch in (int(b) for b in args.batches.split(",")):
            x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
            xt = torch.from_numpy(x)

            def run_ours(x=x, engine=engine):
                return engine(x)

            def run_ort(x=x, sess=sess, feed=feed):
                return sess.run(None, {feed: x})

            def run_torch(xt=xt, module=module):
                with torch.inference_mode():
                    return module(xt)

            for fn in (run_ours, run_ort) + (() if module is None else (run_torch,)):
                fn()  # warm-up: specialisation, allocation, lazy init
            runners = {"ours": run_ours, "ort": run_ort} | ({} if module is None else {"torch": run_torch})
            times: dict[str, list[float]] = {k: [] for k in runners}
            busy: list[float] = []
            steal0, wall0 = steal_seconds(), time.perf_counter()
            names = list(runners)
            for r in range(args.rounds):
                for key in names[r % len(names):] + names[:r % len(names)]:
                    t, others = timed(runners[key], args.gap_ms / 1e3)
                    times[key].append(t)
                    busy.append(others)
            steal = (steal_seconds() - steal0) / ((time.perf_counter() - wall0) * (os.cpu_count() or 1))
            t_ours, t_ort, t_torch = times["ours"], times["ort"], times.get("torch", [])
            r_ort = [a / b for a, b in zip(t_ours, t_ort, strict=True)]
            q25, _, q75 = statistics.quantiles(r_ort, n=4) if len(r_ort) > 1 else (r_ort[0],) * 3
            r_torch = [a / c for a, c in zip(t_ours, t_torch, strict=True)] if t_torch else []
            flops = sum(r["flops"] for r in engine.profile(x))
            med = statistics.median(t_ours)
            gflops = flops / med / 1e9
            row = {
                "date": dt.datetime.now().isoformat(timespec="seconds"),
                "machine": f"{cpu_name()} ({os.cpu_count()} cpus)",
                "version": f"cbir-engine {cbir_engine.__version__} {git_rev()}; "
                           f"onnxruntime {ort.__version__}; torch {torch.__version__}",
                "model": name, "batch": batch, "threads": args.threads,
                "ours_ms": round(med * 1e3, 2), "ort_ms": round(statistics.median(t_ort) * 1e3, 2),
                "torch_ms": round(statistics.median(t_torch) * 1e3, 2) if t_torch else "",
                "ours_over_ort": round(statistics.median(r_ort), 3),
                "ours_over_torch": round(statistics.median(r_torch), 3) if r_torch else "",
                "gflops": round(gflops, 1), "peak_gflops": round(peak, 1),
                "others_busy": round(statistics.median(busy), 2),
                "note": f"rotating order, {args.gap_ms:g} ms idle before each run; ours/ORT p25-p75 "
                        f"{q25:.2f}-{q75:.2f}; host steal {100 * steal:.1f}% of the CPUs",
            }
            rows.append(row)
            torch_ms = f"{row['torch_ms']:>10.1f}" if t_torch else f"{'-':>10}"
            r_t = f"{row['ours_over_torch']:>12.2f}" if r_torch else f"{'-':>12}"
            print(f"{name:<14}{batch:>6}{row['ours_ms']:>10.1f}{row['ort_ms']:>10.1f}{torch_ms}"
                  f"{row['ours_over_ort']:>10.2f}{f'{q25:.2f}-{q75:.2f}':>11}{r_t}{gflops:>9.1f}"
                  f"{100 * gflops / peak:>7.0f}%{row['others_busy']:>6.2f}{100 * steal:>6.1f}%",
                  flush=True)
    save_rows(RESULTS, rows, not args.no_csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
