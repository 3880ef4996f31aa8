"""Saved plans: the optimised graph with its constants and prepacked weights, in one file that
loads with a memory map (no copies, no repacking).

Layout (little-endian):
    0   8  magic b"CBIRPLAN"
    8   4  format version
   12   4  reserved (0)
   16   8  metadata length (bytes of UTF-8 JSON)
   24   8  data length
   32   4  CRC-32 of the metadata
   36   4  CRC-32 of the data: the CRC of the CRC-32s of its 8 MiB chunks (so that loading can
           check the chunks on several threads)
   40   4  CRC-32 of bytes 0..39
   44  20  zero
   64      metadata, zero padding to a multiple of 64, then the arrays, each 64-byte aligned
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from typing import Any

import numpy as np

from cbir_engine.errors import PlanFileError
from cbir_engine.fileio import atomic_write
from cbir_engine.graph.ir import Graph, Node, Value

MAGIC = b"CBIRPLAN"
# Bumped whenever the packed weight layouts change, or a saved graph may hold what an older build
# would misread: version 4 lets an AveragePool carry a folded BatchNorm (inputs 1 and 2), which a
# version-3 reader would drop. Graphs of version 3 are version-4 graphs without it.
VERSION = 4
READABLE = (3, 4)
CHUNK = 8 << 20
HEADER = struct.Struct("<8sIIQQII")  # magic, version, reserved, meta len, data len, meta crc, data crc
HEADER_BYTES = 64


def _align(n: int) -> int:
    return (n + 63) // 64 * 64


class _ChunkedCrc:
    """CRC-32 per CHUNK bytes of a stream, combined as the CRC of the chunk CRCs."""

    def __init__(self) -> None:
        self.crcs: list[int] = []
        self.crc = 0
        self.fill = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(CHUNK - self.fill, len(view))
            self.crc = zlib.crc32(view[:take], self.crc)
            self.fill += take
            view = view[take:]
            if self.fill == CHUNK:
                self.crcs.append(self.crc)
                self.crc, self.fill = 0, 0

    def value(self) -> int:
        crcs = self.crcs + ([self.crc] if self.fill else [])
        return zlib.crc32(struct.pack(f"<{len(crcs)}I", *crcs))


def _verify_chunks(data: memoryview) -> int:
    """The chunked CRC of `data`, chunks checked on all CPUs (zlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    n = (len(data) + CHUNK - 1) // CHUNK
    with ThreadPoolExecutor(max(1, min(n, os.cpu_count() or 1))) as pool:
        crcs = list(pool.map(lambda i: zlib.crc32(data[i * CHUNK:(i + 1) * CHUNK]), range(n)))
    return zlib.crc32(struct.pack(f"<{n}I", *crcs))


class _Arrays:
    """Collects arrays for the data section and encodes attribute values as JSON."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []
        self.ids: dict[int, int] = {}

    def add(self, a: np.ndarray) -> int:
        key = id(a)
        if key not in self.ids:
            self.ids[key] = len(self.arrays)
            self.arrays.append(np.asarray(a, order="C"))
        return self.ids[key]

    def encode(self, v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return {"__array__": self.add(v)}
        if isinstance(v, np.dtype):
            return {"__dtype__": v.str}
        if isinstance(v, (np.integer, np.floating)):
            return v.item()
        if isinstance(v, dict):
            return {"__dict__": {k: self.encode(x) for k, x in v.items()}}
        if isinstance(v, (list, tuple)):
            return [self.encode(x) for x in v]
        return v


def _decode(v: Any, arrays: list[np.ndarray]) -> Any:
    if isinstance(v, dict):
        if "__array__" in v:
            return arrays[v["__array__"]]
        if "__dtype__" in v:
            return np.dtype(v["__dtype__"])
        return {k: _decode(x, arrays) for k, x in v["__dict__"].items()}
    if isinstance(v, list):
        return [_decode(x, arrays) for x in v]
    return v


def save_plan(path: str | os.PathLike, graph: Graph, packed: dict[tuple[str, str], np.ndarray],
              packed_only: set[str], opset: int | None) -> None:
    """Writes the graph and the packed weights atomically. The constants in `packed_only` (read
    by the kernels only in packed form) are stored packed, not raw."""
    arrays = _Arrays()
    packed_names = packed_only
    values = {}
    for name, v in graph.values.items():
        shape = list(v.shape) if v.shape is not None else None
        entry: dict[str, Any] = {"dtype": v.dtype.str, "shape": shape}
        if v.const is not None:
            if name in packed_names:
                entry["packed_only"] = True  # placeholder: the packed weight stands in for it
            else:
                entry["const"] = arrays.add(v.const)
        values[name] = entry
    meta = {
        "opset": opset,
        "inputs": graph.inputs,
        "outputs": graph.outputs,
        "output_names": graph.output_names,
        "values": values,
        "nodes": [
            {"op": n.op, "inputs": n.inputs, "outputs": n.outputs, "attrs": arrays.encode(n.attrs),
             "name": n.name, "origin": n.origin, "opset": n.opset}
            for n in graph.nodes
        ],
        "packed": [{"name": k[0], "kind": k[1], "array": arrays.add(a)} for k, a in packed.items()],
    }
    layout = []
    offset = 0
    for a in arrays.arrays:
        layout.append({"offset": offset, "dtype": a.dtype.str, "shape": list(a.shape)})
        offset = _align(offset + a.nbytes)
    meta["arrays"] = layout
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    data_len = offset
    pad_meta = _align(len(meta_bytes)) - len(meta_bytes)

    def data_parts():
        pos = 0
        for a, entry in zip(arrays.arrays, layout, strict=True):
            if entry["offset"] > pos:
                yield b"\0" * (entry["offset"] - pos)
            yield memoryview(a.reshape(-1).view(np.uint8))
            pos = entry["offset"] + a.nbytes
        if data_len > pos:
            yield b"\0" * (data_len - pos)

    crc = _ChunkedCrc()
    for part in data_parts():
        crc.update(part)
    head = HEADER.pack(MAGIC, VERSION, 0, len(meta_bytes), data_len, zlib.crc32(meta_bytes), crc.value())
    head += struct.pack("<I", zlib.crc32(head))
    head += b"\0" * (HEADER_BYTES - len(head))
    atomic_write(path, [head, meta_bytes, b"\0" * pad_meta, *data_parts()])


def is_plan_file(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def load_plan(path: str | os.PathLike, verify: bool = True
              ) -> tuple[Graph, dict[tuple[str, str], np.ndarray], set[str], int | None]:
    """Reads a plan file (memory-mapped). Returns the graph, the packed weights, the names of
    constants stored only in packed form, and the opset. PlanFileError if anything is off."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_BYTES:
            raise PlanFileError(f"{path}: {size} bytes is too short for a plan file")
        # MAP_POPULATE maps every page now, in bulk, rather than one fault at a time later.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        buf = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
    head = bytes(buf[:HEADER_BYTES])
    magic, version, _, meta_len, data_len, meta_crc, data_crc = HEADER.unpack_from(head)
    (head_crc,) = struct.unpack_from("<I", head, HEADER.size)
    if magic != MAGIC:
        raise PlanFileError(f"{path}: not a cbir-engine plan file")
    if zlib.crc32(head[:HEADER.size]) != head_crc:
        raise PlanFileError(f"{path}: header checksum mismatch (corrupted file)")
    if version not in READABLE:
        raise PlanFileError(f"{path}: plan format version {version}, this build reads "
                            + " and ".join(str(v) for v in READABLE))
    data_start = HEADER_BYTES + _align(meta_len)
    if data_start + data_len != size:
        raise PlanFileError(f"{path}: {size} bytes, the header promises {data_start + data_len} "
                            "(truncated or padded file)")
    meta_bytes = bytes(buf[HEADER_BYTES:HEADER_BYTES + meta_len])
    if zlib.crc32(meta_bytes) != meta_crc:
        raise PlanFileError(f"{path}: metadata checksum mismatch (corrupted file)")
    # The padding is part of the format too: anything but zeros there is corruption.
    if any(head[HEADER.size + 4:]) or any(buf[HEADER_BYTES + meta_len:data_start]):
        raise PlanFileError(f"{path}: non-zero padding (corrupted file)")
    data = memoryview(buf)[data_start:data_start + data_len]
    if verify and _verify_chunks(data) != data_crc:
        raise PlanFileError(f"{path}: weight checksum mismatch (corrupted file)")
    try:
        meta = json.loads(meta_bytes)
        arrays = []
        for a in meta["arrays"]:
            dtype = np.dtype(a["dtype"])
            count = int(np.prod(a["shape"], dtype=np.int64))
            if a["offset"] < 0 or a["offset"] + count * dtype.itemsize > data_len:
                raise PlanFileError(f"{path}: array outside the data section")
            arr = np.frombuffer(data, dtype, count, a["offset"]).reshape(a["shape"])
            arrays.append(arr)
        g = Graph()
        packed_only: set[str] = set()
        for name, v in meta["values"].items():
            shape = tuple(v["shape"]) if v["shape"] is not None else None
            value = Value(name, np.dtype(v["dtype"]), shape)
            if "const" in v:
                value.const = arrays[v["const"]]
            elif v.get("packed_only"):
                # Keeps the value constant for the passes; its bytes are only the packed ones.
                value.const = np.broadcast_to(np.zeros((), value.dtype), shape or ())
                packed_only.add(name)
            g.values[name] = value
        g.inputs, g.outputs, g.output_names = meta["inputs"], meta["outputs"], meta["output_names"]
        g.nodes = [Node(n["op"], n["inputs"], n["outputs"], _decode(n["attrs"], arrays), n["name"],
                        n["origin"], n["opset"]) for n in meta["nodes"]]
        packed = {(p["name"], p["kind"]): arrays[p["array"]] for p in meta["packed"]}
        for name in g.inputs + g.outputs + [i for n in g.nodes for i in n.inputs + n.outputs if i]:
            if name not in g.values:
                raise PlanFileError(f"{path}: value '{name}' is used but not described")
    except PlanFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise PlanFileError(f"{path}: malformed plan metadata ({type(e).__name__}: {e})") from e
    return g, packed, packed_only, meta.get("opset")
