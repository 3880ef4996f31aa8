"""Capacity planning for 1M, 100M and 1B images, from the rates measured on this project's
machines (2-core AMD EPYC nodes, 24 GiB):

- embedding throughput per node: bench/results/cpu_models.csv (bench_models.py: ms per batch at
  2 threads, our engine);
- per-shard Hamming scan rate: bench/results/hamming.csv (bench_hamming.py: flat-scan queries
  per second over n codes; codes scanned per second = n * qps);
- scatter/gather cost of a sharded search: measured on the local Ray cluster (see docs/capacity.md;
  --merge-ms).

Everything else is arithmetic, printed with the table; what is assumed rather than measured is
marked as such (GPU embedding rates: none measured here, give --gpu-images-per-s to include one).

    python bench/capacity.py                     # the table in docs/capacity.md
    python bench/capacity.py --model googlenet --bits 128 --target-ms 50 --qps 500
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (1_000_000, 100_000_000, 1_000_000_000)
GIB = 1 << 30


@dataclass(frozen=True)
class ScanRate:
    """Codes per second one node's flat scan gets through, from the largest measured database."""

    bits: int
    n: int
    single: float  # codes/s for one query at a time (latency)
    batched: float  # codes/s per query with 1000 queries per call (throughput)


def read_scan_rates(path: Path, k: int) -> dict[int, list[ScanRate]]:
    """Per code length, the flat-scan rates at each measured database size (ascending). The
    benchmark appends a row per run and records how busy the machine was with other work
    (`others_busy`, 0 to 1); of a configuration's rows the quietest is used, the latest among
    equally quiet ones."""
    best: dict[tuple[int, int, int], tuple[float, int]] = {}  # (bits, n, nq) -> (busy, row number)
    latest: dict[tuple[int, int, int], float] = {}  # (bits, n, nq) -> qps
    for i, r in enumerate(csv.DictReader(path.open())):
        if r["method"] == "ours-flat" and r["dataset"] == "random" and int(r["k"]) == k:
            key = (int(r["bits"]), int(r["n"]), int(r["nq"]))
            busy = float(r.get("others_busy") or 0.0)
            if key not in best or busy <= best[key][0]:
                best[key] = (busy, i)
                latest[key] = float(r["qps"])
    rates: dict[int, list[ScanRate]] = {}
    for bits, n in sorted({(b, n) for b, n, _ in latest}):
        one = latest.get((bits, n, 1))
        many = [q for (b, m, nq), q in latest.items() if b == bits and m == n and nq > 1]
        if one and many:
            rates.setdefault(bits, []).append(ScanRate(bits, n, n * one, n * max(many)))
    return rates


def rate_for(rates: list[ScanRate], shard_codes: float) -> ScanRate:
    """The rate measured at the largest size not above the shard's (small databases stay in cache
    and scan faster); shards larger than any measurement take the largest one's rate (the scan
    is memory-bound there: an extrapolation, said in the output)."""
    fitting = [r for r in rates if r.n <= shard_codes]
    return fitting[-1] if fitting else rates[0]


def read_embed_rate(path: Path, model: str, batch: int) -> float:
    """Images per second of our engine on one node (the threads of the measurement), from the
    latest row for the model and batch."""
    rows = [r for r in csv.DictReader(path.open()) if r["model"] == model and int(r["batch"]) == batch]
    if not rows:
        raise SystemExit(f"capacity: no measurement of {model} at batch {batch} in {path}")
    return batch / (float(rows[-1]["ours_ms"]) / 1e3)


@dataclass(frozen=True)
class Plan:
    images: int
    bits: int
    code_bytes: float  # codes + ids
    meta_bytes: float
    embed_node_days: float
    nodes_for_a_day: int
    shards: int
    shard_codes: int
    latency_ms: float
    qps_per_copy: float
    copies: int
    gpu_days: float | None
    rate_n: int  # the database size whose measured scan rate was used


