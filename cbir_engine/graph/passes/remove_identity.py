"""Removes Identity nodes (Dropout imports as Identity) by pointing consumers at the input."""

from __future__ import annotations

from cbir_engine.graph.ir import Graph


def remove_identity(g: Graph) -> bool:
    dead = [n for n in g.nodes if n.op == "Identity"]
    for n in dead:
        g.replace_uses(n.outputs[0], n.inputs[0])
    g.remove_nodes(dead)
    return bool(dead)
