"""`Collection`: the on-disk image index that `cbir index`, `cbir search` and `cbir serve` use.

A collection is a folder:

    my.index/
      meta.sqlite            metadata: info (key/value), images (id, path, size, mtime_ns, label)
      model.onnx             the model the codes came from (a copy: the index stands alone)
      codes.<gen>.hidx       binary codes: a Hamming index file (cbir_engine.index.files), or
      vectors.<gen>.fidx     float descriptors: a float index file (cbir_engine.store.float_index)
      lock                   held (flock) by the one process that may write

Crash consistency: the code file of each generation is written whole and atomically under a new
name; then one SQLite transaction inserts the new rows and moves `generation` to it (together
with the file's header checksum); only then is the previous file deleted. The SQLite commit is
the single point where a change becomes real: a crash before it leaves the previous generation
(the new file is an orphan, removed on the next write), a crash after it leaves the new one.

Opening checks that the two parts agree (the file named by `generation` exists, has the header
checksum the metadata recorded, and holds exactly the ids of the images table) and refuses with
`IndexConsistencyError` otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbir_engine.errors import (
    CbirError,
    ImageDecodeError,
    IndexConsistencyError,
    IndexFileError,
    ShapeError,
)
from cbir_engine.fileio import fsync_dir
from cbir_engine.store.float_index import FloatIndex
from cbir_engine.store.images import load_pixels, normalise, walk_images
from cbir_engine.store.model_info import ModelInfo, read_model_info

FORMAT = "cbir-collection"
FORMAT_VERSION = 1
META_FILE = "meta.sqlite"
MODEL_FILE = "model.onnx"
LOCK_FILE = "lock"

_SCHEMA = """
CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    label TEXT
);
"""


class CollectionBusyError(CbirError, RuntimeError):
    """Another process is writing to this index."""


@dataclass(frozen=True)
class Row:
    """One indexed image."""

    id: int
    path: str
    size: int
    mtime_ns: int
    label: str | None


@dataclass(frozen=True)
class Hit:
    """One search result."""

    rank: int
    id: int
    distance: float
    path: str
    label: str | None


@dataclass
class IndexReport:
    """What one `update` did."""

    found: int = 0  # image files under the folder
    added: int = 0  # new files embedded and committed
    updated: int = 0  # files whose size or mtime changed, embedded again
    unchanged: int = 0  # already indexed with the same size and mtime
    removed: int = 0  # indexed files no longer there (with prune)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    interrupted: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class EvalResult:
    map_all: float
    precision_at: dict[int, float]
    queries: int
    database: int
    labels: int


def _code_file_name(kind: str, generation: int) -> str:
    return f"codes.{generation:08d}.hidx" if kind == "binary" else f"vectors.{generation:08d}.fidx"


def _header_checksum(path: str | os.PathLike[str]) -> int:
    """The header CRC (bytes 60..64) of a Hamming or float index file: it covers the header,
    which holds the data CRC, so it fingerprints the whole file."""
    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) < 64:
        raise IndexFileError(f"{path}: truncated index file")
    return int(struct.unpack("<I", head[60:64])[0])


def _sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Holds SIGINT and SIGTERM back while in-memory and on-disk state change together: a Ctrl-C
    (KeyboardInterrupt) in the middle would leave codes without their rows. They are delivered
    when the block ends."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, OSError, ValueError):  # platforms without per-thread signal masks
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: every transaction below is explicit (BEGIN IMMEDIATE ... COMMIT).
    db = sqlite3.connect(os.fspath(path), isolation_level=None, timeout=30.0, check_same_thread=False)
    db.execute("PRAGMA synchronous=FULL")
    return db


class Collection:
    """An image index on disk. Create with `Collection.create`, open with `Collection.open`."""

    def __init__(self, path: Path, db: sqlite3.Connection, writable: bool, threads: int | None) -> None:
        self.path = path
        self._db = db
        self.writable = writable
        self._lock_fd: int | None = None
        self._threads = threads
        self._engine: Any = None
        self._engine_lock = threading.Lock()
        info = dict(db.execute("SELECT key, value FROM info").fetchall())
        if info.get("format") != FORMAT:
            raise IndexFileError(f"{path}: not a cbir index (no '{FORMAT}' marker in {META_FILE})")
        if int(info.get("version", 0)) != FORMAT_VERSION:
            raise IndexFileError(f"{path}: index format version {info.get('version')}; this build "
                                 f"reads version {FORMAT_VERSION}")
        self.kind: str = info["kind"]
        self.dim = int(info["dim"])
        self.metric: str = info.get("metric", "hamming")
        self.model_info = ModelInfo.from_json(info["model_info"])
        self._model_sha256 = info["model_sha256"]
        self._generation = int(info["generation"])
        self._next_id = int(info["next_id"])
        self.index: Any = None

    # ---------------------------------------------------------------- creating and opening
    @classmethod
    def create(cls, path: str | os.PathLike[str], model: str | os.PathLike[str], *,
               metric: str = "cosine", threads: int | None = None) -> Collection:
        """A new, empty index at `path` (a folder that must not exist or be empty, or be the
        remains of a creation that crashed) for the ONNX model at `model`."""
        path = Path(path)
        model = Path(model)
        if not model.is_file():
            raise FileNotFoundError(f"{model}: no such model file")
        info = read_model_info(model)
        if path.exists():
            if not path.is_dir():
                raise IndexFileError(f"{path} exists and is not an index folder")
            if (path / META_FILE).exists():
                raise IndexFileError(f"{path} already holds an index")
            leftovers = [p.name for p in path.iterdir()
                         if p.name not in (MODEL_FILE, LOCK_FILE)
                         and not p.name.startswith((".", "codes.", "vectors.", "meta.sqlite"))]
            if leftovers:
                some = ", ".join(leftovers[:3])
                raise IndexFileError(f"{path} is a folder with other files in it ({some}); "
                                     "give a new path for the index")
        path.mkdir(parents=True, exist_ok=True)
        lock_fd = cls._take_lock(path)
        try:
            # The model, an empty generation-0 code file, then the metadata: the metadata file
            # appearing (by rename) is what makes the folder an index.
            shutil.copyfile(model, path / MODEL_FILE)
            with open(path / MODEL_FILE, "rb+") as f:
                os.fsync(f.fileno())
            probe = cls._probe_output(path / MODEL_FILE, info, threads)
            kind = info.output
            if kind == "binary":
                from cbir_engine.index import HammingIndex

                if probe % 8:
                    raise ShapeError(f"{model}: a binary model must output a multiple of 8 bits, "
                                     f"this one outputs {probe}")
                index: Any = HammingIndex(probe, threads=threads)
                metric = "hamming"
            else:
                index = FloatIndex(probe, metric)
            code_file = path / _code_file_name(kind, 0)
            index.save(code_file)
            tmp = path / (META_FILE + ".creating")
            tmp.unlink(missing_ok=True)
            db = _connect(tmp)
            db.executescript(_SCHEMA)
            values = {
                "format": FORMAT, "version": str(FORMAT_VERSION), "kind": kind, "dim": str(probe),
                "metric": metric, "model_info": info.to_json(),
                "model_sha256": _sha256(path / MODEL_FILE), "generation": "0", "next_id": "0",
                "code_checksum": str(_header_checksum(code_file)),
                "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO info VALUES (?, ?)", values.items())
            db.execute("COMMIT")
            db.close()
            os.replace(tmp, path / META_FILE)
            fsync_dir(os.fspath(path))
        except BaseException:
            os.close(lock_fd)
            raise
        coll = cls(path, _connect(path / META_FILE), True, threads)
        coll._lock_fd = lock_fd
        coll._load_codes()
        return coll

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = False,
             threads: int | None = None) -> Collection:
        """Opens an index; `writable` takes the writer's lock and clears crash leftovers.
        Raises IndexConsistencyError when its parts disagree."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such index")
        if not (path / META_FILE).is_file():
            raise IndexFileError(f"{path}: not a cbir index (no {META_FILE} in it)"
                                 if path.is_dir() else f"{path}: not a cbir index (an index is a folder)")
        lock_fd = cls._take_lock(path) if writable else None
        try:
            try:
                db = _connect(path / META_FILE)
                db.execute("SELECT count(*) FROM info").fetchone()
            except sqlite3.DatabaseError as e:
                raise IndexConsistencyError(
                    f"{path}: the metadata database {META_FILE} is unreadable: {e}") from e
            coll = cls(path, db, writable, threads)
            coll._lock_fd = lock_fd
            model = path / MODEL_FILE
            if not model.is_file():
                raise IndexConsistencyError(f"{path}: the model file {MODEL_FILE} is missing")
            if _sha256(model) != coll._model_sha256:
                raise IndexConsistencyError(f"{path}: {MODEL_FILE} is not the model this index was built "
                                            "with (its checksum differs)")
            if writable:
                coll._remove_stale_code_files()
            coll._load_codes()
            return coll
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise

    @staticmethod
    def _take_lock(path: Path) -> int:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CollectionBusyError(f"{path}: another process is writing to this index") from None
        return fd

    @staticmethod
    def _probe_output(model: Path, info: ModelInfo, threads: int | None) -> int:
        """Runs the model once on a blank image: the code length / descriptor size."""
        import cbir_engine

        engine = cbir_engine.load(os.fspath(model), threads=threads)
        x = np.zeros((1, info.channels, info.height, info.width), np.float32)
        y = np.asarray(engine(x))
        if y.ndim < 2 or y.shape[0] != 1:
            raise ShapeError(f"{model}: the model's output {list(y.shape)} is not one vector per image")
        return int(np.prod(y.shape[1:]))

    def uses_model(self, model: str | os.PathLike[str]) -> bool:
        """Whether `model` is byte for byte the model this index was built with."""
        return _sha256(model) == self._model_sha256

    def close(self) -> None:
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        what = f"{self.dim}-bit codes" if self.kind == "binary" else f"{self.dim}-d {self.metric} descriptors"
        return f"Collection({os.fspath(self.path)!r}: {len(self)} images, {what})"

    # ---------------------------------------------------------------- the code file
    def _code_path(self, generation: int) -> Path:
        return self.path / _code_file_name(self.kind, generation)

    def _remove_stale_code_files(self) -> None:
        """Code files of other generations: written but never committed, or replaced."""
        keep = _code_file_name(self.kind, self._generation)
        for p in self.path.iterdir():
            if p.name != keep and (p.name.startswith(("codes.", "vectors."))
                                   or (p.name.startswith(".") and p.name.endswith(".tmp"))):
                p.unlink(missing_ok=True)
        (self.path / (META_FILE + ".creating")).unlink(missing_ok=True)

    def _load_codes(self) -> None:
        for _attempt in range(5):
            self._db.execute("BEGIN")
            try:
                info = dict(self._db.execute("SELECT key, value FROM info").fetchall())
                ids = np.fromiter((r[0] for r in self._db.execute("SELECT id FROM images ORDER BY id")),
                                  np.int64)
            finally:
                self._db.execute("COMMIT")
            self._generation, self._next_id = int(info["generation"]), int(info["next_id"])
            code_path = self._code_path(self._generation)
            try:
                checksum = _header_checksum(code_path)
                if checksum != int(info["code_checksum"]):
                    raise IndexConsistencyError(
                        f"{self.path}: the code file {code_path.name} is not the one the metadata recorded "
                        "(its checksum differs): the index's parts disagree; rebuild it")
                index = self._read_code_file(code_path)
            except FileNotFoundError:
                # A writer may have moved on to the next generation between the two reads.
                gen_now = int(self._db.execute("SELECT value FROM info WHERE key='generation'").fetchone()[0])
                if gen_now != self._generation:
                    continue
                raise IndexConsistencyError(f"{self.path}: the code file {code_path.name} that the metadata "
                                            "names is missing; rebuild the index") from None
            self._check_agreement(index, ids)
            self.index = index
            return
        raise IndexConsistencyError(f"{self.path}: the index kept changing while it was being opened")

    def refresh(self) -> bool:
        """Re-reads the index if another process committed to it since it was opened (a server
        sees what `cbir index` adds while it runs); True when it changed."""
        row = self._db.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()
        if row is None or int(row[0]) == self._generation:
            return False
        self._load_codes()
        return True

    def _read_code_file(self, path: Path) -> Any:
        if self.kind == "binary":
            from cbir_engine.index import HammingIndex

            index = HammingIndex.load(path, mmap=False, threads=self._threads)
            if index.bits != self.dim:
                raise IndexConsistencyError(f"{self.path}: the code file holds {index.bits}-bit codes, the "
                                            f"metadata says {self.dim}")
            return index
        index = FloatIndex.load(path)
        if index.dim != self.dim:
            raise IndexConsistencyError(f"{self.path}: the vector file holds {index.dim}-d vectors, the "
                                        f"metadata says {self.dim}")
        return index

    def _check_agreement(self, index: Any, db_ids: np.ndarray) -> None:
        file_ids = np.sort(np.asarray(index.ids))
        if file_ids.shape == db_ids.shape and np.array_equal(file_ids, db_ids):
            return
        only_db = np.setdiff1d(db_ids, file_ids).size
        only_file = np.setdiff1d(file_ids, db_ids).size
        raise IndexConsistencyError(
            f"{self.path}: the metadata ({META_FILE}) lists {db_ids.size} images but the code file holds "
            f"{file_ids.size} codes ({only_db} ids only in the metadata, {only_file} only in the codes); "
            "the index's parts disagree; rebuild it (delete the folder and run `cbir index` again)")

    def _commit(self, rows: Sequence[Row], removed: Sequence[int]) -> None:
        """Makes the in-memory index (already holding `rows`' codes, without `removed`) and the
        metadata the next generation, atomically as a pair (see the module docstring)."""
        if not self.writable:
            raise CbirError("this index was opened read-only")
        with _signals_deferred():
            self._commit_now(rows, removed)

    def _commit_now(self, rows: Sequence[Row], removed: Sequence[int]) -> None:
        gen = self._generation + 1
        new_file = self._code_path(gen)
        self.index.save(new_file)
        checksum = _header_checksum(new_file)
        next_id = max([self._next_id, *(r.id + 1 for r in rows)])
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM images WHERE id = ?", [(int(i),) for i in removed])
            self._db.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?)",
                                 [(r.id, r.path, r.size, r.mtime_ns, r.label) for r in rows])
            self._db.executemany("UPDATE info SET value = ? WHERE key = ?",
                                 [(str(gen), "generation"), (str(next_id), "next_id"),
                                  (str(checksum), "code_checksum")])
            self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            new_file.unlink(missing_ok=True)
            raise
        old = self._code_path(self._generation)
        self._generation, self._next_id = gen, next_id
        old.unlink(missing_ok=True)

    # ---------------------------------------------------------------- metadata
    def rows(self, ids: Sequence[int] | None = None) -> dict[int, Row]:
        """Metadata rows by id (all of them when ids is None)."""
        if ids is None:
            cur = self._db.execute("SELECT id, path, size, mtime_ns, label FROM images ORDER BY id")
            return {r[0]: Row(*r) for r in cur}
        out: dict[int, Row] = {}
        wanted = [int(i) for i in ids]
        for s in range(0, len(wanted), 500):
            chunk = wanted[s:s + 500]
            marks = ",".join("?" * len(chunk))
            q = f"SELECT id, path, size, mtime_ns, label FROM images WHERE id IN ({marks})"
            out.update({r[0]: Row(*r) for r in self._db.execute(q, chunk)})
        return out

    def row(self, image_id: int) -> Row | None:
        return self.rows([image_id]).get(int(image_id))

    def list_rows(self, offset: int = 0, limit: int = 50) -> list[Row]:
        cur = self._db.execute("SELECT id, path, size, mtime_ns, label FROM images "
                               "ORDER BY id LIMIT ? OFFSET ?",
                               (int(limit), int(offset)))
        return [Row(*r) for r in cur]

    def info(self) -> dict[str, Any]:
        """What the index holds, for people and for the JSON API."""
        labels = self._db.execute(
            "SELECT count(DISTINCT label) FROM images WHERE label IS NOT NULL").fetchone()[0]
        return {"path": os.fspath(self.path), "images": len(self), "kind": self.kind, "dim": self.dim,
                "metric": self.metric, "labels": int(labels), "generation": self._generation,
                "input": f"{self.model_info.channels}x{self.model_info.height}x{self.model_info.width}"}

    # ---------------------------------------------------------------- embedding and search
    @property
    def engine(self) -> Any:
        if self._engine is None:
            import cbir_engine

            self._engine = cbir_engine.load(os.fspath(self.path / MODEL_FILE), threads=self._threads)
        return self._engine

    def embed(self, pixels: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Codes (uint8 [n, bits // 8]) or descriptors (float32 [n, dim]) of uint8 images
        [n, h, w, c] at the model's input size. With `batch_size`, a short batch is padded to it
        so the engine keeps one specialisation."""
        from cbir_engine.index import pack_bits

        n = pixels.shape[0]
        x = normalise(pixels, self.model_info)
        if batch_size and n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), np.float32)])
        with self._engine_lock:  # one executor per shape: runs are serialised
            y = np.asarray(self.engine(x))[:n].reshape(n, -1)
        if y.shape[1] != self.dim:
            raise ShapeError(f"the model gives {y.shape[1]} values per image, the index holds {self.dim}")
        if self.kind == "binary":
            return pack_bits(y)
        return np.ascontiguousarray(y, np.float32)

    def search_codes(self, codes: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k hits for each query code / descriptor (as `embed` returns them)."""
        if len(self) == 0:
            return [[] for _ in range(len(codes))]
        dist, ids = self.index.search(codes, min(int(k), len(self)))
        meta = self.rows(np.unique(ids).tolist())
        out = []
        for drow, irow in zip(dist, ids, strict=True):
            hits = []
            for r, (d, i) in enumerate(zip(drow, irow, strict=True)):
                m = meta.get(int(i))
                if m is None:  # the rows are read after the codes: a concurrent writer removed it
                    continue
                hits.append(Hit(r + 1, int(i), float(d), m.path, m.label))
            out.append(hits)
        return out

    def search_image(self, source: str | os.PathLike[str] | bytes, k: int = 10,
                     name: str | None = None) -> list[Hit]:
        """Top-k hits for one image file or encoded image bytes (ImageDecodeError if unreadable)."""
        pixels = load_pixels(source, self.model_info, name)[None]
        return self.search_codes(self.embed(pixels), k)[0]

    def search_id(self, image_id: int, k: int = 10) -> list[Hit]:
        """Top-k hits for an image already in the index (its stored code is the query)."""
        pos = np.flatnonzero(np.asarray(self.index.ids) == int(image_id))
        if pos.size == 0:
            raise KeyError(f"no image with id {image_id} in the index")
        stored = self.index.codes if self.kind == "binary" else self.index.vectors
        return self.search_codes(np.asarray(stored[pos[:1]]), k)[0]

    # ---------------------------------------------------------------- indexing a folder
    def _work_list(self, root: Path, prune: bool, report: IndexReport,
                   on_unreadable: Callable[[str, str], None] | None
                   ) -> tuple[list[tuple[str, os.stat_result, Row | None]], list[int]]:
        """What an update of `root` has to do: the new or changed images in walk order (path,
        stat, the row they replace) and the ids of indexed files under root that are gone
        (with `prune`). Counts found / unchanged / unreadable files in `report`."""
        known: dict[str, Row] = {r.path: r for r in self.rows().values()}
        todo: list[tuple[str, os.stat_result, Row | None]] = []
        seen: set[str] = set()
        for p in walk_images(root):
            key = os.fspath(p)
            seen.add(key)
            report.found += 1
            try:
                st = p.stat()
            except OSError as e:
                self._unreadable(report, on_unreadable, key, e.strerror or str(e))
                continue
            old = known.get(key)
            if old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
                report.unchanged += 1
            else:
                todo.append((key, st, old))
        gone = [r.id for path, r in known.items() if prune and path not in seen and _is_under(path, root)]
        return todo, gone

    def update(self, root: str | os.PathLike[str], *, batch_size: int = 64, checkpoint_every: int = 2000,
               labels: str = "parent", prune: bool = False, progress: Callable[[int], None] | None = None,
               on_unreadable: Callable[[str, str], None] | None = None,
               on_plan: Callable[[int], None] | None = None) -> IndexReport:
        """Adds the images under `root` that are new or changed since they were indexed (same path,
        other size or mtime), in sorted path order, `batch_size` at a time through the engine.
        Progress is committed every `checkpoint_every` images (and every 10% of the index, so
        rewriting the code file stays linear overall) and when interrupted (KeyboardInterrupt):
        a run that is stopped resumes where its last commit left off. Unreadable files are
        skipped and reported. `labels="parent"` stores each image's folder name (relative to
        root) as its label; "none" stores none. `prune` removes indexed files under root that
        are gone."""
        if not self.writable:
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
        todo, gone = self._work_list(root, prune, report, on_unreadable)
        if on_plan is not None:
            on_plan(len(todo))

        pending_rows: list[Row] = []
        pending_removed: list[int] = list(gone)
        batch_px: list[np.ndarray] = []
        batch_meta: list[tuple[str, os.stat_result, Row | None]] = []
        next_id = self._next_id

        def flush_batch() -> None:
            nonlocal next_id
            if not batch_px:
                return
            codes = self.embed(np.stack(batch_px), batch_size)
            ids = np.arange(next_id, next_id + len(batch_px), dtype=np.int64)
            olds = [int(old.id) for _, _, old in batch_meta if old is not None]
            with _signals_deferred():  # the codes and their rows join the pending work together
                if olds:
                    self.index.remove(olds)
                    pending_removed.extend(olds)
                self.index.add(codes, ids)
                for i, (key, st, old) in zip(ids, batch_meta, strict=True):
                    label = _label_of(key, root) if labels == "parent" else None
                    pending_rows.append(Row(int(i), key, int(st.st_size), int(st.st_mtime_ns), label))
                    if old is None:
                        report.added += 1
                    else:
                        report.updated += 1
                next_id += len(batch_px)
            if progress is not None:
                progress(len(batch_px))
            batch_px.clear()
            batch_meta.clear()

        def commit() -> None:
            if pending_rows or pending_removed:
                with _signals_deferred():  # committed work must leave the pending lists at once
                    self._commit(pending_rows, pending_removed)
                    pending_rows.clear()
                    pending_removed.clear()

        if gone:
            self.index.remove(gone)
            report.removed = len(gone)
        try:
            for key, st, old in todo:
                try:
                    px = load_pixels(key, self.model_info)
                except ImageDecodeError as e:
                    self._unreadable(report, on_unreadable, key, str(e).removeprefix(f"{key}: "))
                    if progress is not None:
                        progress(1)
                    continue
                batch_px.append(px)
                batch_meta.append((key, st, old))
                if len(batch_px) == batch_size:
                    flush_batch()
                    if len(pending_rows) >= max(checkpoint_every, len(self) // 10):
                        commit()
            flush_batch()
            commit()
        except KeyboardInterrupt:
            # Keep what is embedded: the codes already added and their rows go in together.
            batch_px.clear()
            batch_meta.clear()
            commit()
            report.interrupted = True
        report.seconds = time.perf_counter() - t0
        return report

    @staticmethod
    def _unreadable(report: IndexReport, callback: Callable[[str, str], None] | None, path: str,
                    reason: str) -> None:
        report.unreadable.append((path, reason))
        if callback is not None:
            callback(path, reason)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, queries: int = 1000, seed: int = 0, ks: Sequence[int] = (10, 100)) -> EvalResult:
        """Leave-one-out retrieval quality over the labelled images: `queries` of them (the same
        number per label, drawn with `seed`; all when there are fewer) each rank every other
        labelled image; relevant = same label. Gives mAP over the whole ranking and precision@k."""
        from cbir_engine.retrieval.metrics import mean_average_precision, precision_at

        rows = [r for r in self.rows().values() if r.label is not None]
        if len(rows) < 2:
            raise CbirError(f"{self.path}: evaluation needs labelled images (labels come from folder "
                            f"names); this index has {len(rows)}")
        names, y = np.unique([r.label for r in rows], return_inverse=True)
        row_ids = np.array([r.id for r in rows], np.int64)
        stored_ids = np.asarray(self.index.ids)
        order = np.argsort(stored_ids, kind="stable")
        pos = order[np.searchsorted(stored_ids, row_ids, sorter=order)]
        stored = self.index.codes if self.kind == "binary" else self.index.vectors
        data = np.asarray(stored)[pos]
        if self.kind == "binary":
            from cbir_engine.index import HammingIndex

            sub: Any = HammingIndex(self.dim, threads=self._threads)
            sub.add(data, np.arange(len(rows), dtype=np.int64))
        else:
            sub = FloatIndex(self.dim, self.metric)
            sub.add(data, np.arange(len(rows), dtype=np.int64))
        rng = np.random.default_rng(seed)
        if queries >= len(rows):
            q = np.arange(len(rows))
        else:
            per = max(1, queries // len(names))
            picks = [rng.permutation(np.flatnonzero(y == c))[:per] for c in range(len(names))]
            q = np.sort(np.concatenate(picks))
        n = len(rows)
        ap_sum, p_sum = 0.0, dict.fromkeys(ks, 0.0)
        for s in range(0, len(q), 100):
            qi = q[s:s + 100]
            _, ranked = sub.search(data[qi], n)
            # Leave the query out of its own ranking.
            keep = ranked != qi[:, None]
            ranked = ranked[keep].reshape(len(qi), n - 1)
            ap_sum += mean_average_precision(ranked, y[qi], y) * len(qi)
            for k in ks:
                p_sum[k] += precision_at(ranked, y[qi], y, min(k, n - 1)) * len(qi)
        return EvalResult(ap_sum / len(q), {k: v / len(q) for k, v in p_sum.items()}, len(q), n, len(names))


def _label_of(path: str, root: Path) -> str | None:
    rel = Path(path).relative_to(root)
    return rel.parent.as_posix() if len(rel.parts) > 1 else None


def _is_under(path: str, root: Path) -> bool:
    try:
        Path(path).relative_to(root)
        return True
    except ValueError:
        return False

