"""Fuses an activation into the epilogue of the node that feeds it (conv, Gemm, elementwise).

The producer must have no other consumer and not be a graph output, since its pre-activation
value disappears.
"""

from __future__ import annotations

import numpy as np

from cbir_engine.graph.ir import Graph, Node

# Activations the kernel epilogues implement, with the attributes they take.
FUSABLE_ACTS = {"Relu", "Clip", "LeakyRelu", "Sigmoid"}
# Producers whose kernels have an epilogue.
EPILOGUE_OPS = {"Conv", "Gemm", "Add", "Sub", "Mul", "Div", "Max", "Min", "BatchNormalization"}


def activation_attrs(act: Node) -> dict:
    if act.op == "Clip":
        lo, hi = act.attrs.get("min"), act.attrs.get("max")
        return {"min": lo, "max": hi}
    if act.op == "LeakyRelu":
        return {"alpha": act.attrs.get("alpha", 0.01)}
    return {}


def fuse_activation(g: Graph) -> bool:
    producers = g.producers()
    consumers = g.consumers()
    changed = False
    for act in list(g.nodes):
        if act.op not in FUSABLE_ACTS:
            continue
        x = act.inputs[0]
        p = producers.get(x)
        if p is None or p.op not in EPILOGUE_OPS or p.attrs.get("activation"):
            continue
        if len(consumers.get(x, [])) != 1 or x in g.outputs or len(p.outputs) != 1:
            continue
        if g.values[x].dtype != np.float32:
            continue
        p.attrs["activation"] = act.op
        p.attrs["activation_attrs"] = activation_attrs(act)
        p.outputs = list(act.outputs)
        g.remove_nodes([act])
        producers[p.outputs[0]] = p
        changed = True
    return changed