def plan(images: int, rates: list[ScanRate], embed_per_s: float, *, target_ms: float, node_mem_gib: float,
         mem_fraction: float, meta_bytes_per_image: float, merge_ms: float, qps: float,
         gpu_per_s: float | None) -> Plan:
    bits = rates[0].bits
    per_code = bits / 8 + 8  # the code and its int64 id, as HammingIndex holds them
    # A shard is as large as the latency budget allows (one query scans all of it) and as memory
    # allows; the scan rate depends on the shard's size, so settle the two together.
    by_memory = node_mem_gib * GIB * mem_fraction / per_code
    shard_codes = float(min(images, by_memory))
    for _ in range(8):
        rate = rate_for(rates, shard_codes)
        by_latency = rate.single * max(target_ms - merge_ms, 1e-3) / 1e3
        shard_codes = min(float(images), by_memory, by_latency)
    shards = max(1, math.ceil(images / shard_codes))
    per_shard = math.ceil(images / shards)
    rate = rate_for(rates, per_shard)
    latency = per_shard / rate.single * 1e3 + (merge_ms if shards > 1 else 0.0)
    # Throughput of one copy of the shard set: every query visits every shard, which run in
    # parallel on their own nodes; queries batched 1000 at a time scan at the batched rate.
    qps_copy = rate.batched / per_shard
    return Plan(images, bits, images * per_code, images * meta_bytes_per_image,
                images / embed_per_s / 86400, math.ceil(images / embed_per_s / 86400), shards, per_shard,
                latency, qps_copy, max(1, math.ceil(qps / qps_copy)),
                images / gpu_per_s / 86400 if gpu_per_s else None, rate.n)


def measure_merge(n: int = 1_000_000, shards: int = 4, queries: int = 200) -> float:
    """Median extra milliseconds of one single-query search on a ShardedHammingIndex (a local
    2-node Ray cluster) over the same search on one HammingIndex in this process."""
    import time

    import numpy as np
    import ray

    from cbir_engine.distributed import LocalRayCluster, ShardedHammingIndex
    from cbir_engine.index import HammingIndex

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    ids = np.arange(n, dtype=np.int64)
    one = HammingIndex(64, method="flat")
    one.add(codes, ids)
    qs = rng.integers(0, 256, (queries, 8), dtype=np.uint8)
    with LocalRayCluster(nodes=2, cpus_per_node=1) as cluster:
        cluster.connect()
        try:
            sharded = ShardedHammingIndex(64, shards, cpus_per_shard=0.25)
            sharded.add(codes, ids)
            sharded.search(qs[:1], 10)
            one.search(qs[:1], 10)
            extra = []
            for q in qs:  # interleaved, so both see the same machine load
                t0 = time.perf_counter()
                one.search(q[None], 10)
                t1 = time.perf_counter()
                sharded.search(q[None], 10)
                t2 = time.perf_counter()
                extra.append((t2 - t1) - (t1 - t0))
            sharded.close()
        finally:
            ray.shutdown()
    ms = float(np.median(extra)) * 1e3
    print(f"measured: {shards} shards over {human_count(n)} 64-bit codes on a local 2-node Ray cluster: "
          f"{ms:.2f} ms more per single-query search than one in-process index (median of {queries})")
    return ms


