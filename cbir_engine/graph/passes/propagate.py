"""Shape and dtype inference in execution order, folding every node whose inputs are constant.

With symbolic dims (at load) nodes that need a value not yet constant (a Reshape target computed
from the batch size) keep unknown output shapes; once the input shapes are concrete (when the
engine specialises the graph for a batch size) everything of that kind folds.
"""

from __future__ import annotations

from cbir_engine.errors import UnsupportedOpError
from cbir_engine.graph.ir import Graph
from cbir_engine.graph.ops import OPS, NotConstant, evaluate, shape_value

# Ops whose numpy references are too slow to fold big tensors; they run as kernels instead.
NO_FOLD = {"Conv", "MaxPool", "AveragePool", "LRN"}


def propagate(g: Graph, *, strict: bool = False) -> bool:
    """Infers shapes and folds constants. Returns True when a node was folded away.

    strict: every shape must become known (the specialised graph); a value that must be constant
    and is not raises UnsupportedOpError instead of leaving the shape unknown.
    """
    folded = False
    kept = []
    for node in g.nodes:
        op = OPS.get(node.op)
        if op is None:
            raise UnsupportedOpError(node.op, node.origin or node.name, node.opset, "no IR definition")
        ins = [g.values[i] if i else None for i in node.inputs]
        if node.op == "Shape" and ins[0] is not None and ins[0].shape is not None:
            value = shape_value(node, ins[0].shape)
            if value is not None:
                g.set_const(node.outputs[0], value)
                folded = True
                continue
        if node.op == "Size" and ins[0] is not None and ins[0].static:
            import numpy as np

            g.set_const(node.outputs[0], np.array(int(np.prod(ins[0].shape)), np.int64))
            folded = True
            continue
        present = [v for v in ins if v is not None]
        if (
            op.evaluate is not None
            and node.op not in NO_FOLD
            and present
            and all(v.is_const for v in present)
        ):
            for name, arr in zip(node.outputs, evaluate(node, [v.const if v else None for v in ins]),
                                 strict=False):
                if name:
                    g.set_const(name, arr)
            folded = True
            continue
        if any(v.shape is None for v in present):
            if strict:
                missing = [v.name for v in present if v.shape is None]
                raise UnsupportedOpError(node.op, node.origin or node.name, node.opset,
                                         f"shapes of {missing} could not be inferred")
            for name in node.outputs:
                if name:
                    g.values[name].shape = None
            kept.append(node)
            continue
        try:
            results = op.infer(node, ins)
        except NotConstant:
            if strict:
                raise
            results = [(g.values[o].dtype, None) for o in node.outputs]  # type: ignore[misc]
        for name, (dtype, shape) in zip(node.outputs, results, strict=False):
            if name:
                v = g.values[name]
                v.dtype, v.shape = dtype, shape
        kept.append(node)
    g.nodes = kept
    return folded
