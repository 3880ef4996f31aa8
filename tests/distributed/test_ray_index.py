"""Indexing on Ray gives the single-process index bit for bit: same ids, codes, code file bytes
and metadata rows; also when an embedding actor is killed mid-run (Ray Data replaces it), and
when the driver (`cbir index --ray`) is killed mid-run and the command is run again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cbir_engine.distributed import RayOptions, index_folder
from cbir_engine.store import Collection
from tests.distributed.conftest import index_contents

# Fractional CPUs: 2 logical CPUs in the cluster, and the reading tasks need some of them too.
TWO_ACTORS = RayOptions(actors=2, cpus_per_actor=0.5, cpus_per_reader=0.25)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fashion_folder: Path, hash_model: Path) -> Path:
    """The single-process index of the folder, as `cbir index` builds it."""
    out = tmp_path_factory.mktemp("single") / "single.index"
    t0 = time.perf_counter()
    with Collection.create(out, hash_model) as c:
        rep = c.update(fashion_folder, batch_size=64)
    seconds = time.perf_counter() - t0
    print(f"\nsingle process: {rep.added} images in {seconds:.1f} s ({rep.added / seconds:.0f} images/s)")
    return out


def _code_file(index: Path) -> bytes:
    (f,) = sorted(index.glob("codes.*.hidx"))
    return f.read_bytes()


def assert_same_index(got: Path, want: Path) -> None:
    gi, gc, gr = index_contents(got)
    wi, wc, wr = index_contents(want)
    assert gi.shape == wi.shape and np.array_equal(gi, wi), "ids differ"
    assert np.array_equal(gc, wc), f"{int((gc != wc).any(axis=1).sum())} codes differ"
    assert gr == wr, "metadata rows differ"
    assert _code_file(got) == _code_file(want), "code files differ"


def _embedder_pids(cluster) -> list[int]:
    """Pids of the Ray Data embedding actors (their process titles name the Embedder class)."""
    found = []
    for pid in cluster.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if b"Embedder" in title:
            found.append(pid)
    return found


def test_two_actor_index_equals_single_process(ray_cluster, fashion_folder, hash_model, reference, tmp_path):
    out = tmp_path / "ray.index"
    t0 = time.perf_counter()
    rep = index_folder(fashion_folder, out, model=hash_model, options=TWO_ACTORS, batch_size=64)
    seconds = time.perf_counter() - t0
    print(f"\nRay, 2 actors x 0.5 CPU on 2 nodes: {rep.added} images in {seconds:.1f} s "
          f"({rep.added / seconds:.0f} images/s)")
    n_png = sum(1 for _ in fashion_folder.rglob("*.png")) - 1
    assert rep.added == n_png and rep.updated == 0 and not rep.interrupted
    assert [os.path.basename(p) for p, _ in rep.unreadable] == ["broken.png"]
    assert_same_index(out, reference)
    # Running again finds nothing to do, as a single-process run would.
    again = index_folder(fashion_folder, out, options=TWO_ACTORS)
    assert again.added == 0 and again.unchanged == n_png
    assert_same_index(out, reference)


def test_killed_actor_is_replaced_and_the_index_is_the_same(ray_cluster, fashion_folder, hash_model,
                                                             reference, tmp_path):
    out = tmp_path / "actor_killed.index"
    killed: list[int] = []
    folded = 0

    def kill_one_actor_early(n: int) -> None:
        nonlocal folded
        folded += n
        if not killed and folded >= 256:
            pids = _embedder_pids(ray_cluster)
            assert pids, "no embedding actor process found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    rep = index_folder(fashion_folder, out, model=hash_model, options=TWO_ACTORS, checkpoint_every=128,
                       progress=kill_one_actor_early)
    assert killed and folded == rep.added + len(rep.unreadable)
    assert killed[0] not in _embedder_pids(ray_cluster)
    assert_same_index(out, reference)


def _committed(index: Path) -> int:
    try:
        with Collection.open(index) as c:
            return len(c)
    except Exception:  # not created yet, or between the creation's steps
        return 0


def test_cli_run_killed_mid_way_resumes_to_the_same_index(ray_cluster, fashion_folder, hash_model, reference,
                                                          tmp_path):
    """`cbir index --ray` as a separate driver process, killed (SIGKILL) once it has committed
    some images; running the same command again completes the index. The first run pauses after
    each commit (a test-only setting), so the kill lands mid-way however fast the machine is."""
    out = tmp_path / "cli.index"
    env = {**os.environ, **ray_cluster.env(), "CBIR_TEST_PAUSE_AFTER_COMMIT": "30"}
    cmd = [sys.executable, "-m", "cbir_engine.cli", "index", str(fashion_folder), "--model", str(hash_model),
           "-o", str(out), "--ray", ray_cluster.address, "--ray-actors", "2", "--ray-actor-cpus", "0.5",
           "--checkpoint-every", "128", "--no-progress"]
    total = len(index_contents(reference)[0])
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while _committed(out) == 0 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before it could be killed: " + \
            first.stdout.read().decode()[-2000:]
        first.kill()
    finally:
        first.wait(timeout=60)
        first.stdout.close()
    partial = _committed(out)
    assert 0 < partial < total
    ids, codes, _ = index_contents(out)
    want_ids, want_codes, _ = index_contents(reference)
    assert np.array_equal(ids, want_ids[:partial]) and np.array_equal(codes, want_codes[:partial])

    env.pop("CBIR_TEST_PAUSE_AFTER_COMMIT")
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{total - partial} added" in second.stdout and "1 unreadable (skipped)" in second.stdout
    assert_same_index(out, reference)


def test_bad_options_are_refused():
    from cbir_engine.distributed import RayOptionsError

    with pytest.raises(RayOptionsError):
        RayOptions(actors=0)
    with pytest.raises(RayOptionsError):
        RayOptions(cpus_per_actor=float("nan"))
    with pytest.raises(RayOptionsError):
        RayOptions(threads_per_actor=0)
