"""MatMul(x, W) + b with a 2-D x and constant W and b becomes one Gemm (bias in the epilogue)."""

from __future__ import annotations

from cbir_engine.graph.ir import Graph


def matmul_add_to_gemm(g: Graph) -> bool:
    producers = g.producers()
    consumers = g.consumers()
    changed = False
    for add in list(g.nodes):
        if add.op != "Add" or add.attrs.get("activation"):
            continue
        for k in (0, 1):
            mm = producers.get(add.inputs[k])
            bias = g.const(add.inputs[1 - k])
            if mm is None or mm.op != "MatMul" or bias is None:
                continue
            x_shape = g.values[mm.inputs[0]].shape
            w = g.const(mm.inputs[1])
            if w is None or w.ndim != 2 or x_shape is None or len(x_shape) != 2:
                continue
            if bias.size != w.shape[1] or len(consumers.get(mm.outputs[0], [])) != 1:
                continue
            if mm.outputs[0] in g.outputs:
                continue
            b_name = g.add_const(bias.reshape(-1), f"{add.name or 'gemm'}_bias")
            mm.op = "Gemm"
            mm.inputs = [mm.inputs[0], mm.inputs[1], b_name]
            mm.attrs = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
            mm.outputs = list(add.outputs)
            g.remove_nodes([add])
            changed = True
            break
        if changed:
            producers = g.producers()
            consumers = g.consumers()
    return changed
