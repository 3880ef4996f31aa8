"""The embedded demo (`make demo`): image retrieval over the 10,000 Fashion-MNIST test images with
the 48-bit hashing model that ships in cbir_engine/assets, end to end through the product path.

  1. writes the test images as PNG files into class folders (the data comes from the Debian
     package dataset-fashion-mnist; nothing is downloaded),
  2. indexes the folder as `cbir index` does (decode, batch through the engine, pack 48-bit codes,
     Hamming index file + SQLite metadata),
  3. evaluates it as `cbir eval` does (1,000 leave-one-out queries, 100 per class) and prints mAP,
  4. searches with a few query images as `cbir search` does and writes the HTML result page.

    python -m cbir_engine.demo [--out build/demo] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ASSET = Path(__file__).resolve().parent / "assets" / "fashion_mnist_hash48.onnx"
QUERY_CLASSES = ("Sneaker", "Bag", "Trouser", "Shirt")  # a few easy and one hard class


def class_folder(name: str) -> str:
    return name.replace("/", "-")  # "T-shirt/top" -> "T-shirt-top"


def write_pngs(images: np.ndarray, labels: np.ndarray, root: Path, names: tuple[str, ...]) -> list[Path]:
    """One PNG per image under root/<class>/<position>.png (lossless: the engine sees the same
    pixels as the raw arrays)."""
    from PIL import Image

    paths = []
    for c in np.unique(labels):
        (root / class_folder(names[c])).mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        p = root / class_folder(names[y]) / f"{i:05d}.png"
        Image.fromarray(img).save(p, optimize=False, compress_level=1)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/demo"), help="working folder (replaced)")
    parser.add_argument("--threads", type=int, default=None, help="engine threads (default: all CPUs)")
    parser.add_argument("--queries", type=int, default=1000, help="evaluation queries (100 per class)")
    parser.add_argument("-k", type=int, default=8, help="results shown per example query")
    args = parser.parse_args(argv)

    from cbir_engine.data import FASHION_MNIST_CLASSES, DatasetUnavailableError, fashion_mnist
    from cbir_engine.serve import report
    from cbir_engine.store import Collection

    t_start = time.perf_counter()
    try:
        x, y = fashion_mnist("test")
    except DatasetUnavailableError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    if not ASSET.is_file():
        print(f"demo: the model {ASSET} is missing (it is committed; train it again with "
              "`python bench/train_demo_model.py`)", file=sys.stderr)
        return 1
    print(f"model: {ASSET.name} ({ASSET.stat().st_size / 1024:.0f} KiB of ONNX): small CNN trunk -> GeM -> "
          "48-bit sign codes, trained with the triplet loss on Fashion-MNIST's training part")

    if args.out.exists():
        shutil.rmtree(args.out)
    image_dir = args.out / "fashion-mnist-test"
    t0 = time.perf_counter()
    write_pngs(x, y, image_dir, FASHION_MNIST_CLASSES)
    t1 = time.perf_counter()
    print(f"wrote the {len(x):,} test images as PNG files under {image_dir}/<class>/ in {t1 - t0:.1f} s")

    index_path = args.out / "fashion.index"
    with Collection.create(index_path, ASSET, threads=args.threads) as coll:
        bar = None
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(x), desc="indexing", unit="img", file=sys.stderr, disable=None, leave=False)
        except ImportError:
            pass
        rep = coll.update(image_dir, batch_size=256, progress=bar.update if bar is not None else None)
        if bar is not None:
            bar.close()
        rate = rep.added / rep.seconds
        print(f"indexed {rep.added:,} images in {rep.seconds:.1f} s ({rate:,.0f} images/s: "
              f"decode, engine, pack codes, write {index_path}); {len(rep.unreadable)} unreadable")

        t2 = time.perf_counter()
        res = coll.evaluate(args.queries, seed=0, ks=(10, 100))
        print(f"\nretrieval quality: {res.queries:,} queries (100 per class), each ranking the other "
              f"{res.database - 1:,} test images by Hamming distance; relevant = same class")
        print(f"  mAP@all {res.map_all:.4f}   precision@10 {res.precision_at[10]:.4f}   "
              f"precision@100 {res.precision_at[100]:.4f}   ({time.perf_counter() - t2:.1f} s)")

        rows = coll.rows()
        by_label: dict[str, list[int]] = {}
        for r in rows.values():
            by_label.setdefault(r.label or "", []).append(r.id)
        results, query_labels = [], []
        t3 = time.perf_counter()
        for name in QUERY_CLASSES:
            label = class_folder(name)
            query = rows[by_label[label][0]]
            # The query is in the index too: leave it out and number the rest from 1.
            others = [h for h in coll.search_image(query.path, args.k + 1) if h.id != query.id][: args.k]
            hits = [dataclasses.replace(h, rank=r) for r, h in enumerate(others, 1)]
            same = sum(h.label == label for h in hits)
            results.append(report.QueryResult(f"{label}: {os.path.basename(query.path)}", query.path, hits,
                                              f"{same} of {len(hits)} results are {label}"))
            query_labels.append(label)
            print(f"\nquery {query.path} ({label}): {same}/{len(hits)} of the top {len(hits)} are {label}")
            for h in hits:
                print(f"  #{h.rank:<2} distance {h.distance:>2.0f}  {h.label:<12} {os.path.basename(h.path)}")
        search_ms = (time.perf_counter() - t3) / len(QUERY_CLASSES) * 1e3

    page = args.out / "results.html"
    report.write(page, results, title="cbir-engine demo: Fashion-MNIST, 48-bit codes",
                 summary=f"{len(x):,} images indexed; mAP@all {res.map_all:.4f} "
                         f"over {res.queries:,} queries; "
                         "green = same class as the query, red = another class",
                 query_labels=query_labels)
    print(f"\none query from its file to ranked results: {search_ms:.1f} ms (decode, engine, Hamming search)")
    print(f"wrote {page} (open it in a browser)")
    print(f"demo took {time.perf_counter() - t_start:.1f} s. "
          f"Next: `.venv/bin/cbir serve --index {index_path}` "
          "and open http://127.0.0.1:8000/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
