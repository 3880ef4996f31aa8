"""BatchNormalization whose parameters are computed at run time -> elementwise ops.

Constant-parameter BatchNorms either fold into a conv or run as one channel-affine kernel; this
covers the rest (ONNX graphs that feed the statistics as inputs).
"""

from __future__ import annotations

import numpy as np

from cbir_engine.graph.ir import Graph, Node


def decompose_batchnorm(g: Graph) -> bool:
    changed = False
    out: list[Node] = []
    for n in g.nodes:
        params = n.inputs[1:5] if n.op == "BatchNormalization" else []
        if not params or all(g.const(p) is not None for p in params):
            out.append(n)
            continue
        x_shape = g.values[n.inputs[0]].shape
        if x_shape is None:
            out.append(n)
            continue
        view = g.add_const(np.array([-1] + [1] * (len(x_shape) - 2), np.int64), "bn_view")
        eps = g.add_const(np.array(n.attrs.get("epsilon", 1e-5), np.float32), "bn_eps")

        def add(op: str, inputs: list[str], bn: Node = n) -> str:
            name = g.fresh_name(f"{bn.name or 'bn'}_{op.lower()}")
            g.value(name)
            out.append(Node(op, inputs, [name], {}, bn.name, bn.origin, bn.opset))
            return name

        scale, bias, mean, var = (add("Reshape", [p, view]) for p in params)
        k = add("Div", [scale, add("Sqrt", [add("Add", [var, eps])])])
        centred = add("Sub", [n.inputs[0], mean])
        scaled = add("Mul", [centred, k])
        final = Node("Add", [scaled, bias], list(n.outputs), {}, n.name, n.origin, n.opset)
        if n.attrs.get("activation"):
            final.attrs["activation"] = n.attrs["activation"]
            final.attrs["activation_attrs"] = n.attrs.get("activation_attrs", {})
        out.append(final)
        changed = True
    g.nodes = out
    return changed
