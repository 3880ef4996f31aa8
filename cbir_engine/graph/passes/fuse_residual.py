"""Fuses a residual Add into the epilogue of one of the convolutions (or elementwise products)
feeding it.

Add(conv(x), r) -> conv(x) with r added before the (later fused) activation. The conv chosen is
the later one in execution order, so `r` is already computed when it runs; shapes must match
exactly (no broadcasting through the epilogue).
"""

from __future__ import annotations

import numpy as np

from cbir_engine.graph.ir import Graph


def fuse_residual(g: Graph) -> bool:
    producers = g.producers()
    consumers = g.consumers()
    position = {id(n): i for i, n in enumerate(g.nodes)}
    changed = False
    for add in list(g.nodes):
        if add.op != "Add" or add.attrs.get("activation") or len(add.inputs) != 2:
            continue
        out_shape = g.values[add.outputs[0]].shape
        if out_shape is None:
            continue
        best = None
        for k in (0, 1):
            x, r = add.inputs[k], add.inputs[1 - k]
            conv = producers.get(x)
            if conv is None or conv.op != "Conv" or conv.attrs.get("activation") or conv.input(3):
                continue
            if len(consumers.get(x, [])) != 1 or x in g.outputs or x == r:
                continue
            if g.values[x].shape != out_shape or g.values[r].shape != out_shape:
                continue
            rp = producers.get(r)
            if rp is not None and position[id(rp)] >= position[id(conv)]:
                continue
            if best is None or position[id(conv)] > position[id(best[0])]:
                best = (conv, r)
        if best is None:
            continue
        conv, r = best
        conv.inputs = [conv.inputs[0], conv.inputs[1], conv.input(2), r]
        conv.outputs = list(add.outputs)
        g.remove_nodes([add])
        producers = g.producers()
        consumers = g.consumers()
        position = {id(n): i for i, n in enumerate(g.nodes)}
        changed = True
    return changed


def fuse_residual_eltwise(g: Graph) -> bool:
    """Add(Mul(x, s), r) -> one Mul with r as a third input, added before the activation: the
    excitation scale and the residual of a squeeze-and-excitation block in one pass over memory
    (the conv before the Mul cannot take the residual: the scale comes between them)."""
    producers = g.producers()
    consumers = g.consumers()
    position = {id(n): i for i, n in enumerate(g.nodes)}
    changed = False
    for add in list(g.nodes):
        if add.op != "Add" or add.attrs.get("activation") or len(add.inputs) != 2:
            continue
        out_shape = g.values[add.outputs[0]].shape
        if out_shape is None:
            continue
        for k in (0, 1):
            x, r = add.inputs[k], add.inputs[1 - k]
            mul = producers.get(x)
            if mul is None or mul.op != "Mul" or mul.attrs.get("activation") or len(mul.inputs) != 2:
                continue
            if len(consumers.get(x, [])) != 1 or x in g.outputs or x == r or r in mul.inputs:
                continue
            if g.values[x].shape != out_shape or g.values[r].shape != out_shape:
                continue
            if any(g.values[v].dtype != np.float32 for v in (x, r)):
                continue
            rp = producers.get(r)
            if rp is not None and position[id(rp)] >= position[id(mul)]:
                continue
            mul.inputs = [mul.inputs[0], mul.inputs[1], r]
            mul.outputs = list(add.outputs)
            g.remove_nodes([add])
            producers = g.producers()
            consumers = g.consumers()
            position = {id(n): i for i, n in enumerate(g.nodes)}
            changed = True
            break
    return changed
