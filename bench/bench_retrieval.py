"""Retrieval quality on data that ships offline; writes bench/results/retrieval.md (+ PNG curves).

Fashion-MNIST (fixed split: 1,000 queries, 100 per class; the other 69,000 images are the
database; 20,000 database images, 2,000 per class, are the training set):
  - a small CNN trunk is trained by classification first (the float-descriptor baseline and the
    features for LSH / ITQ), then each hashing method is trained from that trunk;
  - every model runs in the engine (codes from its Sign output), codes are searched with
    HammingIndex over the whole database, and ties are ranked by database id.
Photos (scikit-image's natural photos; queries are transformed copies): rank-1 rate of the
original per transform type, with a ResNet-18 trunk (random weights: no ImageNet weights ship
offline) and several heads, plus regional VLAD over selective-search proposals.

    python bench/bench_retrieval.py [--part fashion|photos|all] [--n-train 20000] [--quick]

Each part stores its numbers in bench/results/retrieval_<part>.json; the markdown is rendered
from whichever parts exist.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
BITS = (12, 24, 32, 48)
METHOD_NAMES = {"cnnh": "CNNH", "cnnh+": "CNNH+", "triplet": "Triplet", "contrastive": "Contrastive"}
SIGN_GUARD = 1e-5


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- Fashion-MNIST
def run_fashion(args: argparse.Namespace) -> dict:
    import torch

    import cbir_engine
    from cbir_engine.data import fashion_mnist_split, to_float
    from cbir_engine.index import HammingIndex
    from cbir_engine.retrieval import heads as H
    from cbir_engine.retrieval.baselines import ITQ, LSH, pack_signs
    from cbir_engine.retrieval.evaluate import engine_embed
    from cbir_engine.retrieval.metrics import evaluate_float, evaluate_hamming, save_pr_plot
    from cbir_engine.train import train_classifier, train_hashing

    torch.set_num_threads(args.threads)
    split = fashion_mnist_split(1000, args.n_train, seed=0)
    qy, dy = split.query_y, split.db_y
    out: dict = {
        "n_query": len(qy),
        "n_db": len(dy),
        "n_train": int(len(split.train_idx)),
        "epochs": args.epochs,
        "pretrain_epochs": args.pretrain_epochs,
        "rows": {},
        "extra": {},
        "train_seconds": {},
        "sign_mismatch": {},
    }
    ks, ns = (100, 1000), (100, 1000)

    def hamming_row(q_vals: np.ndarray, db_vals: np.ndarray) -> tuple[dict, object]:
        qc, bits = pack_signs(q_vals)
        dc, _ = pack_signs(db_vals)
        index = HammingIndex(bits, threads=args.threads)
        index.add(dc)
        res = evaluate_hamming(index, qc, qy, dy, ks=ks, ns=ns)
        return {
            "map_all": res.map_all,
            "map_1000": res.map_at[1000],
            "p_100": res.precision_at.get(100),
            "p_r2": res.precision_r2,
            "retrieved_r2": res.retrieved_r2,
            "recall_1000": res.recall_at[1000],
        }, res.pr

    def float_row(q: np.ndarray, db: np.ndarray) -> tuple[dict, object]:
        res = evaluate_float(q, db, qy, dy, metric="cosine", ks=ks, ns=ns)
        return {
            "map_all": res.map_all,
            "map_1000": res.map_at[1000],
            "recall_1000": res.recall_at[1000],
        }, res.pr

    def engine_for(module: torch.nn.Module) -> cbir_engine.Engine:
        return cbir_engine.from_torch(module.eval(), torch.zeros(1, 1, 28, 28), threads=args.threads)

    pr48: dict[str, tuple] = {}
    pr_float: dict[str, tuple] = {}

    _log(f"classifier trunk: {args.pretrain_epochs} epochs on {len(split.train_idx)} images")
    t0 = time.perf_counter()
    clf, _ = train_classifier(
        split.train_x, split.train_y, epochs=args.pretrain_epochs, lr=3e-3, progress=args.progress
    )
    out["train_seconds"]["classifier"] = time.perf_counter() - t0
    gem_model = H.Descriptor(clf.trunk, clf.pool, torch.nn.Flatten()).eval()
    gem_engine = engine_for(gem_model)
    q_gem, db_gem = engine_embed(gem_engine, split.query_x), engine_embed(gem_engine, split.db_x)
    tr_gem = db_gem[split.train_idx]
    row, pr_float["GeM (128-d)"] = float_row(q_gem, db_gem)
    out["rows"]["GeM float (128-d)"] = {"float": row}
    _log(f"GeM float mAP@all {row['map_all']:.4f}")

    # PCA-whitening learned on the training part.
    pcaw = H.PCAWhitening(128, 64).fit(tr_gem)
    with torch.no_grad():
        w = lambda a: pcaw(torch.from_numpy(a)).numpy()  # noqa: E731
        row, pr_float["GeM + PCA-whitening (64-d)"] = float_row(w(q_gem), w(db_gem))
    out["rows"]["GeM + PCA-whitening (64-d)"] = {"float": row}

    # NetVLAD on the same trunk: k-means codebook from training local descriptors, no training.
    rng = np.random.default_rng(0)
    sample = split.train_x[rng.choice(len(split.train_idx), 600, replace=False)]
    with torch.no_grad():
        fm = clf.trunk.eval()(torch.from_numpy(to_float(sample)))
    local = fm.permute(0, 2, 3, 1).reshape(-1, fm.shape[1]).numpy()
    nv = H.NetVLAD(16, 128, alpha=30.0).init_from_kmeans(local, seed=0)
    nv_engine = engine_for(H.Descriptor(clf.trunk, nv))
    out["extra"]["netvlad_fused"] = "NetVLAD" in [n.op for n in nv_engine.graph.nodes]
    row, pr_float["NetVLAD K=16 (2048-d)"] = float_row(
        engine_embed(nv_engine, split.query_x), engine_embed(nv_engine, split.db_x)
    )
    out["rows"]["NetVLAD K=16 float (2048-d)"] = {"float": row}
    _log(f"NetVLAD float mAP@all {row['map_all']:.4f}")

    # Classic baselines on the GeM features and on pixels.
    px_q = split.query_x.reshape(len(qy), -1).astype(np.float64) / 255
    px_db = split.db_x.reshape(len(dy), -1).astype(np.float64) / 255
    px_tr = px_db[split.train_idx]
    for name, feats in (("GeM features", (q_gem, db_gem, tr_gem)), ("pixels", (px_q, px_db, px_tr))):
        for cls in (LSH, ITQ):
            label = f"{cls.__name__} on {name}"
            out["rows"][label] = {}
            for bits in BITS:
                h = cls(bits, seed=0).fit(feats[2])
                row, pr = hamming_row(h.project(feats[0]), h.project(feats[1]))
                out["rows"][label][str(bits)] = row
                if bits == 48 and name == "GeM features":
                    pr48[label] = pr
            _log(f"{label}: " + ", ".join(f"{b}: {out['rows'][label][str(b)]['map_all']:.4f}" for b in BITS))

    # Learned hashing, each from the classification-trained trunk.
    for method in args.methods:
        label = METHOD_NAMES[method]
        out["rows"][label] = {}
        for bits in BITS:
            t0 = time.perf_counter()
            net, _ = train_hashing(
                method,
                split.train_x,
                split.train_y,
                bits,
                epochs=args.epochs,
                lr=args.lr,
                trunk=copy.deepcopy(clf.trunk),
                seed=0,
                progress=args.progress,
            )
            secs = time.perf_counter() - t0
            out["train_seconds"][f"{label} {bits}"] = secs
            engine = engine_for(net.export_module(binarize=True))
            q_codes, db_codes = engine_embed(engine, split.query_x), engine_embed(engine, split.db_x)
            # The engine's codes against torch's pre-sign values.
            with torch.no_grad():
                pre = net.export_module(binarize=False)(torch.from_numpy(to_float(split.query_x))).numpy()
            bad = (q_codes != np.sign(pre)) & (np.abs(pre) >= SIGN_GUARD)
            out["sign_mismatch"][f"{label} {bits}"] = int(bad.sum())
            row, pr = hamming_row(q_codes, db_codes)
            out["rows"][label][str(bits)] = row
            if bits == 48:
                pr48[label] = pr
            _log(f"{label} {bits} bits: mAP@all {row['map_all']:.4f} (trained {secs:.0f} s)")

    curves = {k: (np.asarray(p), np.asarray(r)) for k, (p, r) in pr48.items()}
    save_pr_plot(
        curves,
        str(RESULTS / "retrieval_pr_fashion48.png"),
        "Fashion-MNIST, 48-bit codes (PR over Hamming radius)",
    )
    save_pr_plot(
        {k: (np.asarray(p), np.asarray(r)) for k, (p, r) in pr_float.items()},
        str(RESULTS / "retrieval_pr_fashion_float.png"),
        "Fashion-MNIST, float descriptors (cosine)",
    )
    return out


# ---------------------------------------------------------------- photos
def run_photos(args: argparse.Namespace) -> dict:
    import torch

    import cbir_engine
    from cbir_engine.data import photo_set
    from cbir_engine.data.photos import resize_max_side
    from cbir_engine.models.extractors import trunk
    from cbir_engine.retrieval import heads as H
    from cbir_engine.retrieval.evaluate import export_any_size
    from cbir_engine.retrieval.regions import RegionalVLAD, standardize

    torch.set_num_threads(args.threads)
    ps = photo_set(max_side=256)
    t, _, channels = trunk("resnet18", seed=0)

    def engine_for(module: torch.nn.Module) -> cbir_engine.Engine:
        return cbir_engine.load(
            export_any_size(module.eval(), torch.zeros(1, 3, 224, 224)), threads=args.threads
        )

    fmap_engine = engine_for(t)
    heads = {
        "MAC": H.MAC(),
        "SPoC": H.SPoC(),
        "GeM": H.GeM(),
        "R-MAC (3 levels)": H.RMAC(),
    }
    engines = {name: engine_for(H.Descriptor(t, h)) for name, h in heads.items()}

    def single(e: cbir_engine.Engine, scales: tuple[int, ...]):  # type: ignore[no-untyped-def]
        def describe(img: np.ndarray) -> np.ndarray:
            v = sum(e(standardize(resize_max_side(img, s)))[0] for s in scales)
            return v / max(float(np.linalg.norm(v)), 1e-12)

        return describe

    methods = {name: single(e, (256,)) for name, e in engines.items()}
    methods["GeM, 3 scales (192/256/320)"] = single(engines["GeM"], (192, 256, 320))
    # NetVLAD with a codebook from the database's own local descriptors (no training).
    local = np.concatenate(
        [
            fmap_engine(standardize(resize_max_side(img, 256)))[0].reshape(channels, -1).T
            for img in ps.database
        ]
    )
    nv = H.NetVLAD(16, channels, alpha=30.0).init_from_kmeans(local, seed=0)
    methods["NetVLAD K=16"] = single(engine_for(H.Descriptor(t, nv)), (256,))
    # Regional VLAD over selective-search proposals (RoI max-pooled from the same feature map).
    rv = RegionalVLAD(clusters=16, max_regions=args.regions, stride=32)

    def fmap(img: np.ndarray) -> np.ndarray:
        return fmap_engine(standardize(img))[0]

    rv.fit([resize_max_side(img, 256) for img in ps.database], fmap)
    methods[f"Regional VLAD (selective search, <= {args.regions} regions, K=16)"] = lambda img: rv.describe(
        resize_max_side(img, 256), fmap
    )

    out: dict = {
        "n_db": len(ps.database),
        "n_queries": len(ps.queries),
        "rows": {},
        "counts": {},
        "seconds": {},
    }
    for name, describe in methods.items():
        t0 = time.perf_counter()
        db = np.stack([describe(img) for img in ps.database])
        hits: dict[str, list[int]] = defaultdict(list)
        for q in ps.queries:
            best = int(np.argmax(db @ describe(q.image)))
            hits[f"{q.kind}/{q.strength}"].append(int(best == q.target))
        out["rows"][name] = {k: float(np.mean(v)) for k, v in hits.items()}
        out["counts"] = {k: len(v) for k, v in hits.items()}
        out["seconds"][name] = time.perf_counter() - t0
        _log(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in out["rows"][name].items()))
    return out


# ---------------------------------------------------------------- fused heads
def run_fused(args: argparse.Namespace) -> dict:
    """Head-only models on random feature maps: the fused kernel against the same graph with
    fusion off (every other pass off too, which changes nothing else in a head), interleaved."""
    import torch

    import cbir_engine
    from cbir_engine.retrieval import heads as H
    from cbir_engine.torch_backend import export_onnx

    rng = np.random.default_rng(0)
    rows = []
    for n, d, hw, k in ((1, 512, 14, 64), (8, 512, 7, 64), (8, 128, 7, 16), (64, 128, 7, 16)):
        x = np.maximum(rng.standard_normal((n, d, hw, hw)), 0).astype(np.float32)
        local = x.transpose(0, 2, 3, 1).reshape(-1, d)[:2000]
        for name, head in (
            ("NetVLAD", H.NetVLAD(k, d, alpha=10.0).init_from_kmeans(local)),
            ("GeM", H.GeM()),
        ):
            onnx_bytes = export_onnx(head.eval(), torch.from_numpy(x[:1]))
            engines = {
                f: cbir_engine.load(onnx_bytes, threads=args.threads, optimize=f) for f in (True, False)
            }
            times: dict[bool, list[float]] = {True: [], False: []}
            for e in engines.values():
                e(x)
            for _ in range(args.rounds):
                for f, e in engines.items():
                    t0 = time.perf_counter()
                    e(x)
                    times[f].append(time.perf_counter() - t0)
            label = f"{name} [{n}, {d}, {hw}, {hw}]" + (f", K={k}" if name == "NetVLAD" else "")
            rows.append(
                {
                    "head": label,
                    "fused_ms": 1e3 * float(np.median(times[True])),
                    "unfused_ms": 1e3 * float(np.median(times[False])),
                }
            )
            _log(f"{label}: fused {rows[-1]['fused_ms']:.3f} ms, unfused {rows[-1]['unfused_ms']:.3f} ms")
    return {"rows": rows, "threads": args.threads, "rounds": args.rounds}


# ---------------------------------------------------------------- report
def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def render(fashion: dict | None, photos: dict | None, meta: dict, fused: dict | None = None) -> str:
    lines = [
        "# Retrieval quality",
        "",
        "Produced by `python bench/bench_retrieval.py` "
        f"({meta.get('date', '')}, {meta.get('cpu', '')}; the quality parts ran with 2 threads). "
        "Every model runs in the engine; hash codes are searched with `HammingIndex`.",
        "",
    ]
    if fashion:
        f = fashion
        lines += [
            "## Fashion-MNIST: mAP over the whole ranking",
            "",
            f"Fixed split: {f['n_query']:,} queries (100 per class), the other {f['n_db']:,} images are "
            f"the database; training uses {f['n_train']:,} database images (balanced by class). A small "
            f"CNN trunk (conv32-pool-conv64-pool-conv128, GeM) is first trained by classification for "
            f"{f['pretrain_epochs']} epochs; each hashing method then trains {f['epochs']} epochs from "
            "that trunk. LSH and ITQ run on the same trunk's GeM features (and on raw pixels). Ties in "
            "Hamming distance are ranked by database id (smaller first). Relevant = same class.",
            "",
            "| method | " + " | ".join(f"{b} bits" for b in BITS) + " |",
            "|---|" + "---:|" * len(BITS),
        ]
        for name, row in f["rows"].items():
            if "float" in row:
                continue
            lines.append(f"| {name} | " + " | ".join(f"{row[str(b)]['map_all']:.4f}" for b in BITS) + " |")
        lines += [
            "",
            "Float descriptors (cosine similarity) on the same split. The PCA-whitening is fitted "
            "on the training part's GeM features (64 of 128 components, unsupervised); it lowers "
            "class-level mAP here (our guess: equal weight for low-variance directions; not measured "
            "further):",
            "",
            "| descriptor | mAP@all | mAP@1000 | recall@1000 |",
            "|---|---:|---:|---:|",
        ]
        for name, row in f["rows"].items():
            if "float" in row:
                r = row["float"]
                lines.append(
                    f"| {name} | {r['map_all']:.4f} | {r['map_1000']:.4f} | {r['recall_1000']:.4f} |"
                )
        lines += [
            "",
            "48-bit codes in detail (mAP@1000: AP over the top 1,000 normalised by the relevant "
            "items retrieved there; P(r<=2): precision of the items within Hamming radius 2, 0 for a "
            "query that retrieves nothing; 'found' is the share of queries that retrieve something "
            "within radius 2):",
            "",
            "| method | mAP@all | mAP@1000 | P@100 | P(r<=2) | found r<=2 | recall@1000 |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, row in f["rows"].items():
            if "48" in row:
                r = row["48"]
                lines.append(
                    f"| {name} | {r['map_all']:.4f} | {r['map_1000']:.4f} | {_fmt(r.get('p_100'))} | "
                    f"{r['p_r2']:.4f} | {r['retrieved_r2']:.3f} | {r['recall_1000']:.4f} |"
                )
        mism = f.get("sign_mismatch", {})
        lines += [
            "",
            f"Engine codes against torch: {sum(mism.values())} bits differ among "
            f"{len(mism)} models x {f['n_query']:,} queries where |pre-sign| >= {SIGN_GUARD:g}.",
            f"NetVLAD ran as one fused kernel: {f['extra'].get('netvlad_fused')}.",
            "",
            "Training time (s, this machine, shared): "
            + ", ".join(f"{k} {v:.0f}" for k, v in f["train_seconds"].items()),
            "",
            "![PR 48 bits](retrieval_pr_fashion48.png) ![PR float](retrieval_pr_fashion_float.png)",
            "",
        ]
    if photos:
        p = photos
        kinds = list(next(iter(p["rows"].values())).keys())
        lines += [
            "## Photos: rank-1 rate of the original under transforms",
            "",
            f"Database: {p['n_db']} natural photos from scikit-image (longer side 256 px); "
            f"{p['n_queries']} queries, transformed copies (mild / strong: scale x0.75,1.25 / "
            "x0.5,1.6; rotation +-5 / +-25 degrees; crop keeping 90% / 60% of each side; "
            "brightness x0.8,1.2 / x0.5,1.6). Every image is standardised (per-image mean and std) "
            "and resized to a longer side of 256 px before the CNN, so the scale transform tests "
            "resampling, not the network's scale invariance. Trunk: ResNet-18 with seeded "
            "random weights (no ImageNet weights ship offline). Queries per column: "
            + ", ".join(f"{k} {n}" for k, n in p["counts"].items())
            + ".",
            "",
            "| descriptor | " + " | ".join(kinds) + " |",
            "|---|" + "---:|" * len(kinds),
        ]
        for name, row in p["rows"].items():
            lines.append(f"| {name} | " + " | ".join(f"{row[k]:.2f}" for k in kinds) + " |")
        lines.append("")
    if fused:
        lines += [
            "## Fused heads: one kernel against the exported subgraph",
            "",
            f"Median of {fused.get('rounds', 40)} interleaved runs, {fused['threads']} thread(s), head only "
            "(input: a feature map). The outputs agree to 1e-5 relative (tests/retrieval/test_fused.py).",
            "",
            "| head, input | fused (ms) | unfused graph (ms) |",
            "|---|---:|---:|",
        ]
        for r in fused["rows"]:
            lines.append(f"| {r['head']} | {r['fused_ms']:.3f} | {r['unfused_ms']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("fashion", "photos", "fused", "all", "render"), default="all")
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--methods", default="cnnh,cnnh+,triplet,contrastive")
    ap.add_argument("--regions", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=200, help="timing rounds of the fused part")
    ap.add_argument("--quick", action="store_true", help="tiny settings to check the script runs")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    args.methods = args.methods.split(",")
    if args.quick:
        args.n_train, args.pretrain_epochs, args.epochs = 1000, 1, 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    for part, fn in (("fashion", run_fashion), ("photos", run_photos), ("fused", run_fused)):
        if args.part in (part, "all"):
            data = fn(args)
            (RESULTS / f"retrieval_{part}{suffix}.json").write_text(json.dumps(data, indent=1))
    load = {}
    for part in ("fashion", "photos", "fused"):
        path = RESULTS / f"retrieval_{part}{suffix}.json"
        load[part] = json.loads(path.read_text()) if path.exists() else None
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    meta = {"date": dt.date.today().isoformat(), "cpu": cpu}
    (RESULTS / f"retrieval{suffix}.md").write_text(
        render(load["fashion"], load["photos"], meta, load["fused"])
    )
    _log(f"wrote {RESULTS / f'retrieval{suffix}.md'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    raise SystemExit(main())
