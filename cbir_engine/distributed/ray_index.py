"""Indexing a folder on a Ray cluster: Ray Data reads and decodes the images in tasks, a pool of
actors (one Engine each, its threads matched to the CPUs the actor holds) embeds them, and the
driver folds the codes into an on-disk `Collection`, the same index `cbir index` writes.

    from cbir_engine.distributed import index_folder
    report = index_folder("photos/", "photos.index", model="model.onnx", address="10.0.0.5:6379")

or `cbir index photos/ --model model.onnx -o photos.index --ray 10.0.0.5:6379`.

Why the result is the single-process index, bit for bit: the work list is the one
`Collection.update` makes (the same walk order, the same new/changed/unchanged test), every
image goes through the same decoding (`load_pixels`) and normalisation, and the engine's output
for an image does not depend on the batch it rides in or the thread count (checked by the tests).
Results come back from the actors in any order; the driver buffers them and folds only the
contiguous prefix of the work list, giving ids in walk order, so ids are the same as a
single-process run's whatever the order of completion.

Failures and resuming: an embedding actor that dies is replaced by Ray Data and its batches run
again. Progress is committed into the collection (a new code-file generation plus its SQLite
rows, atomically, see cbir_engine.store.collection) every `checkpoint_every` images. When the
pipeline fails for good, or the run is interrupted, the driver commits the prefix it has and
stops (DistributedIndexError, or report.interrupted); if the driver itself dies, the last commit
stands. Running again skips every committed image, so the resumed index equals an uninterrupted
run's. The committed prefix is the only state kept between runs.

The folder must be readable at the same path on every node that runs read tasks (a shared
file system), as for any Ray Data read of local paths.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cbir_engine.errors import CbirError, ImageDecodeError, ShapeError
from cbir_engine.store.collection import (
    MODEL_FILE,
    Collection,
    IndexReport,
    Row,
    _label_of,
    _signals_deferred,
)
from cbir_engine.store.images import load_pixels, normalise
from cbir_engine.store.model_info import ModelInfo


class RayOptionsError(CbirError, ValueError):
    """A setting for a distributed run is out of range."""


class DistributedIndexError(CbirError, RuntimeError):
    """A distributed indexing run failed (an actor or task died beyond its retries); what was
    committed before the failure stays, and running again resumes from there."""


def _require_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise CbirError("distributed indexing needs Ray: pip install 'cbir-engine[distributed]'") from e
    return ray


# ---------------------------------------------------------------------------------------------
# The remote side: decoding tasks and embedding actors. Plain numpy batches travel between them:
# pos (int64, the image's place in the work list), pixels (uint8 [n, h, w, c]), error (str,
# "" when the image decoded).


def decode_batch(batch: dict[str, np.ndarray], info_json: str) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: reads and decodes each path; unreadable files keep their
    row, with blank pixels and the reason, so the driver can report them."""
    info = ModelInfo.from_json(info_json)
    paths = batch["path"]
    n = len(paths)
    pixels = np.zeros((n, info.height, info.width, info.channels), np.uint8)
    errors = np.empty(n, dtype=object)
    for j, path in enumerate(paths):
        try:
            pixels[j] = load_pixels(str(path), info)
            errors[j] = ""
        except ImageDecodeError as e:
            errors[j] = str(e).removeprefix(f"{path}: ") or "cannot decode image"
    return {"pos": np.asarray(batch["pos"], np.int64), "pixels": pixels, "error": errors}


