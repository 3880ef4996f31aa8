"""Saved plans: same outputs as the engine they came from; corruption and truncation refused;
saving is atomic."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import cbir_engine
from cbir_engine.errors import PlanFileError
from tests.helpers import resnet_block_model


@pytest.fixture()
def engine() -> cbir_engine.Engine:
    return cbir_engine.load(resnet_block_model().SerializeToString())


def test_round_trip_gives_identical_outputs(engine, tmp_path) -> None:
    path = tmp_path / "block.plan"
    engine.save(path)
    loaded = cbir_engine.load(path, threads=1)
    x = np.random.default_rng(0).standard_normal((3, 8, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x), engine(x))
    assert loaded.output_names == engine.output_names and loaded.input_names == engine.input_names
    # Conv weights travel only in packed form.
    assert loaded._packed_only and all(n in {k[0] for k in loaded._packed} for n in loaded._packed_only)


def test_plan_of_every_batch_size(engine, tmp_path) -> None:
    path = tmp_path / "block.plan"
    engine.save(path)
    loaded = cbir_engine.load(path)
    for batch in (1, 5):
        x = np.ones((batch, 8, 6, 6), np.float32)
        np.testing.assert_array_equal(loaded(x), engine(x))


def test_truncated_plan_is_refused(engine, tmp_path) -> None:
    path = tmp_path / "block.plan"
    engine.save(path)
    data = path.read_bytes()
    for cut in (10, 63, 64, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.plan"
        bad.write_bytes(data[:cut])
        with pytest.raises(PlanFileError):
            cbir_engine.load(bad)


def test_corrupted_plan_is_refused(engine, tmp_path) -> None:
    path = tmp_path / "block.plan"
    engine.save(path)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(3)
    positions = list(range(0, 64, 3)) + list(rng.integers(64, len(data), 40))
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        p = tmp_path / "bad.plan"
        p.write_bytes(bytes(bad))
        if bytes(bad[:8]) != b"CBIRPLAN":  # a broken magic reads as an ONNX file that is not one
            with pytest.raises(cbir_engine.ModelFormatError):
                cbir_engine.load(p)
            continue
        with pytest.raises(PlanFileError):
            cbir_engine.load(p)


def _with_version(data: bytes, version: int) -> bytes:
    """The plan file with another format version in its header (and the header's CRC redone)."""
    import struct
    import zlib

    from cbir_engine.plan.serialize import HEADER

    head = bytearray(data[:HEADER.size])
    struct.pack_into("<I", head, 8, version)
    return bytes(head) + struct.pack("<I", zlib.crc32(bytes(head))) + data[HEADER.size + 4:]


def test_plan_format_versions(engine, tmp_path) -> None:
    """Version 3 files (before an AveragePool could carry a folded BatchNorm) still load; other
    versions are refused by name, never misread."""
    path = tmp_path / "block.plan"
    engine.save(path)
    data = path.read_bytes()
    v3 = tmp_path / "v3.plan"
    v3.write_bytes(_with_version(data, 3))
    x = np.random.default_rng(1).standard_normal((2, 8, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(cbir_engine.load(v3)(x), engine(x))
    for version in (2, 5):
        bad = tmp_path / f"v{version}.plan"
        bad.write_bytes(_with_version(data, version))
        with pytest.raises(PlanFileError, match=f"version {version}, this build reads 3 and 4"):
            cbir_engine.load(bad)


def test_failed_save_keeps_the_old_file(engine, tmp_path, monkeypatch) -> None:
    path = tmp_path / "block.plan"
    engine.save(path)
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        engine.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["block.plan"]  # no temporary left behind


def test_killed_writer_leaves_the_previous_plan_intact(tmp_path) -> None:
    path = tmp_path / "big.plan"
    small = cbir_engine.load(resnet_block_model().SerializeToString())
    small.save(path)
    before = path.read_bytes()
    # A writer with ~400 MB of weights, killed while it writes.
    code = f"""
import numpy as np, onnx
from onnx import helper, numpy_helper, TensorProto
import cbir_engine
w = np.ones((10000, 10000), np.float32)
g = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"])], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10000])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
e = cbir_engine.load(m)
print("saving", flush=True)
e.save({str(path)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.read_bytes() == before
    x = np.ones((1, 8, 6, 6), np.float32)
    np.testing.assert_array_equal(cbir_engine.load(path)(x), small(x))
