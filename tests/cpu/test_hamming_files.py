"""Index files: round trips, refusal of truncated or corrupted files, atomic save, mmap
without copies."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from cbir_engine.errors import IndexFileError
from cbir_engine.index import HammingIndex

REPO = Path(__file__).resolve().parents[2]


def make_index(bits: int, n: int, seed: int = 0, shuffled_ids: bool = False) -> HammingIndex:
    rng = np.random.default_rng(seed)
    index = HammingIndex(bits)
    ids = rng.permutation(3 * n)[:n].astype(np.int64) if shuffled_ids else None
    index.add(rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8), ids)
    return index


def same_index(a: HammingIndex, b: HammingIndex) -> None:
    assert a.bits == b.bits and len(a) == len(b)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.ids, b.ids)


@pytest.mark.parametrize("bits,n", [(8, 1), (96, 7), (64, 59), (256, 1023), (64, 0)])
@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip(tmp_path, bits, n, mmap):
    index = make_index(bits, n, seed=n, shuffled_ids=True)
    path = tmp_path / "codes.hidx"
    index.save(path)
    loaded = HammingIndex.load(path, mmap=mmap)
    same_index(index, loaded)
    assert loaded.is_mapped == mmap
    if n:
        q = np.random.default_rng(1).integers(0, 256, size=(3, bits // 8), dtype=np.uint8)
        for a, b in zip(index.search(q, n), loaded.search(q, n), strict=True):
            np.testing.assert_array_equal(a, b)


def test_changes_after_mmap_load_leave_the_file_alone(tmp_path):
    index = make_index(64, 500)
    path = tmp_path / "a.hidx"
    index.save(path)
    before = path.read_bytes()
    loaded = HammingIndex.load(path)
    loaded.add(np.zeros((2, 8), np.uint8))
    assert not loaded.is_mapped and len(loaded) == 502
    assert loaded.ids[-2:].tolist() == [500, 501]
    again = HammingIndex.load(path)
    assert again.remove(np.arange(10)) == 10 and len(again) == 490
    assert path.read_bytes() == before
    # Saving over the file an index is mapped from is fine (the old mapping keeps the old inode).
    mapped = HammingIndex.load(path)
    mapped.save(path)
    same_index(mapped, HammingIndex.load(path))


def test_truncated_files_are_refused_at_every_length(tmp_path):
    path = tmp_path / "t.hidx"
    make_index(96, 37).save(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.hidx"
    for length in sorted({0, 1, 7, 8, 63, 64, 65, len(data) // 2, len(data) - 8, len(data) - 1}):
        cut.write_bytes(data[:length])
        for mmap in (True, False):
            with pytest.raises(IndexFileError, match="truncated|magic"):
                HammingIndex.load(cut, mmap=mmap)
    cut.write_bytes(data + b"\0")
    with pytest.raises(IndexFileError, match="trailing"):
        HammingIndex.load(cut)


def test_every_corrupted_byte_is_caught(tmp_path):
    path = tmp_path / "c.hidx"
    make_index(64, 20, shuffled_ids=True).save(path)
    data = bytearray(path.read_bytes())
    bad = tmp_path / "bad.hidx"
    for offset in range(len(data)):
        flipped = bytearray(data)
        flipped[offset] ^= 0x10
        bad.write_bytes(bytes(flipped))
        with pytest.raises(IndexFileError):
            HammingIndex.load(bad)


def test_foreign_and_newer_files_are_named_as_such(tmp_path):
    path = tmp_path / "v.hidx"
    make_index(64, 5).save(path)
    data = bytearray(path.read_bytes())
    other = tmp_path / "o.hidx"
    other.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(IndexFileError, match="magic"):
        HammingIndex.load(other)
    newer = bytearray(data)
    newer[8:12] = struct.pack("<I", 2)
    newer[60:64] = struct.pack("<I", zlib.crc32(bytes(newer[:60])) & 0xFFFFFFFF)  # a valid header
    other.write_bytes(bytes(newer))
    with pytest.raises(IndexFileError, match="version 2"):
        HammingIndex.load(other)


WRITER = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    from cbir_engine.index import HammingIndex

    path, crash_point = sys.argv[1], sys.argv[2]
    index = HammingIndex(64)
    index.add(np.full((200_000, 8), 7, dtype=np.uint8))

    def crash_here(*args, **kwargs):
        print("about to crash", flush=True)
        time.sleep(120)  # the test kills us here

    if crash_point == "before-rename":
        os.fsync = crash_here  # everything written, nothing synced or renamed
    else:
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, f):
                self.f, self.written = f, 0

            def write(self, b):
                b = memoryview(b).cast("B")
                if self.written + len(b) > 400_000:
                    self.f.write(b[: 400_000 - self.written])
                    self.f.flush()
                    crash_here()
                self.written += len(b)
                return self.f.write(b)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

        os.fdopen = lambda *a, **k: HalfWriter(real_fdopen(*a, **k))
    index.save(path)
    print("saved without crashing", flush=True)
    """
)


@pytest.mark.parametrize("crash_point", ["mid-write", "before-rename"])
def test_killed_writer_leaves_previous_file_intact(tmp_path, crash_point):
    path = tmp_path / "live.hidx"
    previous = make_index(64, 1000, seed=3)
    previous.save(path)
    before = path.read_bytes()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), crash_point],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert writer.stdout.readline().strip() == "about to crash"
        # The writer is in the middle of its save: a temporary file next to the target.
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        writer.send_signal(signal.SIGKILL)
        assert writer.wait(timeout=30) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
    assert path.read_bytes() == before
    same_index(previous, HammingIndex.load(path))


MMAP_PROBE = textwrap.dedent(
    """
    import sys
    import numpy as np
    from cbir_engine.index import HammingIndex

    def rss_anon_kib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    before = rss_anon_kib()
    index = HammingIndex.load(sys.argv[1], mmap=True, method="flat")
    d, i = index.search(np.zeros((1, 8), np.uint8), 5)
    after = rss_anon_kib()
    print(len(index), index.is_mapped, after - before, int(d[0, 0]))
    """
)


def test_mmap_load_of_10m_codes_does_not_copy(tmp_path):
    n = 10_000_000
    path = tmp_path / "big.hidx"
    index = HammingIndex(64)
    codes = np.random.default_rng(0).integers(0, 256, size=(n, 8), dtype=np.uint8)
    codes[n // 2] = 0
    index.add(codes)
    del codes
    index.save(path)
    file_mib = path.stat().st_size / 2**20
    del index
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", MMAP_PROBE, str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    count, mapped, grown_kib, nearest = out.stdout.split()
    assert int(count) == n and mapped == "True" and int(nearest) == 0
    # Reading 160 MB of file through the mapping leaves anonymous memory (copies) near zero.
    assert int(grown_kib) / 1024 < 0.1 * file_mib, f"anonymous memory grew by {int(grown_kib) / 1024:.0f} MiB"
