"""`cbir train`: trains a hash network on a data set that ships offline and exports it to ONNX
(the exported model outputs sign codes and runs in the engine).

    cbir train --method triplet --bits 48 --dataset fashion-mnist --out fmnist48.onnx --evaluate
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np

DATASETS = ("fashion-mnist", "mnist5k")


def build_parser() -> argparse.ArgumentParser:
    from cbir_engine.train.trainer import METHODS

    p = argparse.ArgumentParser(prog="cbir train", description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=METHODS, default="triplet")
    p.add_argument("--bits", type=int, default=48, help="code length (default 48)")
    p.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    p.add_argument("--queries", type=int, default=1000, help="held-out queries, balanced by class")
    p.add_argument("--n-train", type=int, default=20000,
                   help="training images drawn from the database part (default 20000)")
    p.add_argument("--pretrain-epochs", type=int, default=4,
                   help="epochs of classification training of the trunk first (0: from scratch)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--margin", type=float, default=None, help="triplet / contrastive margin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the ONNX model here")
    p.add_argument("--evaluate", action="store_true",
                   help="embed queries and database with the engine and print mAP@all")
    p.add_argument("--threads", type=int, default=None, help="engine threads for --evaluate")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _load(name: str, queries: int, n_train: int, seed: int):  # type: ignore[no-untyped-def]
    from cbir_engine.data import fashion_mnist, mnist5k, retrieval_split

    x, y = fashion_mnist("all") if name == "fashion-mnist" else mnist5k()
    return retrieval_split(x, y, queries, n_train, seed)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.bits < 1:
        print("cbir train: --bits must be positive", file=sys.stderr)
        return 2
    import torch

    from cbir_engine.train.trainer import train_classifier, train_hashing

    progress = not args.no_progress
    split = _load(args.dataset, args.queries, args.n_train, args.seed)
    print(f"{args.dataset}: {len(split.query_y)} queries, {len(split.db_y)} database images, "
          f"training on {len(split.train_idx)} of them")
    trunk = None
    t0 = time.perf_counter()
    if args.pretrain_epochs > 0:
        clf, _ = train_classifier(split.train_x, split.train_y, epochs=args.pretrain_epochs,
                                  batch_size=args.batch_size, lr=3e-3, seed=args.seed, progress=progress)
        trunk = clf.trunk
    net, log = train_hashing(args.method, split.train_x, split.train_y, args.bits, epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr, margin=args.margin, seed=args.seed,
                             trunk=trunk, progress=progress)
    print(f"trained {args.method} ({args.bits} bits) in {time.perf_counter() - t0:.0f} s; "
          f"final loss {np.mean(log.losses[-20:]):.4f}")
    model = net.export_module(binarize=False)
    if args.out:
        from cbir_engine.torch_backend import export_onnx

        sign_model = net.export_module(binarize=True)
        with open(args.out, "wb") as f:
            f.write(export_onnx(sign_model, torch.zeros(1, 1, 28, 28)))
        print(f"wrote {args.out} (image [N, 1, 28, 28] -> codes [N, {args.bits}] in {{-1, 1}})")
    if args.evaluate:
        import cbir_engine
        from cbir_engine.index import HammingIndex
        from cbir_engine.retrieval.baselines import pack_signs
        from cbir_engine.retrieval.evaluate import engine_embed
        from cbir_engine.retrieval.metrics import evaluate_hamming

        engine = cbir_engine.from_torch(model, torch.zeros(1, 1, 28, 28), threads=args.threads)
        q_codes, bits = pack_signs(engine_embed(engine, split.query_x))
        db_codes, _ = pack_signs(engine_embed(engine, split.db_x, progress=progress))
        index = HammingIndex(bits, threads=args.threads)
        index.add(db_codes)
        res = evaluate_hamming(index, q_codes, split.query_y, split.db_y, pr=False)
        print(f"mAP@all {res.map_all:.4f}  mAP@1000 {res.map_at[1000]:.4f}  P@100 {res.precision_at[100]:.4f}"
              f"  P(r<=2) {res.precision_r2:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
