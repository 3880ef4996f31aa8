"""Fuses a residual Add into the node that computes one of its operands.

Add(conv(x), r) -> conv(x) with r added before the (later fused) activation; Add(Mul(x, s), r)
-> one Mul with r as a third input (the excitation scale and the residual of a
squeeze-and-excitation block in one pass over memory: the conv before that Mul cannot take the
residual, the scale comes between them). The producer chosen is the later one in execution
order, so `r` is already computed when it runs; shapes must match exactly (no broadcasting
through the epilogue).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cbir_engine.graph.ir import Graph, Node


def _fuse_adds(g: Graph, accepts: Callable[[Node, str], bool], attach: Callable[[Node, str], None]) -> bool:
    """Rewrites one Add at a time into an accepted producer of one of its operands."""
    changed = False
    while True:
        producers, consumers = g.producers(), g.consumers()
        position = {id(n): i for i, n in enumerate(g.nodes)}
        rewrite = None
        for add in g.nodes:
            if add.op != "Add" or add.attrs.get("activation") or len(add.inputs) != 2:
                continue
            out_shape = g.values[add.outputs[0]].shape
            if out_shape is None:
                continue
            best = None
            for k in (0, 1):
                x, r = add.inputs[k], add.inputs[1 - k]
                p = producers.get(x)
                if p is None or p.attrs.get("activation") or not accepts(p, r):
                    continue
                if len(consumers.get(x, [])) != 1 or x in g.outputs or x == r:
                    continue
                if g.values[x].shape != out_shape or g.values[r].shape != out_shape:
                    continue
                rp = producers.get(r)
                if rp is not None and position[id(rp)] >= position[id(p)]:
                    continue
                if best is None or position[id(p)] > position[id(best[0])]:
                    best = (p, r)
            if best is not None:
                rewrite = (add, *best)
                break
        if rewrite is None:
            return changed
        add, p, r = rewrite
        attach(p, r)
        p.outputs = list(add.outputs)
        g.remove_nodes([add])
        changed = True


def fuse_residual(g: Graph) -> bool:
    def accepts(conv: Node, r: str) -> bool:
        return conv.op == "Conv" and not conv.input(3)

    def attach(conv: Node, r: str) -> None:
        conv.inputs = [conv.inputs[0], conv.inputs[1], conv.input(2), r]

    return _fuse_adds(g, accepts, attach)


def fuse_residual_eltwise(g: Graph) -> bool:
    def accepts(mul: Node, r: str) -> bool:
        return (mul.op == "Mul" and len(mul.inputs) == 2 and r not in mul.inputs
                and all(g.values[v].dtype == np.float32 for v in (mul.outputs[0], r)))

    def attach(mul: Node, r: str) -> None:
        mul.inputs = [mul.inputs[0], mul.inputs[1], r]

    return _fuse_adds(g, accepts, attach)
