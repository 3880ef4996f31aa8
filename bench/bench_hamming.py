"""Hamming search: cbir_engine.HammingIndex against faiss-cpu's binary indexes.

Methods, each given the same codes, queries and thread count:
  ours-flat   HammingIndex(method="flat"): SIMD popcount scan, counting top-k
  ours-mih    HammingIndex(method="mih"): multi-index hashing, exact (checked equal to ours-flat)
  faiss-flat  faiss.IndexBinaryFlat (exact; distances checked equal to ours)
  faiss-mih   faiss.IndexBinaryMultiHash with the same substrings, nflip=2 (approximate: its
              recall@k against the exact result is reported)

Timings are interleaved (method A, B, C, D, A, B, ...); a ratio is the median over repetitions of
the per-repetition ratio, never a ratio of two separately taken times. "1 query" means queries
sent one call at a time (QPS = queries / total time); "1000 queries" is one batched call.

Datasets: "random" (uniform random bits); "fashion-cnn", real codes: sign random projections
(LSH) of the 128-d GeM descriptors that the package's own Fashion-MNIST hashing model computes
for real images (Fashion-MNIST's 68,000 database images, shifted by whole pixels to reach 1M;
queries are 2,000 held-out test images; descriptors cached under ~/.cache/cbir-engine/bench, about
3 minutes per million images to compute on 2 cores); and "lsh-clustered" (sign random projections
of clustered Gaussian data, a synthetic stand-in that reaches any size).

    python bench/bench_hamming.py                       # the full grid (about an hour on 2 cores)
    python bench/bench_hamming.py --sizes 100000 --reps 2 --no-csv   # a quick look
    python bench/bench_hamming.py --plot-csv   # redraw the plot from the CSV's latest rows

The plot shows each configuration's latest row in the CSV, so the grid can be run in parts
(for example one --datasets/--bits at a time) and still be plotted whole.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# numpy's OpenBLAS threads spin after any BLAS call (the lsh-clustered codes use one) and would
# take cores from the searches timed here; none of the timed code uses BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import faiss  # noqa: E402

from cbir_engine import _C  # noqa: E402
from cbir_engine.index import HammingIndex  # noqa: E402

RESULTS = REPO / "bench" / "results"
CSV_PATH = RESULTS / "hamming.csv"
PNG_PATH = RESULTS / "hamming_qps.png"
CSV_FIELDS = [
    "date",
    "machine",
    "version",
    "faiss_version",
    "isa",
    "threads",
    "dataset",
    "n",
    "bits",
    "k",
    "nq",
    "method",
    "qps",
    "seconds",
    "ratio_vs_faiss_flat",
    "ratio_vs_ours_flat",
    "recall",
    "others_busy",
    "note",
]
SLOW_QUERIES = 20
MIH_MEMORY_LIMIT = 3 << 30  # skip our MIH tables beyond this (they hold one code copy per substring)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs"


def version() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    import cbir_engine

    return f"cbir-engine {getattr(cbir_engine, '__version__', '?')} {commit}".strip()


FASHION_QUERIES = 2000  # held-out test images, never in the database
FASHION_SHIFTS = [(dy, dx) for r in range(6) for dy in range(-r, r + 1) for dx in range(-r, r + 1)
                  if max(abs(dy), abs(dx)) == r]  # (0, 0) first, then rings of growing shifts


def fashion_descriptors(role: str, n: int) -> np.ndarray:
    """GeM descriptors (128-d) of real images from the hashing model that ships with the package:
    Fashion-MNIST's 70,000 images, shifted by whole pixels to reach n (68,000 images per shift,
    up to 121 shifts), or for queries the 2,000 held-out test images. Cached under
    ~/.cache/cbir-engine/bench (about 3 minutes per million images on 2 cores)."""
    import onnx

    import cbir_engine
    from cbir_engine.data.datasets import fashion_mnist

    cache = Path.home() / ".cache" / "cbir-engine" / "bench" / f"fashion_gem_{role}_{n}.npy"
    if cache.exists():
        return np.load(cache).astype(np.float32)
    images, _ = fashion_mnist("all")
    pool = images[:-FASHION_QUERIES] if role == "db" else images[-FASHION_QUERIES:]
    if n > len(pool) * len(FASHION_SHIFTS):
        raise SystemExit(f"fashion-cnn: at most {len(pool) * len(FASHION_SHIFTS):,} {role} codes")
    model = onnx.load(str(Path(cbir_engine.__file__).parent / "assets" / "fashion_mnist_hash48.onnx"))
    pooled = [o for n_ in model.graph.node if n_.op_type == "Gemm" for o in n_.input[:1]][0]
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(pooled, onnx.TensorProto.FLOAT, None))
    engine = cbir_engine.load(model.SerializeToString(), threads=os.cpu_count() or 1)
    out = np.empty((n, 128), np.float32)
    done = 0
    padded = np.pad(pool, [(0, 0), (6, 6), (6, 6)])  # shifts by up to 5 pixels bring in zeros
    for dy, dx in FASHION_SHIFTS:
        shifted = padded[:, 6 - dy : 6 - dy + 28, 6 - dx : 6 - dx + 28]
        for s in range(0, len(shifted), 4096):
            if done >= n:
                break
            batch = shifted[s : min(len(shifted), s + 4096, s + n - done)]
            out[done : done + len(batch)] = engine((batch[:, None] / np.float32(255)).astype(np.float32))
            done += len(batch)
        if done >= n:
            break
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npy")
    stored = out.astype(np.float16)
    np.save(tmp, stored)
    os.replace(tmp, cache)
    return stored.astype(np.float32)  # what later runs read back, so every run makes the same codes


def make_codes(dataset: str, n: int, bits: int, seed: int, role: str = "db") -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dataset == "fashion-cnn":
        # Real codes: sign random projections (LSH) of real CNN descriptors of real images. The
        # projection and the centring are fixed per bit length, shared by database and queries.
        desc = fashion_descriptors(role, n)
        centre = fashion_descriptors("db", 68000).mean(axis=0)  # the unshifted database images
        proj = np.random.default_rng(4242 + bits).standard_normal((desc.shape[1], bits)).astype(np.float32)
        out = np.empty((n, bits // 8), dtype=np.uint8)
        for s in range(0, n, 1 << 18):
            out[s : s + (1 << 18)] = np.packbits(((desc[s : s + (1 << 18)] - centre) @ proj) > 0, axis=1,
                                                 bitorder="little")
        return out
    if dataset == "random":
        return rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
    # lsh-clustered: x = center + noise in 64-d, code = sign(x @ R). The projection is fixed per
    # bit length (seed 12345) so database and queries share it.
    proj = np.random.default_rng(12345 + bits).standard_normal((64, bits)).astype(np.float32)
    centers = np.random.default_rng(777).standard_normal((1000, 64)).astype(np.float32) * 3.0
    out = np.empty((n, bits // 8), dtype=np.uint8)
    chunk = 1 << 18
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = centers[rng.integers(0, len(centers), size=m)] + rng.standard_normal((m, 64)).astype(np.float32)
        out[s : s + m] = np.packbits((x @ proj) > 0, axis=1, bitorder="little")
    return out


def busy_fraction(seconds: float = 1.0) -> float:
    """Share of all CPU time spent busy over `seconds` (this process sleeps meanwhile)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet(max_busy: float, timeout: float) -> float:
    """Waits (up to `timeout` s) until other processes use under `max_busy` of the CPUs."""
    deadline = time.time() + timeout
    busy = busy_fraction()
    while busy > max_busy and time.time() < deadline:
        busy = busy_fraction(2.0)
    return busy


