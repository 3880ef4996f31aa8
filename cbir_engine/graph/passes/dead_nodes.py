"""Removes nodes none of whose outputs reach a graph output."""

from __future__ import annotations

from cbir_engine.graph.ir import Graph


def remove_dead_nodes(g: Graph) -> bool:
    live = set(g.outputs)
    kept = []
    for n in reversed(g.nodes):
        if any(o in live for o in n.outputs if o):
            kept.append(n)
            live.update(i for i in n.inputs if i)
    removed = len(kept) != len(g.nodes)
    g.nodes = kept[::-1]
    # Constants nothing reads any more are dropped so their memory can go.
    used = live | set(g.inputs)
    for name in [k for k, v in g.values.items() if v.is_const and k not in used]:
        del g.values[name]
    return removed
