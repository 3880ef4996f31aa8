"""GPU benchmark: cbir-engine's GPU path against torch on the same card, and the GPU Hamming
search against a torch baseline. Called by bench/gpu_check.sh on a lent H100/H200.

Networks (seeded random weights, fp16, NCHW float32 input on the GPU, output on the GPU):
  ours-triton / ours-cuda  cbir_engine.load(onnx, device="cuda", precision="fp16", gpu_backend=...)
                           (CUDA graph replay, the way it runs by default)
  torch-eager              module.half() in channels_last, cuDNN (benchmark mode), no grad
  torch-compile            torch.compile(module, mode="max-autotune") of the same module, compiled
                           in a child process under a time limit (its compile can take minutes)
Hamming (1M random 64-bit codes, 1000 queries, k = 100; results checked equal between ours):
  ours-triton / ours-cuda  cbir_engine.kernels.hamming / csrc/cuda/hamming.cu
  torch-matmul             +-1 fp16 codes: distance = (bits - q . d) / 2 by a GEMM, then topk

Times are medians of CUDA-event-timed runs after warm-up. Each result is printed as one CSV row
the moment it exists (so a killed run keeps what it measured), then a table at the end.

    python bench/bench_gpu.py --out $OUT/gpu.csv
    python bench/bench_gpu.py --dry-run          # the plan, no GPU needed
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FIELDS = [
    "date",
    "card",
    "version",
    "subject",
    "batch",
    "impl",
    "precision",
    "ms",
    "items_per_s",
    "vs_eager",
    "max_rel_err",
    "note",
]
NETWORKS = ["resnet50", "vgg16", "inception_v3", "densenet121"]
REPO = Path(__file__).resolve().parents[1]


def median_ms(fn: Callable[[], Any], *, warmup: int = 3, budget_s: float = 2.0, max_iters: int = 50) -> float:
    """Median of CUDA-event-timed calls of fn, after warm-up; stops at max_iters or budget_s."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < 5 or time.perf_counter() - start < budget_s):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


class Recorder:
    """Appends rows to a CSV as they come, keeps them for the final table."""

    def __init__(self, path: Path | None, card: str, version: str) -> None:
        self.path, self.card, self.version = path, card, version
        self.rows: list[dict[str, Any]] = []
        if path is not None and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as f:
                csv.DictWriter(f, FIELDS).writeheader()

    def add(self, **row: Any) -> dict[str, Any]:
        full = {
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "card": self.card,
            "version": self.version,
        }
        full.update(row)
        full = {k: full.get(k, "") for k in FIELDS}
        self.rows.append(full)
        if self.path is not None:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, FIELDS).writerow(full)
        print("row:", ",".join(str(full[k]) for k in FIELDS[3:]), flush=True)
        return full


def fill_ratios(rows: list[dict[str, Any]]) -> None:
    """vs_eager = torch-eager ms / this row's ms, per (subject, batch): > 1 means faster than eager."""
    eager = {
        (r["subject"], r["batch"]): r["ms"] for r in rows if r["impl"] == "torch-eager" and r["ms"] != ""
    }
    for r in rows:
        base = eager.get((r["subject"], r["batch"]))
        if base and r["ms"] not in ("", None) and r["vs_eager"] == "":
            r["vs_eager"] = round(float(base) / float(r["ms"]), 3)


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'subject':<14}{'batch':>6}  {'impl':<15}{'ms':>10}{'items/s':>12}{'vs eager':>10}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = f"{float(r['ms']):.3f}" if r["ms"] != "" else "-"
        ips = f"{float(r['items_per_s']):.0f}" if r["items_per_s"] != "" else "-"
        lines.append(
            f"{r['subject']:<14}{r['batch']!s:>6}  {r['impl']:<15}{ms:>10}{ips:>12}"
            f"{r['vs_eager']!s:>10}  {r['note']}"
        )
    return "\n".join(lines)