class Method:
    def __init__(self, name: str, setup, run):
        self.name, self.setup, self.run = name, setup, run


def time_call(fn, queries: np.ndarray, nq_mode: int, k: int):
    """Returns (seconds per query, result of the last call)."""
    if nq_mode == 1:
        t = time.perf_counter()
        results = [fn(queries[i : i + 1], k) for i in range(len(queries))]
        elapsed = time.perf_counter() - t
        d = np.concatenate([r[0] for r in results])
        i = np.concatenate([r[1] for r in results])
        return elapsed / len(queries), (d, i)
    t = time.perf_counter()
    result = fn(queries, k)
    return (time.perf_counter() - t) / len(queries), result


def recall_at_k(exact_ids: np.ndarray, approx_ids: np.ndarray) -> float:
    hits = 0
    for a, b in zip(exact_ids, approx_ids, strict=True):
        hits += len(set(a.tolist()) & set(b.tolist()))
    return hits / exact_ids.size


def run_config(dataset, n, bits, db, queries_by_mode, ks, args, writer, rows, meta):
    threads = args.threads
    ours_flat = HammingIndex(bits, method="flat", threads=threads)
    ours_flat.add(db)
    ours_mih = HammingIndex(bits, method="mih", threads=threads)
    ours_mih.add(db)
    m = ours_mih.mih_substrings
    width = -(-bits // m)
    # Per code and table: the code without the table's substring (codes of at most 64 bits) or
    # the whole code, and a 4-byte position; plus the bucket offsets.
    copy_bytes = -(-(bits - width) // 8) if bits <= 64 and bits - width <= 56 else 8 * (-(-bits // 64))
    mih_bytes = m * n * (copy_bytes + 4) + m * (4 << width)
    have_mih = mih_bytes <= MIH_MEMORY_LIMIT
    t = time.perf_counter()
    if have_mih:
        ours_mih._mih_tables()  # build outside the timed searches
    mih_build = time.perf_counter() - t
    wanted = set(args.methods.split(","))
    with_faiss = "faiss-flat" in wanted
    faiss_flat = faiss_mih = None
    # faiss's multi-hash: the same substring width where it divides the code, nflip=2.
    fb = width if bits % width == 0 else 16
    faiss_mih_build = 0.0
    if with_faiss:
        faiss_flat = faiss.IndexBinaryFlat(bits)
        faiss_flat.add(db)
        faiss_mih = faiss.IndexBinaryMultiHash(bits, bits // fb, fb)
        faiss_mih.nflip = 2
        t = time.perf_counter()
        faiss_mih.add(db)
        faiss_mih_build = time.perf_counter() - t
    if have_mih:
        mih_note = f"built in {mih_build:.1f}s, {mih_bytes / 2**20:.0f} MiB"
    else:
        mih_note = f"skipped: its tables would take {mih_bytes / 2**30:.1f} GiB"
    print(
        f"\n== {dataset} n={n:,} bits={bits}: "
        f"our MIH {m} substrings of ~{width} bits ({mih_note}); "
        + (
            f"faiss multi-hash {bits // fb} x {fb} bits (added in {faiss_mih_build:.1f}s)"
            if with_faiss
            else "faiss not timed"
        ),
        flush=True,
    )

    methods = [Method("ours-flat", None, ours_flat.search)]
    if have_mih:
        methods.append(Method("ours-mih", None, ours_mih.search))
    if with_faiss:
        methods += [
            Method("faiss-flat", None, faiss_flat.search),
            Method("faiss-mih", None, faiss_mih.search),
        ]

    header = f"{'nq':>5} {'k':>4} " + " ".join(f"{mm.name + ' QPS':>15}" for mm in methods)
    header += f" {'flat/faiss':>10} {'mih/ours-flat':>13} {'faiss-mih recall':>16}"
    print(header)
    # Other work on the machine skews both sides (FAISS's OpenMP threads spin-wait and suffer
    # most when a core is taken): wait for a quiet moment, and record what others were using.
    for nq_mode, queries in queries_by_mode.items():
        for k in ks:
            load = round(wait_for_quiet(args.max_busy, args.quiet_timeout), 2)
            reps = args.reps
            times = {mm.name: [] for mm in methods}
            results = {}
            for _ in range(reps):
                for mm in methods:
                    # Let the previous method's spinning worker threads (OpenMP's or ours) go
                    # idle first, so no method starts on a machine another one still occupies.
                    time.sleep(0.05)
                    # faiss's multi-hash takes up to 0.5 s a query at 10M codes: it is timed on
                    # the first SLOW_QUERIES queries (QPS is per query either way).
                    batch = queries[:SLOW_QUERIES] if mm.name == "faiss-mih" else queries
                    sec, res = time_call(mm.run, batch, nq_mode, k)
                    times[mm.name].append(sec)
                    results[mm.name] = res
            exact_d, exact_i = results["ours-flat"]
            if with_faiss:
                np.testing.assert_array_equal(exact_d, results["faiss-flat"][0])  # same distances as FAISS
            if have_mih:
                np.testing.assert_array_equal(results["ours-mih"][0], exact_d)  # MIH: identical results
                np.testing.assert_array_equal(results["ours-mih"][1], exact_i)
            recall = float("nan")
            ratio_faiss = float("nan")
            if with_faiss:
                approx_i = results["faiss-mih"][1]
                recall = recall_at_k(exact_i[: len(approx_i)], approx_i)
                ratio_faiss = statistics.median(
                    f / o for f, o in zip(times["faiss-flat"], times["ours-flat"], strict=True)
                )
            ratio_mih = (
                statistics.median(f / o for f, o in zip(times["ours-flat"], times["ours-mih"], strict=True))
                if have_mih
                else float("nan")
            )
            line = f"{nq_mode:>5} {k:>4} " + " ".join(
                f"{1 / statistics.median(times[mm.name]):>15,.0f}" for mm in methods
            )
            # "-": not timed in this run (FAISS left out, or no multi-index tables).
            line += f" {ratio_faiss:>9.1f}x" if with_faiss else f" {'-':>10}"
            line += f" {ratio_mih:>12.1f}x" if have_mih else f" {'-':>13}"
            line += f" {recall:>16.3f}" if with_faiss else f" {'-':>16}"
            line += f"   others busy {load:.0%}"
            print(line, flush=True)
            for mm in methods:
                sec = statistics.median(times[mm.name])
                row = dict(
                    meta,
                    dataset=dataset,
                    n=n,
                    bits=bits,
                    k=k,
                    nq=nq_mode,
                    method=mm.name,
                    qps=round(1 / sec, 1),
                    seconds=f"{sec:.6g}",
                    ratio_vs_faiss_flat=round(
                        statistics.median(
                            f / o for f, o in zip(times["faiss-flat"], times[mm.name], strict=True)
                        ),
                        2,
                    )
                    if with_faiss
                    else "",
                    ratio_vs_ours_flat=round(
                        statistics.median(
                            f / o for f, o in zip(times["ours-flat"], times[mm.name], strict=True)
                        ),
                        2,
                    ),
                    recall=round(recall, 4) if mm.name == "faiss-mih" else 1.0,
                    others_busy=load,
                    note=""
                    if mm.name != "faiss-mih"
                    else f"nflip=2, {bits // fb}x{fb} bits"
                    + f", timed on {min(len(queries), SLOW_QUERIES)} of the queries",
                )
                rows.append(row)
                if writer:
                    writer.writerow(row)
    del ours_flat, ours_mih, faiss_flat, faiss_mih
    gc.collect()


def latest_csv_rows(path: Path) -> list[dict]:
    """The newest row of each (dataset, n, bits, k, nq, method) in the CSV, numbers parsed."""
    latest: dict[tuple, dict] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key in ("n", "bits", "k", "nq", "threads"):
                row[key] = int(row[key])
            row["qps"] = float(row["qps"])
            config = (row["dataset"], row["n"], row["bits"], row["k"], row["nq"], row["method"])
            if config not in latest or row["date"] >= latest[config]["date"]:
                latest[config] = row
    return list(latest.values())


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits_list = sorted({r["bits"] for r in rows})
    modes = sorted({r["nq"] for r in rows})
    k_plot = 10 if any(r["k"] == 10 for r in rows) else rows[0]["k"]
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(
        len(modes), len(bits_list), figsize=(4.2 * len(bits_list), 3.6 * len(modes)), squeeze=False
    )
    # One colour and marker per method, one line style per dataset, the same in every panel.
    colours = {"ours-flat": "C0", "ours-mih": "C3", "faiss-flat": "C2", "faiss-mih": "C7"}
    markers = {"ours-flat": "o", "ours-mih": "s", "faiss-flat": "o", "faiss-mih": "s"}
    lines = {"random": "-", "lsh-clustered": ":", "fashion-cnn": "--"}
    for a, nq in enumerate(modes):
        for b, bits in enumerate(bits_list):
            ax = axes[a][b]
            for method in colours:
                for ds in datasets:
                    pts = sorted(
                        (r["n"], r["qps"])
                        for r in rows
                        if r["method"] == method
                        and r["bits"] == bits
                        and r["nq"] == nq
                        and r["k"] == k_plot
                        and r["dataset"] == ds
                    )
                    if pts:
                        ax.plot(
                            [p[0] for p in pts],
                            [p[1] for p in pts],
                            color=colours[method],
                            marker=markers[method],
                            linestyle=lines.get(ds, "--"),
                            markerfacecolor=colours[method] if ds == "random" else "none",
                            label=f"{method} ({ds})",
                        )
            ax.set_xscale("log")
            ax.set_yscale("log")
            calls = "1 query per call" if nq == 1 else f"{nq} queries per call"
            ax.set_title(
                f"{bits}-bit codes, {calls}, k={k_plot}",
                fontsize=9,
            )
            ax.set_xlabel("database size (codes)")
            ax.set_ylabel("queries per second")
            ax.grid(True, which="both", alpha=0.3)
    handles: dict = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=8)
    dates = sorted({r["date"][:16] for r in rows})
    when = dates[0] if len(dates) == 1 else f"runs {dates[0]} to {dates[-1]}"
    fig.suptitle(
        f"Hamming search QPS ({rows[0]['machine']}, {rows[0]['threads']} threads; {when})", fontsize=10
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--bits", default="64,128,256")
    parser.add_argument("--k", default="1,10,100")
    parser.add_argument("--nq", default="1,1000", help="1 = one query per call; N = one call with N queries")
    parser.add_argument("--single-queries", type=int, default=50, help="queries sent one at a time for nq=1")
    parser.add_argument("--datasets", default="random,lsh-clustered")
    parser.add_argument(
        "--methods",
        default="ours-flat,ours-mih,faiss-flat,faiss-mih",
        help="'ours-flat,ours-mih' leaves FAISS out (both of its indexes; ours-flat is always timed)",
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--max-busy",
        type=float,
        default=0.15,
        help="before each measurement wait until other processes use less than this share of the CPUs",
    )
    parser.add_argument("--quiet-timeout", type=float, default=30.0, help="wait at most this long (s)")
    parser.add_argument("--no-csv", action="store_true", help="print only; do not append to the CSV or plot")
    parser.add_argument(
        "--plot-csv", action="store_true", help="only redraw the plot from the latest CSV rows, then exit"
    )
    args = parser.parse_args()
    if args.plot_csv:
        plot(latest_csv_rows(CSV_PATH), PNG_PATH)
        return
    faiss.omp_set_num_threads(args.threads)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    ks = [int(k) for k in args.k.split(",")]
    modes = [int(q) for q in args.nq.split(",")]
    meta = dict(
        date=dt.datetime.now().isoformat(timespec="seconds"),
        machine=machine(),
        version=version(),
        faiss_version=faiss.__version__,
        isa=_C.hamming_isa(),
        threads=args.threads,
    )
    print(
        f"{meta['machine']}; {meta['version']}; faiss {meta['faiss_version']}; "
        f"scan: {meta['isa']}; "
        f"{args.threads} threads"
    )
    rows: list[dict] = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    new_file = not CSV_PATH.exists()
    f = None if args.no_csv else open(CSV_PATH, "a", newline="")
    writer = None
    if f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new_file:
            writer.writeheader()
    try:
        for dataset in args.datasets.split(","):
            for bits in bits_list:
                for n in sizes:
                    db = make_codes(dataset, n, bits, seed=n + bits)
                    qsrc = make_codes(dataset, max(max(modes), args.single_queries), bits, seed=99 + bits,
                                      role="query")
                    queries_by_mode = {
                        m: (qsrc[: args.single_queries] if m == 1 else qsrc[:m]) for m in modes
                    }
                    run_config(dataset, n, bits, db, queries_by_mode, ks, args, writer, rows, meta)
                    if f:
                        f.flush()
                    del db
                    gc.collect()
    finally:
        if f:
            f.close()
    if not args.no_csv and rows:
        plot(latest_csv_rows(CSV_PATH), PNG_PATH)


if __name__ == "__main__":
    main()