class Embedder:
    """Ray Data actor: one Engine, threads = the whole CPUs this actor holds (at least one).

    Batches are padded to `batch_size` as `Collection.embed` pads them, so the engine keeps one
    specialisation."""

    def __init__(self, model: Any, info_json: str, kind: str, dim: int, batch_size: int,
                 threads: int | None = None) -> None:
        import ray

        import cbir_engine

        if isinstance(model, ray.ObjectRef):  # the model travels once through the object store
            model = ray.get(model)

        self.info = ModelInfo.from_json(info_json)
        self.kind = kind
        self.dim = dim
        self.batch_size = batch_size
        held = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
        self.threads = threads or max(1, int(held))
        self.engine = cbir_engine.load(model, threads=self.threads)

    def _embed(self, pixels: np.ndarray) -> np.ndarray:
        from cbir_engine.index import pack_bits

        n = pixels.shape[0]
        x = normalise(pixels, self.info)
        if n < self.batch_size:
            x = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), np.float32)])
        y = np.asarray(self.engine(x))[:n].reshape(n, -1)
        if y.shape[1] != self.dim:
            raise ShapeError(f"the model gives {y.shape[1]} values per image, the index holds {self.dim}")
        return pack_bits(y) if self.kind == "binary" else np.ascontiguousarray(y, np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pos = np.asarray(batch["pos"], np.int64)
        errors = batch["error"]
        ok = np.array([e == "" for e in errors], dtype=bool)
        width = self.dim // 8 if self.kind == "binary" else self.dim
        codes = np.zeros((len(pos), width), np.uint8 if self.kind == "binary" else np.float32)
        good = np.flatnonzero(ok)
        for s in range(0, len(good), self.batch_size):
            part = good[s:s + self.batch_size]
            codes[part] = self._embed(np.asarray(batch["pixels"])[part])
        return {"pos": pos, "code": codes, "error": errors}


# ---------------------------------------------------------------------------------------------
# The driver side.


@dataclass(frozen=True)
class RayOptions:
    """How the work is spread. `actors` embedding actors of `cpus_per_actor` CPUs each (fractions
    allowed: on small machines whole CPUs per actor leave none for the reading tasks, and the
    pipeline starves); decoding tasks take `cpus_per_reader`. An actor that dies is replaced by
    Ray Data and its batches are run again (the tests kill one mid-run: same index)."""

    actors: int = 2
    cpus_per_actor: float = 1.0
    cpus_per_reader: float = 0.25
    threads_per_actor: int | None = None  # None: the whole CPUs the actor holds

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise RayOptionsError(f"actors must be >= 1, got {self.actors}")
        if not (self.cpus_per_actor > 0 and self.cpus_per_reader > 0):  # also refuses NaN
            raise RayOptionsError(f"CPUs per actor and per reader must be positive, got "
                                  f"{self.cpus_per_actor} "
                                  f"and {self.cpus_per_reader}")
        if self.threads_per_actor is not None and self.threads_per_actor < 1:
            raise RayOptionsError(f"threads_per_actor must be >= 1, got {self.threads_per_actor}")


_Work = list[tuple[str, os.stat_result, "Row | None"]]


def ray_update(coll: Collection, root: str | os.PathLike[str], *, address: str | None = None,
               options: RayOptions | None = None, batch_size: int = 64, checkpoint_every: int = 2000,
               labels: str = "parent", prune: bool = False, progress: Callable[[int], None] | None = None,
               on_unreadable: Callable[[str, str], None] | None = None,
               on_plan: Callable[[int], None] | None = None) -> IndexReport:
    """`Collection.update` with the reading and embedding done on a Ray cluster (see the module
    docstring). `address` is the cluster to join when this process is not connected to one yet
    ("auto", "HOST:PORT" or "ray://HOST:PORT"); a connection made here is closed at the end."""
    ray = _require_ray()
    options = options or RayOptions()
    if not coll.writable:
        raise CbirError("this index was opened read-only")
    if labels not in ("parent", "none"):
        raise ValueError(f"labels must be 'parent' or 'none', got {labels!r}")
    if batch_size < 1 or checkpoint_every < 1:
        raise ValueError("batch_size and checkpoint_every must be positive")
    t0 = time.perf_counter()
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    report = IndexReport()
    todo, gone = coll._work_list(root, prune, report, on_unreadable)
    if on_plan is not None:
        on_plan(len(todo))
    if gone:
        coll.index.remove(gone)
        report.removed = len(gone)
    pending_rows: list[Row] = []
    pending_removed: list[int] = list(gone)
    next_id = coll._next_id

    # Tests that kill a driver mid-run need a run that is still going after its first commit,
    # however fast the machine: this pause (seconds, from the environment) gives them that window,
    # and commits then hold at most checkpoint_every images (one batch from Ray can hold them all).
    pause_after_commit = float(os.environ.get("CBIR_TEST_PAUSE_AFTER_COMMIT", "0") or 0)
    fold_limit = checkpoint_every if pause_after_commit > 0 else None
    front = 0  # the first position of the work list not folded yet

    def commit() -> None:
        if pending_rows or pending_removed:
            with _signals_deferred():
                coll._commit(pending_rows, pending_removed)
                pending_rows.clear()
                pending_removed.clear()
            if pause_after_commit > 0 and front < len(todo):
                time.sleep(pause_after_commit)

    if not todo:
        commit()
        report.seconds = time.perf_counter() - t0
        return report

    connected_here = False
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
        connected_here = True
    try:
        ds = _pipeline(ray, coll, todo, options, batch_size)
        # Results arrive in any order: keep them until the prefix of the work list is complete.
        ready: dict[int, tuple[np.ndarray, str]] = {}
        codes_buf: list[np.ndarray] = []
        ids_buf: list[int] = []

        def fold() -> None:
            nonlocal front, next_id
            olds: list[int] = []
            while front in ready and (fold_limit is None or len(pending_rows) < fold_limit):
                code, error = ready.pop(front)
                key, st, old = todo[front]
                front += 1
                if error:
                    Collection._unreadable(report, on_unreadable, key, error)
                    continue
                if old is not None:
                    olds.append(int(old.id))
                label = _label_of(key, root) if labels == "parent" else None
                pending_rows.append(Row(next_id, key, int(st.st_size), int(st.st_mtime_ns), label))
                codes_buf.append(code)
                ids_buf.append(next_id)
                if old is None:
                    report.added += 1
                else:
                    report.updated += 1
                next_id += 1
            with _signals_deferred():  # the codes and their rows join the pending work together
                if olds:
                    coll.index.remove(olds)
                    pending_removed.extend(olds)
                if codes_buf:
                    coll.index.add(np.stack(codes_buf), np.asarray(ids_buf, np.int64))
                    codes_buf.clear()
                    ids_buf.clear()

        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                pos = np.asarray(batch["pos"], np.int64)
                for j, p in enumerate(pos.tolist()):
                    ready[p] = (batch["code"][j], str(batch["error"][j]))
                before = front
                fold()
                if progress is not None and front > before:
                    progress(front - before)
                if len(pending_rows) >= (fold_limit or max(checkpoint_every, len(coll) // 10)):
                    commit()
            while front in ready:  # only left over when commits are capped (the test setting)
                fold()
                commit()
            if front != len(todo):
                missing = len(todo) - front
                raise DistributedIndexError(f"the Ray pipeline ended with {missing} of {len(todo)} images "
                                            "unaccounted for")
            commit()
        except KeyboardInterrupt:
            fold()
            commit()
            report.interrupted = True
        except Exception as e:
            fold()
            commit()
            if isinstance(e, CbirError) and not isinstance(e, ray.exceptions.RayError):
                raise  # our own, raised here in the driver
            # Ray's errors (RayTaskError, ActorDiedError, ...), also those wrapping a remote
            # CbirError: one line of what happened, and how to go on.
            raise DistributedIndexError(
                f"distributed indexing failed after {report.added + report.updated} images were committed "
                f"({type(e).__name__}: {_first_line(e)}); run the same command again to resume") from e
    finally:
        if connected_here:
            with contextlib.suppress(Exception):
                ray.shutdown()
    report.seconds = time.perf_counter() - t0
    return report


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _pipeline(ray: Any, coll: Collection, todo: _Work,
              options: RayOptions, batch_size: int) -> Any:
    """The Ray Data pipeline over the work list: read + decode tasks, then the actor pool."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the caller reports progress
    model = (coll.path / MODEL_FILE).read_bytes()
    info_json = coll.model_info.to_json()
    items = [{"pos": i, "path": key} for i, (key, _, _) in enumerate(todo)]
    # Blocks of a few batches each: enough of them to keep every actor busy, not so many that
    # scheduling costs more than the work.
    blocks = max(1, min(len(items) // max(batch_size, 1), 4 * options.actors * 8))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(decode_batch, batch_size=batch_size, fn_kwargs={"info_json": info_json},
                        num_cpus=options.cpus_per_reader)
    return ds.map_batches(
        Embedder,
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        fn_constructor_kwargs={"model": model, "info_json": info_json, "kind": coll.kind, "dim": coll.dim,
                               "batch_size": batch_size, "threads": options.threads_per_actor},
        num_cpus=options.cpus_per_actor,
    )


def index_folder(root: str | os.PathLike[str], index: str | os.PathLike[str], *,
                 model: str | os.PathLike[str] | None = None, address: str | None = None,
                 options: RayOptions | None = None, **kwargs: Any) -> IndexReport:
    """Creates the index at `index` (with `model`) or opens it to add to it, and runs
    `ray_update` on `root`; keyword arguments go to `ray_update`."""
    path = Path(index)
    if (path / "meta.sqlite").exists():
        coll = Collection.open(path, writable=True)
        if model is not None and not coll.uses_model(model):
            coll.close()
            raise CbirError(f"{path} was built with another model; give a new index path")
    else:
        if model is None:
            raise CbirError("a new index needs a model")
        coll = Collection.create(path, model)
    with coll:
        return ray_update(coll, root, address=address, options=options, **kwargs)
