"""Removes nodes that copy their input: Identity (Dropout imports as Identity) and 1x1 pools with
stride 1 and no padding (adaptive pooling to the input's own size exports as those)."""

from __future__ import annotations

from cbir_engine.graph.ir import Graph, Node


def _is_noop_pool(n: Node) -> bool:
    if n.op not in ("MaxPool", "AveragePool") or len(n.outputs) != 1:
        return False
    a = n.attrs
    k = a.get("kernel_shape") or []
    return (bool(k) and all(v == 1 for v in k) and all(v == 1 for v in (a.get("strides") or [1]))
            and not any(a.get("pads") or [0]))


def remove_identity(g: Graph) -> bool:
    dead = [n for n in g.nodes if n.op == "Identity" or _is_noop_pool(n)]
    for n in dead:
        g.replace_uses(n.outputs[0], n.inputs[0])
    g.remove_nodes(dead)
    return bool(dead)
