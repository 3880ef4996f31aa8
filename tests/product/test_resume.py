"""`cbir index` killed mid-way resumes, and the result is the index an uninterrupted run makes."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cbir_engine.demo import write_pngs
from cbir_engine.store import Collection
from tests.product.helpers import run_cli

N_IMAGES = 2000
INDEX_ARGS = ("--batch-size", "16", "--checkpoint-every", "64", "--threads", "1", "--no-progress")


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory, fashion) -> Path:
    x, y, names = fashion
    root = tmp_path_factory.mktemp("resume") / "images"
    write_pngs(x[:N_IMAGES], y[:N_IMAGES], root, names)
    return root


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, big_folder, hash_model) -> Path:
    out = tmp_path_factory.mktemp("full") / "full.index"
    run_cli("index", str(big_folder), "--model", str(hash_model), "-o", str(out), *INDEX_ARGS)
    return out


def _generation(index: Path) -> int:
    """The committed generation, read as another process would (0 before the first commit)."""
    if not (index / "meta.sqlite").exists():
        return -1
    try:
        db = sqlite3.connect(f"file:{index / 'meta.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return -1
    return int(row[0]) if row else -1


def _start_and_stop(folder: Path, model: Path, out: Path, sig: int, after_generation: int) -> int:
    """Starts `cbir index`, sends `sig` once `after_generation` commits are on disk, returns the
    exit status (its stderr is printed, so a failing assertion on the status shows why)."""
    cmd = [sys.executable, "-m", "cbir_engine.cli", "index", str(folder), "--model", str(model),
           "-o", str(out), *INDEX_ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while _generation(out) < after_generation:
            if proc.poll() is not None:
                raise AssertionError(f"cbir index ended before it was stopped: {proc.communicate()}")
            if time.monotonic() > deadline:
                raise AssertionError("cbir index made no progress in 120 s")
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        print(err.decode(errors="replace")[-4000:], file=sys.stderr)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


def _contents(index: Path) -> tuple[dict, dict]:
    with Collection.open(index) as c:
        rows = {i: (r.path, r.size, r.mtime_ns, r.label) for i, r in c.rows().items()}
        codes = {int(i): bytes(code) for i, code in zip(c.index.ids, np.asarray(c.index.codes), strict=True)}
    return rows, codes


@pytest.mark.slow
def test_killed_index_run_resumes_to_the_same_index(tmp_path, big_folder, hash_model, uninterrupted):
    out = tmp_path / "resumed.index"
    rc = _start_and_stop(big_folder, hash_model, out, signal.SIGKILL, after_generation=3)
    assert rc == -signal.SIGKILL
    with Collection.open(out) as c:
        committed = len(c)
    assert 0 < committed < N_IMAGES, "the run was not stopped mid-way"

    proc = run_cli("index", str(big_folder), "--model", str(hash_model), "-o", str(out), *INDEX_ARGS)
    assert f"{N_IMAGES - committed} added, 0 updated, {committed} unchanged" in proc.stdout
    assert _contents(out) == _contents(uninterrupted)
    # The orphaned code file of the killed run (if any) is gone: one code file remains.
    assert len([p for p in out.iterdir() if p.name.startswith("codes.")]) == 1


@pytest.mark.slow
def test_sigterm_commits_what_is_done(tmp_path, big_folder, hash_model, uninterrupted):
    out = tmp_path / "stopped.index"
    rc = _start_and_stop(big_folder, hash_model, out, signal.SIGTERM, after_generation=2)
    assert rc == 130
    gen_after_stop = _generation(out)
    assert gen_after_stop >= 2
    with Collection.open(out) as c:
        committed = len(c)
    assert 0 < committed < N_IMAGES
    run_cli("index", str(big_folder), "-o", str(out), *INDEX_ARGS)
    assert _contents(out) == _contents(uninterrupted)
