"""Folds a zero constant Pad of the spatial dims into the convolution that reads it."""

from __future__ import annotations

from cbir_engine.graph.ir import Graph
from cbir_engine.graph.ops import full_pads


def fuse_pad_into_conv(g: Graph) -> bool:
    producers = g.producers()
    consumers = g.consumers()
    changed = False
    for conv in list(g.nodes):
        if conv.op != "Conv" or conv.attrs.get("auto_pad", "NOTSET") != "NOTSET":
            continue
        pad = producers.get(conv.inputs[0])
        if pad is None or pad.op != "Pad" or pad.attrs.get("mode", "constant") != "constant":
            continue
        if pad.attrs.get("value", 0.0) != 0.0 or len(consumers.get(conv.inputs[0], [])) != 1:
            continue
        shape = g.values[pad.inputs[0]].shape
        if shape is None or conv.inputs[0] in g.outputs:
            continue
        r = len(shape)
        pads = full_pads(pad, r)
        if any(p != 0 for p in pads[:2] + pads[r:r + 2]) or any(p < 0 for p in pads):
            continue
        nsp = r - 2
        old = conv.attrs.get("pads") or [0] * (2 * nsp)
        conv.attrs["pads"] = [old[i] + pads[2 + i] for i in range(nsp)] + [
            old[nsp + i] + pads[r + 2 + i] for i in range(nsp)
        ]
        conv.inputs[0] = pad.inputs[0]
        g.remove_nodes([pad])
        changed = True
    return changed
