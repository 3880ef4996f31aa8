"""`cbir`: export models, index folders of images, search, evaluate, train, benchmark, serve.

    cbir export resnet50 --head gem -o resnet50_gem.onnx
    cbir index photos/ --model resnet50_gem.onnx -o photos.index
    cbir search query.jpg --index photos.index -k 10 --html results.html
    cbir eval --index photos.index
    cbir serve --index photos.index
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A problem to report in one line and exit with status 1."""


def _err(msg: str) -> None:
    print(f"cbir: error: {msg}", file=sys.stderr)


def _warn(msg: str) -> None:
    print(f"cbir: warning: {msg}", file=sys.stderr)


class _Progress:
    """A tqdm bar on stderr when it is a terminal (and tqdm is installed), else nothing."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar: Any = None
        if enabled and total > 0:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True,
                             disable=None)  # disable=None: off when stderr is not a terminal

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def write(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


# ---------------------------------------------------------------- export
HEADS = ("gem", "mac", "spoc", "rmac", "netvlad", "hash12", "hash24", "hash32", "hash48", "hash64")


def cmd_export(args: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError:
        raise CliError("`cbir export` needs torch: pip install 'cbir-engine[torch]'") from None
    from cbir_engine.fileio import atomic_write
    from cbir_engine.models import SEED_NETWORKS, ZOO_ADDITIONS
    from cbir_engine.models.extractors import trunk
    from cbir_engine.retrieval import heads as H
    from cbir_engine.store.model_info import default_info, with_metadata
    from cbir_engine.torch_backend import export_onnx

    if args.model not in SEED_NETWORKS and args.model not in ZOO_ADDITIONS:
        known = ", ".join([*SEED_NETWORKS, *ZOO_ADDITIONS])
        raise CliError(f"unknown model {args.model!r}; choose one of: {known}")
    spec = SEED_NETWORKS.get(args.model) or ZOO_ADDITIONS[args.model]
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    body, size, channels = trunk(args.model, seed=args.seed)
    size = args.size or size
    head: list[torch.nn.Module]
    output = "float"
    if args.head == "netvlad":
        vlad = H.NetVLAD(args.clusters, channels)
        vlad.init_from_kmeans(_local_descriptors(body, spec.in_chans, size), seed=args.seed)
        head = [vlad]
    elif args.head.startswith("hash"):
        bits = int(args.head[4:])
        head = [H.GeM(), H.HashLayer(channels, bits)]
        output = "binary"
    else:
        head = [H.HEADS[args.head]()]
    module = H.Descriptor(body, *head).eval()
    onnx_bytes = export_onnx(module, torch.zeros(1, spec.in_chans, size, size))
    info = default_info(spec.in_chans, size, size, output)
    atomic_write(args.output, [with_metadata(onnx_bytes, info)])
    what = f"{args.head[4:]}-bit codes" if output == "binary" else f"{args.head} descriptors"
    print(f"wrote {args.output}: {args.model} ({spec.in_chans}x{size}x{size} input, seeded random weights: "
          f"no pretrained weights ship offline) -> {what}; "
          f"{Path(args.output).stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s")
    return 0


def _local_descriptors(body: Any, channels: int, size: int) -> Any:
    """Feature-map columns [n, C] of a few photos, for the NetVLAD codebook: scikit-image's bundled
    photos when it is installed, else seeded noise (either spreads the clusters over the features)."""
    import numpy as np
    import torch

    from cbir_engine.store.model_info import default_info

    info = default_info(channels, size, size, "float")
    try:
        import skimage.data
        from PIL import Image

        from cbir_engine.store.images import normalise, to_model_pixels

        photos = [getattr(skimage.data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket", "camera")]
        px = np.stack([to_model_pixels(Image.fromarray(p), info) for p in photos])
        x = torch.from_numpy(normalise(px, info))
    except ImportError:
        x = torch.randn(8, channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = body(x)
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).numpy()


# ---------------------------------------------------------------- index
def cmd_index(args: argparse.Namespace) -> int:
    from cbir_engine.store import Collection

    folder = Path(args.folder)
    if not folder.is_dir():
        raise CliError(f"{folder}: not a folder")
    out = Path(args.output)
    t0 = time.perf_counter()
    if (out / "meta.sqlite").exists():
        coll = Collection.open(out, writable=True, threads=args.threads)
        if args.model is not None:
            if not coll.uses_model(args.model):
                coll.close()
                raise CliError(f"{out} was built with another model; index into a new path, or leave out "
                               "--model to add to it with its own model")
        print(f"adding to {coll}")
    else:
        if args.model is None:
            raise CliError("a new index needs --model MODEL.onnx")
        coll = Collection.create(out, args.model, metric=args.metric, threads=args.threads)
        print(f"created {coll}")
    bar: _Progress | None = None

    def on_plan(n: int) -> None:
        nonlocal bar
        bar = _Progress(n, "indexing", not args.no_progress)

    def on_unreadable(path: str, reason: str) -> None:
        msg = f"cbir: warning: skipped unreadable {path}: {reason}"
        if bar is not None:
            bar.write(msg)
        else:
            print(msg, file=sys.stderr)

    with coll, _sigterm_as_interrupt():
        update = coll.update
        if args.ray is not None:  # the same work on a Ray cluster: cbir_engine.distributed
            from functools import partial

            from cbir_engine.distributed.ray_index import RayOptions, ray_update

            update = partial(ray_update, coll, address=args.ray, options=RayOptions(
                actors=args.ray_actors, cpus_per_actor=args.ray_actor_cpus))
        report = update(folder, batch_size=args.batch_size, checkpoint_every=args.checkpoint_every,
                        labels=args.labels, prune=args.prune,
                        progress=lambda n: bar.update(n) if bar is not None else None,
                        on_unreadable=on_unreadable, on_plan=on_plan)
        if bar is not None:
            bar.close()
        total = len(coll)
    rate = (report.added + report.updated) / report.seconds if report.seconds else 0.0
    print(f"{report.found} image files: {report.added} added, {report.updated} updated, "
          f"{report.unchanged} unchanged, {len(report.unreadable)} unreadable (skipped)"
          + (f", {report.removed} removed" if report.removed else "")
          + f"; the index holds {total} images ({rate:.0f} images/s, {time.perf_counter() - t0:.1f} s)")
    if report.interrupted:
        print("interrupted: the work done so far is saved; run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


class _sigterm_as_interrupt:
    """SIGTERM raises KeyboardInterrupt while indexing, so the work done so far is committed."""

    def __enter__(self) -> None:
        self._old: Any = None
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None

    @staticmethod
    def _handle(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


# ---------------------------------------------------------------- search
def cmd_search(args: argparse.Namespace) -> int:
    from cbir_engine.errors import ImageDecodeError
    from cbir_engine.store import Collection

    failures = 0
    results = []
    with Collection.open(args.index, threads=args.threads) as coll:
        for image in args.images:
            try:
                hits = coll.search_image(image, args.k)
            except ImageDecodeError as e:
                _err(f"cannot search with {e}")
                failures += 1
                continue
            except FileNotFoundError as e:
                _err(str(e))
                failures += 1
                continue
            results.append((image, hits))
    if args.json:
        listing = [{"query": q, "results": [h.__dict__ for h in hits]} for q, hits in results]
        print(json.dumps(listing, indent=1))
    else:
        for q, hits in results:
            _print_table(q, hits)
    if args.html and results:
        from cbir_engine.serve import report

        report.write(args.html, [report.QueryResult(os.path.basename(q), q, hits) for q, hits in results],
                     title="cbir search results", summary=f"index {args.index}, top {args.k}")
        print(f"wrote {args.html}")
    return EXIT_ERROR if failures else 0


def _print_table(query: str, hits: Sequence[Any]) -> None:
    print(f"\nquery: {query}")
    if not hits:
        print("  (the index is empty)")
        return
    label_w = max([5, *(len(h.label or "") for h in hits)])
    print(f"  {'rank':>4}  {'distance':>9}  {'id':>7}  {'label':<{label_w}}  path")
    for h in hits:
        d = f"{h.distance:g}" if float(h.distance).is_integer() else f"{h.distance:.4f}"
        print(f"  {h.rank:>4}  {d:>9}  {h.id:>7}  {(h.label or '-'):<{label_w}}  {h.path}")


# ---------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from cbir_engine.store import Collection

    with Collection.open(args.index, threads=args.threads) as coll:
        t0 = time.perf_counter()
        res = coll.evaluate(args.queries, args.seed, tuple(args.k))
    print(f"{res.queries} queries (leave-one-out, balanced over {res.labels} labels) against {res.database} "
          f"labelled images; relevant = same label")
    print(f"mAP@all {res.map_all:.4f}  " + "  ".join(f"P@{k} {v:.4f}" for k, v in res.precision_at.items())
          + f"  ({time.perf_counter() - t0:.1f} s)")
    return 0


# ---------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    import numpy as np

    if args.model is None and args.index is None:
        raise CliError("give --model MODEL.onnx (engine throughput) and/or --index INDEX (search speed)")
    if args.model is not None:
        import cbir_engine
        from cbir_engine.store.model_info import read_model_info

        info = read_model_info(args.model)
        t0 = time.perf_counter()
        engine = cbir_engine.load(args.model, threads=args.threads)
        print(f"{args.model}: loaded in {time.perf_counter() - t0:.2f} s, {engine.threads} threads, "
              f"input {info.channels}x{info.height}x{info.width}")
        rng = np.random.default_rng(0)
        for b in args.batch_sizes:
            x = rng.standard_normal((b, info.channels, info.height, info.width), dtype=np.float32)
            engine(x)  # specialise and warm up
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                engine(x)
                times.append(time.perf_counter() - t)
            med = float(np.median(times))
            print(f"  batch {b:>4}: {med * 1e3:9.2f} ms median of {args.repeat}  {b / med:10.1f} images/s")
    if args.index is not None:
        from cbir_engine.store import Collection

        with Collection.open(args.index, threads=args.threads) as coll:
            n = len(coll)
            if n == 0:
                raise CliError(f"{args.index} is empty")
            stored = np.asarray(coll.index.codes if coll.kind == "binary" else coll.index.vectors)
            q = stored[np.random.default_rng(0).integers(0, n, args.queries)]
            coll.index.search(q[:1], args.k)
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                coll.index.search(q, args.k)
                times.append(time.perf_counter() - t)
            med = float(np.median(times))
            print(f"{args.index}: {n} images; {args.queries} queries, k={args.k}: {med * 1e3:.2f} ms "
                  f"median of {args.repeat} ({med / args.queries * 1e6:.1f} us per query)")
    return 0


# ---------------------------------------------------------------- serve
def cmd_serve(args: argparse.Namespace) -> int:
    from cbir_engine.serve.app import serve
    from cbir_engine.store import Collection

    coll = Collection.open(args.index, threads=args.threads)
    coll.engine  # load the model before the first request  # noqa: B018
    print(f"serving {coll} at http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    try:
        serve(coll, args.host, args.port, args.k)
    finally:
        coll.close()
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cbir",
                                description="cbir-engine: export models, index folders of images, search, "
                                            "evaluate, train, benchmark, serve.",
                                epilog="`cbir COMMAND --help` describes each command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str,
            desc: str = "") -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=desc or help_,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(func=func)
        return sp

    def threads(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--threads", type=_positive, default=None,
                        help="engine and index threads (default: every CPU this process may use)")

    sp = add("export", cmd_export, "export a model of the zoo with a retrieval head to ONNX",
             "Exports a seed network's conv trunk with a retrieval head to ONNX (weights are seeded and\n"
             "random: no pretrained weights ship offline). gem/mac/spoc/rmac/netvlad give float\n"
             "descriptors, hashN gives N-bit sign codes.\n\n"
             "  cbir export resnet50 --head gem -o resnet50_gem.onnx")
    sp.add_argument("model", help="network name, e.g. resnet50, vgg16, googlenet, small_cnn")
    sp.add_argument("--head", choices=HEADS, default="gem")
    sp.add_argument("-o", "--output", required=True, help="ONNX file to write")
    sp.add_argument("--size", type=_positive, default=None, help="input side (default: the network's)")
    sp.add_argument("--clusters", type=_positive, default=16, help="NetVLAD clusters (default 16)")
    sp.add_argument("--seed", type=int, default=0)

    sp = add("index", cmd_index, "index a folder of images (resumable, incremental)",
             "Walks FOLDER for images (JPEG, PNG, GIF, BMP, TIFF, WebP, PPM), runs them through the model\n"
             "in batches and stores codes or descriptors with their metadata in OUTPUT (a folder).\n"
             "Unreadable files are skipped with a warning. An interrupted run resumes from its last\n"
             "checkpoint; running again adds only new or changed files.\n\n"
             "  cbir index photos/ --model model.onnx -o photos.index")
    sp.add_argument("folder")
    sp.add_argument("--model", default=None, help="ONNX model (needed for a new index)")
    sp.add_argument("-o", "--output", required=True, help="the index (a folder)")
    sp.add_argument("--batch-size", type=_positive, default=64)
    sp.add_argument("--checkpoint-every", type=_positive, default=2000,
                    help="commit progress every N images (default 2000)")
    sp.add_argument("--labels", choices=("parent", "none"), default="parent",
                    help="label each image with its folder name (default) or not")
    sp.add_argument("--metric", choices=("cosine", "l2"), default="cosine",
                    help="distance for float descriptors (binary codes use Hamming)")
    sp.add_argument("--prune", action="store_true", help="drop indexed files that are gone from FOLDER")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.add_argument("--ray", metavar="ADDRESS", default=None,
                    help="read and embed on the Ray cluster at ADDRESS (HOST:PORT, or 'auto'); same index")
    sp.add_argument("--ray-actors", type=_positive, default=2, help="embedding actors with --ray (default 2)")
    sp.add_argument("--ray-actor-cpus", type=float, default=1.0,
                    help="CPUs per actor with --ray, fractions allowed (default 1); engine threads follow")
    threads(sp)

    sp = add("search", cmd_search, "search an index with one or more images",
             "Prints the k nearest indexed images of each query; --html writes a page of thumbnails.\n\n"
             "  cbir search query.jpg --index photos.index -k 10 --html results.html")
    sp.add_argument("images", nargs="+", metavar="IMAGE")
    sp.add_argument("--index", required=True)
    sp.add_argument("-k", type=_positive, default=10, help="results per query (default 10)")
    sp.add_argument("--html", default=None, help="write a page of thumbnails with distances here")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    threads(sp)

    sp = add("eval", cmd_eval, "retrieval quality of an index over its labels (mAP, precision@k)",
             "Leave-one-out evaluation: queries drawn from the index (balanced over labels, which come\n"
             "from folder names) rank all other labelled images; relevant = same label.\n\n"
             "  cbir eval --index photos.index --queries 1000")
    sp.add_argument("--index", required=True)
    sp.add_argument("--queries", type=_positive, default=1000)
    sp.add_argument("-k", type=_positive, nargs="+", default=[10, 100], help="precision@k cut-offs")
    sp.add_argument("--seed", type=int, default=0)
    threads(sp)

    add("train", lambda a: 0,
        "train a hash network on an offline data set and export it (see cbir train --help)")

    sp = add("bench", cmd_bench, "time the engine on a model and/or search on an index",
             "  cbir bench --model model.onnx --batch-sizes 1 16 64\n  cbir bench --index photos.index")
    sp.add_argument("--model", default=None)
    sp.add_argument("--index", default=None)
    sp.add_argument("--batch-sizes", type=_positive, nargs="+", default=[1, 16, 64])
    sp.add_argument("--queries", type=_positive, default=100)
    sp.add_argument("-k", type=_positive, default=10)
    sp.add_argument("--repeat", type=_positive, default=10)
    threads(sp)

    sp = add("serve", cmd_serve, "serve a search page and JSON API for an index",
             "Starts a local web server: a page to upload or pick an image and see the top-k results,\n"
             "and a JSON API (/api/search, /api/images, /api/info; docs at /api/docs).\n\n"
             "  cbir serve --index photos.index --port 8000")
    sp.add_argument("--index", required=True)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("-k", type=_positive, default=10, help="default results per query")
    threads(sp)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # its own parser: the options of cbir_engine.train.cli
        try:
            from cbir_engine.train.cli import main as train_main
        except ImportError as e:
            _err(f"`cbir train` needs torch: pip install 'cbir-engine[torch]' ({e})")
            return EXIT_ERROR
        return train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from cbir_engine.errors import CbirError

    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `cbir search ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CliError, CbirError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError) as e:
        _err(str(e))
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