def rel_err(out: Any, ref: Any) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def bench_network(
    rec: Recorder,
    name: str,
    batches: list[int],
    backends: list[str],
    compile_batches: list[int],
    compile_timeout: int,
) -> None:
    import torch

    import cbir_engine
    from cbir_engine.models import build
    from cbir_engine.torch_backend import export_onnx

    module, size = build(name, seed=0)
    onnx_bytes = export_onnx(module, torch.zeros(1, 3, size, size), opset=17)
    module = module.cuda().eval()
    half = module.half().to(memory_format=torch.channels_last)
    engines: dict[str, Any] = {}
    for backend in backends:
        try:
            engines[backend] = cbir_engine.load(
                onnx_bytes, device="cuda", precision="fp16", gpu_backend=backend
            )
        except Exception as e:  # noqa: BLE001 - reported, the rest still runs
            rec.add(
                subject=name,
                batch="",
                impl=f"ours-{backend}",
                precision="fp16",
                ms="",
                items_per_s="",
                note=f"load failed: {type(e).__name__}: {e}"[:200],
            )
    for batch in batches:
        x = torch.randn(batch, 3, size, size, device="cuda")
        xh = x.half().contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            ref = half(xh).float()
            ms = median_ms(lambda xh=xh: half(xh))
        rec.add(
            subject=name,
            batch=batch,
            impl="torch-eager",
            precision="fp16",
            ms=round(ms, 4),
            items_per_s=round(batch / ms * 1e3, 1),
            max_rel_err="",
            note="cuDNN, channels_last",
        )
        for backend, engine in engines.items():
            try:
                out = engine(x)
                err = rel_err(out, ref)
                ms = median_ms(lambda e=engine, x=x: e(x))
                rec.add(
                    subject=name,
                    batch=batch,
                    impl=f"ours-{backend}",
                    precision="fp16",
                    ms=round(ms, 4),
                    items_per_s=round(batch / ms * 1e3, 1),
                    max_rel_err=f"{err:.2e}",
                    note="CUDA graph",
                )
            except Exception as e:  # noqa: BLE001
                rec.add(
                    subject=name,
                    batch=batch,
                    impl=f"ours-{backend}",
                    precision="fp16",
                    ms="",
                    items_per_s="",
                    note=f"failed: {type(e).__name__}: {e}"[:200],
                )
        if batch in compile_batches:
            ms, note = compile_in_child(name, batch, compile_timeout)
            rec.add(
                subject=name,
                batch=batch,
                impl="torch-compile",
                precision="fp16",
                ms=round(ms, 4) if ms else "",
                items_per_s=round(batch / ms * 1e3, 1) if ms else "",
                note=note,
            )
        torch.cuda.empty_cache()


COMPILE_CHILD = """
import sys, time, torch
sys.path.insert(0, {repo!r})
from cbir_engine.models import build
sys.path.insert(0, {bench!r})
from bench_gpu import median_ms
module, size = build({name!r}, seed=0)
m = module.cuda().eval().half().to(memory_format=torch.channels_last)
x = torch.randn({batch}, 3, size, size, device="cuda").half().contiguous(memory_format=torch.channels_last)
c = torch.compile(m, mode="max-autotune")
t0 = time.perf_counter()
with torch.inference_mode():
    c(x)
    compile_s = time.perf_counter() - t0
    print("RESULT", median_ms(lambda: c(x)), compile_s, flush=True)
"""


def compile_in_child(name: str, batch: int, timeout: int) -> tuple[float | None, str]:
    code = COMPILE_CHILD.format(repo=str(REPO), bench=str(REPO / "bench"), name=name, batch=batch)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"max-autotune compile did not finish in {timeout} s"
    for line in out.stdout.splitlines():
        if line.startswith("RESULT"):
            _, ms, compile_s = line.split()
            return float(ms), f"max-autotune, compiled in {float(compile_s):.0f} s"
    return (
        None,
        f"compile failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'no output'}"[:200],
    )