def human_bytes(b: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b / 1e3:.0f} kB"


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            v = n / size
            return f"{v:.0f}{unit}" if v >= 10 or v == int(v) else f"{v:.1f}{unit}"
    return f"{n:.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hamming-csv", type=Path, default=RESULTS / "hamming.csv")
    ap.add_argument("--models-csv", type=Path, default=RESULTS / "cpu_models.csv")
    ap.add_argument("--model", default="resnet50", help="embedding model measured in cpu_models.csv")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--embed-per-s", type=float, default=None,
                    help="a measured images/s per node to use instead of the model's row in the CSV")
    ap.add_argument("--bits", type=int, nargs="+", default=[64, 256])
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--target-ms", type=float, default=100.0, help="search latency budget per query")
    ap.add_argument("--qps", type=float, default=100.0, help="queries per second to serve")
    ap.add_argument("--node-mem-gib", type=float, default=24.0)
    ap.add_argument("--mem-fraction", type=float, default=0.5, help="share of a node's memory for codes")
    ap.add_argument("--meta-bytes", type=float, default=111.0,
                    help="metadata bytes per image (SQLite row: path, size, mtime, label; measured on "
                         "the 20k-image Fashion-MNIST index)")
    ap.add_argument("--merge-ms", type=float, default=7.0,
                    help="scatter/gather cost of one sharded search (measured on the local Ray cluster)")
    ap.add_argument("--measure-merge", action="store_true",
                    help="measure the scatter/gather cost on a local Ray cluster instead of --merge-ms")
    ap.add_argument("--gpu-images-per-s", type=float, default=None,
                    help="an assumed GPU embedding rate per node (none is measured in this project)")
    args = ap.parse_args(argv)

    for p in (args.hamming_csv, args.models_csv):
        if not p.is_file():
            print(f"capacity: {p} is missing (bench/bench_hamming.py and bench/bench_models.py write it)",
                  file=sys.stderr)
            return 1
    if args.measure_merge:
        args.merge_ms = measure_merge()
    rates = read_scan_rates(args.hamming_csv, args.k)
    embed = args.embed_per_s or read_embed_rate(args.models_csv, args.model, args.batch)
    what = f"{args.model} batch {args.batch}" if not args.embed_per_s else "the given model"
    print(f"measured: {what}: {embed:.1f} images/s per 2-core node (CPU, our engine)")
    for bits in args.bits:
        if bits not in rates:
            print(f"capacity: no flat-scan measurement of {bits}-bit codes", file=sys.stderr)
            return 1
        for r in rates[bits]:
            print(f"measured: {bits}-bit flat scan over {human_count(r.n)} codes, k={args.k}: "
                  f"{r.single / 1e9:.2f} G codes/s one query at a time, {r.batched / 1e9:.2f} G codes/s "
                  "per query in batches of 1000 (2 threads)")
    print(f"assumed: latency budget {args.target_ms:g} ms, {args.qps:g} queries/s, codes in at most "
          f"{args.mem_fraction:.0%} of {args.node_mem_gib:g} GiB per shard node, {args.meta_bytes:g} "
          f"metadata bytes per image, {args.merge_ms:g} ms scatter/gather; shards larger than the "
          "largest measured database scan at its rate"
          + (f"; GPU {args.gpu_images_per_s:g} images/s per node" if args.gpu_images_per_s else ""))
    print()
    gpu_col = args.gpu_images_per_s is not None
    head = ["images", "bits", "codes + ids", "metadata", f"embed ({args.model}, CPU node-days)",
            "nodes to embed in a day", "shards x codes", "search latency", "QPS per shard set (batched)",
            f"shard sets for {args.qps:g} QPS"]
    if gpu_col:
        head.insert(6, "embed (GPU node-days, assumed rate)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for images in SIZES:
        for bits in args.bits:
            p = plan(images, rates[bits], embed, target_ms=args.target_ms, node_mem_gib=args.node_mem_gib,
                     mem_fraction=args.mem_fraction, meta_bytes_per_image=args.meta_bytes,
                     merge_ms=args.merge_ms, qps=args.qps, gpu_per_s=args.gpu_images_per_s)
            row = [human_count(images), str(bits), human_bytes(p.code_bytes), human_bytes(p.meta_bytes),
                   f"{p.embed_node_days:,.1f}", f"{p.nodes_for_a_day:,}",
                   f"{p.shards} x {human_count(p.shard_codes)}",
                   f"{p.latency_ms:.1f} ms ({human_count(p.rate_n)} rate)",
                   f"{p.qps_per_copy:,.1f}", f"{p.copies:,}"]
            if gpu_col:
                row.insert(6, f"{p.gpu_days:,.2f}" if p.gpu_days is not None else "-")
            print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
