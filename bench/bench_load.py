"""Load time: importing an ONNX file (parse, optimise, prepack weights for batch 1) against
loading the saved plan of the same model (memory map, checksum, plan for batch 1), interleaved.

    python bench/bench_load.py [--models resnet50] [--rounds 7]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import append_rows, cpu_name, git_rev, onnx_file  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "load.csv"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)

    import cbir_engine

    rows = []
    print(f"{'model':<14}{'ONNX import s':>15}{'plan load s':>13}{'speed-up':>10}")
    for name in args.models.split(","):
        path, size = onnx_file(name)
        shape = {"input": (1, 3, size, size)}
        with tempfile.TemporaryDirectory() as tmp:
            plan_path = Path(tmp) / f"{name}.plan"
            cbir_engine.load(path).save(plan_path, shape)

            def from_onnx(path=path, shape=shape):
                cbir_engine.load(path).plan_for(shape)

            def from_plan(plan_path=plan_path, shape=shape):
                cbir_engine.load(plan_path).plan_for(shape)

            t_onnx, t_plan, ratios = [], [], []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                from_onnx()
                t1 = time.perf_counter()
                from_plan()
                t2 = time.perf_counter()
                t_onnx.append(t1 - t0)
                t_plan.append(t2 - t1)
                ratios.append((t1 - t0) / (t2 - t1))
        row = {
            "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": cpu_name(),
            "version": f"cbir-engine {cbir_engine.__version__} {git_rev()}", "model": name,
            "onnx_import_s": round(statistics.median(t_onnx), 4),
            "plan_load_s": round(statistics.median(t_plan), 4),
            "speedup": round(statistics.median(ratios), 2),
        }
        rows.append(row)
        print(f"{name:<14}{row['onnx_import_s']:>15.3f}{row['plan_load_s']:>13.3f}{row['speedup']:>9.1f}x")
    if not args.no_csv and rows:
        append_rows(RESULTS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