def bench_hamming(rec: Recorder, n: int, bits: int, nq: int, k: int) -> None:
    import numpy as np
    import torch

    from cbir_engine.index.gpu import codes_to_words

    rng = np.random.default_rng(0)
    db = rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
    q = rng.integers(0, 256, size=(nq, bits // 8), dtype=np.uint8)
    db_t = torch.from_numpy(codes_to_words(db)).cuda().T.contiguous()
    qw = torch.from_numpy(codes_to_words(q)).cuda()
    subject = f"hamming{bits}/{n // 1000}k"
    results: dict[str, Any] = {}
    impls: dict[str, Callable[[], Any]] = {}
    from cbir_engine.kernels.hamming import hamming_knn

    impls["ours-triton"] = lambda: hamming_knn(qw, db_t, bits, k)
    try:
        from cbir_engine.index.cuda_backend import find_nvcc, hamming_knn_cuda

        if find_nvcc():
            impls["ours-cuda"] = lambda: hamming_knn_cuda(qw, db_t, bits, k)
    except ImportError:
        pass
    bits_pm = torch.from_numpy(np.unpackbits(db, axis=1, bitorder="little").astype(np.float16) * 2 - 1).cuda()
    q_pm = torch.from_numpy(np.unpackbits(q, axis=1, bitorder="little").astype(np.float16) * 2 - 1).cuda()

    def torch_baseline() -> Any:
        dots = q_pm @ bits_pm.T  # exact in fp16 for bits <= 2048 (integers below 2^11)
        dist = (bits - dots) * 0.5
        d, i = torch.topk(dist, k, dim=1, largest=False, sorted=True)
        return d.int(), i

    impls["torch-matmul"] = torch_baseline
    for impl, fn in impls.items():
        try:
            results[impl] = fn()
            ms = median_ms(fn, budget_s=3.0, max_iters=20)
            rec.add(
                subject=subject,
                batch=nq,
                impl=impl,
                precision="",
                ms=round(ms, 4),
                items_per_s=round(nq / ms * 1e3, 1),
                note=f"k={k}",
            )
        except Exception as e:  # noqa: BLE001
            rec.add(
                subject=subject,
                batch=nq,
                impl=impl,
                ms="",
                items_per_s="",
                note=f"failed: {type(e).__name__}: {e}"[:200],
            )
    if "ours-triton" in results and "torch-matmul" in results:
        ours_d = results["ours-triton"][0]
        ref_d = results["torch-matmul"][0]
        same = bool(torch.equal(ours_d.cpu(), ref_d.cpu()))
        if "ours-cuda" in results:
            same = same and bool(torch.equal(results["ours-cuda"][0].cpu(), ours_d.cpu()))
        print(f"hamming distances equal across implementations: {same}", flush=True)
        for r in rec.rows:
            if r["subject"] == subject:
                r["note"] = f"{r['note']}; distances equal: {same}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--networks", default=",".join(NETWORKS))
    ap.add_argument("--batches", default="1,256")
    ap.add_argument(
        "--backends",
        default="triton,cuda,auto",
        help="ours: triton, cuda, auto (all for resnet50; triton only for the others)",
    )
    ap.add_argument(
        "--compile", default="resnet50:1", help="network:batch pairs for torch.compile, or 'none'"
    )
    ap.add_argument("--compile-timeout", type=int, default=150)
    ap.add_argument("--hamming", default="1000000,64,1000,100", help="n,bits,nq,k or 'none'")
    ap.add_argument("--out", type=Path, default=None, help="CSV to append rows to")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    args = ap.parse_args(argv)
    networks = [n for n in args.networks.split(",") if n]
    batches = [int(b) for b in args.batches.split(",") if b]
    backends = [b for b in args.backends.split(",") if b]
    bad = [b for b in backends if b not in ("triton", "cuda", "auto")]
    if bad:
        ap.error(f"unknown backends {bad}")
    compile_pairs = (
        set()
        if args.compile == "none"
        else {(p.split(":")[0], int(p.split(":")[1])) for p in args.compile.split(",") if p}
    )
    hamming = None if args.hamming == "none" else [int(v) for v in args.hamming.split(",")]
    from cbir_engine.models import SEED_NETWORKS

    unknown = [n for n in networks if n not in SEED_NETWORKS]
    if unknown:
        ap.error(f"unknown networks {unknown}; seed networks: {sorted(SEED_NETWORKS)}")
    plan = []
    if hamming:
        plan.append(f"hamming: n={hamming[0]} bits={hamming[1]} nq={hamming[2]} k={hamming[3]}")
    for n in networks:
        nb = [b for b in backends if b == "triton" or n == "resnet50"]
        plan.append(
            f"{n}: batches {batches}, torch-eager + ours-{'/'.join(nb)}"
            + "".join(f", torch-compile@{b}" for b in batches if (n, b) in compile_pairs)
        )
    print("plan:\n  " + "\n  ".join(plan), flush=True)
    if args.dry_run:
        return 0
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip()
    except OSError:
        commit = ""
    version = f"cbir-engine {commit}; torch {torch.__version__}"
    rec = Recorder(args.out, card, version)
    if hamming:  # first: quick, and its rows survive a later time-out
        try:
            bench_hamming(rec, *hamming)
        except Exception as e:  # noqa: BLE001
            rec.add(subject="hamming", batch="", impl="", ms="", items_per_s="", note=f"failed: {e}"[:200])
    for n in networks:
        nb = [b for b in backends if b == "triton" or n == "resnet50"]
        try:
            bench_network(
                rec, n, batches, nb, [b for b in batches if (n, b) in compile_pairs], args.compile_timeout
            )
        except Exception as e:  # noqa: BLE001 - the next network still runs
            rec.add(
                subject=n,
                batch="",
                impl="",
                ms="",
                items_per_s="",
                note=f"failed: {type(e).__name__}: {e}"[:200],
            )
    fill_ratios(rec.rows)
    print("\n" + table(rec.rows), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
