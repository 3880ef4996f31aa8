"""Trains the hashing model the embedded demo ships with: cbir_engine/assets/fashion_mnist_hash48.onnx.

Recipe (the best 48-bit method of bench/results/retrieval.md): the small CNN trunk
(conv32-pool-conv64-pool-conv128, GeM) is trained by classification, then a 48-bit hash layer
with the triplet loss (semi-hard mining) from that trunk. Training uses the Fashion-MNIST *train*
part only (a class-balanced subset), so the demo's numbers on the 10,000 test images are
held-out numbers.

    python bench/train_demo_model.py [--n-train 20000] [--epochs 4] [--pretrain-epochs 4]

Takes several minutes on two cores; the demo itself never trains.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ASSET = Path(__file__).resolve().parents[1] / "cbir_engine" / "assets" / "fashion_mnist_hash48.onnx"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=20000, help="class-balanced training images")
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ASSET)
    args = p.parse_args(argv)

    import torch

    from cbir_engine.data import fashion_mnist
    from cbir_engine.fileio import atomic_write
    from cbir_engine.store.model_info import default_info, with_metadata
    from cbir_engine.torch_backend import export_onnx
    from cbir_engine.train import train_classifier, train_hashing

    torch.set_num_threads(args.threads)
    x, y = fashion_mnist("train")
    rng = np.random.default_rng(args.seed)
    per_class = args.n_train // 10
    pick = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(10)]))
    x, y = x[pick], y[pick]
    t0 = time.perf_counter()
    clf, _ = train_classifier(x, y, epochs=args.pretrain_epochs, lr=3e-3, seed=args.seed)
    t1 = time.perf_counter()
    net, log = train_hashing("triplet", x, y, args.bits, epochs=args.epochs, lr=1e-3, seed=args.seed,
                             trunk=clf.trunk)
    t2 = time.perf_counter()
    print(f"classifier {t1 - t0:.0f} s, triplet {args.bits} bits {t2 - t1:.0f} s, "
          f"final loss {np.mean(log.losses[-20:]):.4f}")
    onnx_bytes = export_onnx(net.export_module(binarize=True), torch.zeros(1, 1, 28, 28))
    info = default_info(1, 28, 28, "binary")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, [with_metadata(onnx_bytes, info)])
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
