"""The embedded default: export a seed network, load it in the engine, embed a few photos and
print the descriptors beside ONNX Runtime's.

    python -m cbir_engine.demo [--model resnet50] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry")
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


def load_photos(size: int) -> tuple[list[str], np.ndarray]:
    """scikit-image's bundled photos, resized to size x size and normalised as for ImageNet."""
    import skimage.data
    from skimage.transform import resize

    batch = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        img = resize(img[..., :3], (size, size), anti_aliasing=True).astype(np.float32)
        batch.append((img.transpose(2, 0, 1) - MEAN) / STD)
    return list(PHOTOS), np.stack(batch).astype(np.float32)


def descriptor_network(name: str):
    """The seed network's conv trunk + global average pooling: a 2-D descriptor per image."""
    import torch

    from cbir_engine.models import build

    module, size = build(name, seed=0)
    for attr in ("fc", "classifier", "last_linear"):
        if hasattr(module, attr):
            setattr(module, attr, torch.nn.Identity())
    return module.eval(), size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch

    import cbir_engine
    from cbir_engine.torch_backend import export_onnx

    torch.set_num_threads(args.threads)
    module, size = descriptor_network(args.model)
    names, images = load_photos(size)
    print(f"model: {args.model} (seeded random weights, randomised BatchNorm), input {size}x{size}")
    t0 = time.perf_counter()
    onnx_bytes = export_onnx(module, torch.zeros(1, 3, size, size))
    t1 = time.perf_counter()
    engine = cbir_engine.load(onnx_bytes, threads=args.threads)
    t2 = time.perf_counter()
    print(f"exported {len(onnx_bytes) / 2**20:.1f} MiB of ONNX in {t1 - t0:.1f} s; "
          f"loaded and optimised in {t2 - t1:.2f} s: {engine}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name

    ours = engine(images)
    ref = sess.run(None, {feed: images})[0]
    ours_n = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    ref_n = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    head = f"cbir-engine descriptor (first 4 of {ours.shape[1]})"
    print(f"\n{'image':<22} {head:<46} ONNX Runtime")
    for i, name in enumerate(names):
        a = " ".join(f"{v:+.4f}" for v in ours_n[i, :4])
        b = " ".join(f"{v:+.4f}" for v in ref_n[i, :4])
        print(f"{name:<22} {a:<46} {b}")
    err = float(np.abs(ours - ref).max() / np.abs(ref).max())
    print(f"\nmax |diff| / max |ref| = {err:.2e}")
    sim = ours_n @ ours_n.T
    np.fill_diagonal(sim, -1)
    print("nearest neighbour of each photo (cosine):",
          ", ".join(f"{names[i]}->{names[int(j)]}" for i, j in enumerate(sim.argmax(1))))

    # Interleaved timing: engine, ORT, engine, ORT, ... ; median of per-pair ratios.
    ratios, ours_ms, ort_ms = [], [], []
    for _ in range(args.repeat):
        a0 = time.perf_counter()
        engine(images)
        a1 = time.perf_counter()
        sess.run(None, {feed: images})
        a2 = time.perf_counter()
        ours_ms.append((a1 - a0) * 1e3)
        ort_ms.append((a2 - a1) * 1e3)
        ratios.append((a1 - a0) / (a2 - a1))
    print(f"batch {len(names)}, {args.threads} threads: cbir-engine {statistics.median(ours_ms):.1f} ms, "
          f"ONNX Runtime {statistics.median(ort_ms):.1f} ms, ratio {statistics.median(ratios):.2f}x "
          f"(median of {args.repeat} interleaved pairs)")
    m = engine.memory({engine.input_names[0]: images.shape})
    print(f"memory plan: arena {m['arena_bytes'] / 2**20:.1f} MiB for "
          f"{m['intermediate_bytes'] / 2**20:.1f} MiB of intermediates")
    return 0 if err <= 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
