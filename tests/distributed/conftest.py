"""Fixtures of the distributed tests: a local Ray cluster (a head and a worker node on loopback,
one CPU each, dashboard UI and usage statistics off, one auth token on both nodes and in this
process), started once per test module and stopped by killing exactly the processes it started;
and a folder of Fashion-MNIST images written as PNG files.

CBIR_RAY_IMAGES sets the folder's size (default 3000, what CI runs; the issue's 20,000-image run
is `CBIR_RAY_IMAGES=20000 pytest tests/distributed/test_ray_index.py`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="the distributed extra is not installed")
pytest.importorskip("PIL")

from cbir_engine.demo import ASSET, write_pngs  # noqa: E402
from cbir_engine.distributed import LocalRayCluster  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalRayCluster]:
    """A 2-node cluster with this process connected as its driver."""
    import ray

    if ray.is_initialized():  # another module's cluster must be gone before this one starts
        ray.shutdown()
    cluster = LocalRayCluster(nodes=2, cpus_per_node=1, object_store_mb=256)
    cluster.start()
    try:
        cluster.connect()
    except BaseException:
        cluster.stop(keep_logs=True)  # the error names the log folder
        raise
    try:
        yield cluster
    finally:
        ray.shutdown()
        started = cluster.pids()
        cluster.stop()
        alive = [p for p in started if _alive(p)]
        assert not alive, f"processes of the test cluster still running: {alive}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state != b"Z"


@pytest.fixture(scope="session")
def hash_model() -> Path:
    """The committed 48-bit hashing model of the demo."""
    if not ASSET.is_file():
        pytest.skip(f"{ASSET} is missing")
    return ASSET


@pytest.fixture(scope="session")
def fashion_folder(tmp_path_factory) -> Path:
    """CBIR_RAY_IMAGES Fashion-MNIST training images as PNG files in class folders, plus one file
    that is not an image (both kinds of run must skip it the same way). Read-only for tests."""
    from cbir_engine.data import FASHION_MNIST_CLASSES, DatasetUnavailableError, fashion_mnist

    n = int(os.environ.get("CBIR_RAY_IMAGES", "3000"))
    try:
        x, y = fashion_mnist("train")
    except DatasetUnavailableError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("fashion") / "images"
    write_pngs(x[:n], y[:n], root, FASHION_MNIST_CLASSES)
    (root / "Bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    return root


def index_contents(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(ids, codes, metadata rows) of an on-disk index, ids and codes in stored order."""
    from cbir_engine.store import Collection

    with Collection.open(path) as c:
        return np.array(c.index.ids), np.array(c.index.codes), c.rows()
