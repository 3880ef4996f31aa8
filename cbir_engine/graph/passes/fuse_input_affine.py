"""Folds a pre-activation BatchNorm (+ReLU) into the pointwise conv or the average pool that reads it.

DenseNet's layers are BN -> ReLU -> 1x1 conv on the concatenated features; the BN cannot fold
into the conv's weights because the ReLU sits between them. The conv instead applies
x * scale + shift (and the ReLU) per input channel while it packs its input, so the activated
tensor is never written: inputs 4 and 5 of the Conv hold scale and shift, the attribute
`input_activation` the ReLU. DenseNet's transitions are BN -> ReLU -> average pool -> 1x1 conv
once `pool_before_pointwise_conv` has run; the pool applies the affine as it reads its input
(inputs 1 and 2 of the AveragePool; the padding stays 0, as it would on the activated tensor).
"""

from __future__ import annotations

import numpy as np

from cbir_engine.graph.ir import Graph, Node


def _pointwise(conv: Node, w: np.ndarray | None) -> bool:
    a = conv.attrs
    return (w is not None and w.ndim == 4 and w.shape[2:] == (1, 1) and a.get("group", 1) == 1
            and all(v == 1 for v in a.get("strides") or [1, 1])
            and not any(a.get("pads") or [0]) and a.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"))


def _takes_affine(node: Node, g: Graph) -> bool:
    if node.op == "Conv":
        return len(node.inputs) <= 4 and _pointwise(node, g.const(node.inputs[1]))
    # 2-D average pools (the CPU kernels and the GPU engine take the affine there)
    return (node.op == "AveragePool" and len(node.inputs) == 1
            and len(g.values[node.inputs[0]].shape or ()) == 4)


def fuse_input_affine(g: Graph) -> bool:
    producers = g.producers()
    consumers = g.consumers()
    changed = False
    for reader in list(g.nodes):
        if not _takes_affine(reader, g):
            continue
        x = reader.inputs[0]
        bn = producers.get(x)
        if bn is None or bn.op != "BatchNormalization" or len(bn.outputs) != 1:
            continue
        if bn.attrs.get("activation") not in (None, "Relu"):
            continue
        if len(consumers.get(x, [])) != 1 or x in g.outputs or g.values[x].dtype != np.float32:
            continue
        params = [g.const(i) for i in bn.inputs[1:5]]
        if any(p is None for p in params):
            continue
        scale, bias, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)  # type: ignore[arg-type]
        k = scale / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
        s_name = g.add_const(k.astype(np.float32), f"{reader.outputs[0]}_in_scale")
        h_name = g.add_const((bias - mean * k).astype(np.float32), f"{reader.outputs[0]}_in_shift")
        if reader.op == "Conv":
            reader.inputs = [bn.inputs[0], reader.inputs[1], reader.input(2), reader.input(3), s_name, h_name]
        else:
            reader.inputs = [bn.inputs[0], s_name, h_name]
        if bn.attrs.get("activation") == "Relu":
            reader.attrs["input_activation"] = "Relu"
        g.remove_nodes([bn])
        producers = g.producers()
        consumers = g.consumers()
        changed = True
    return changed
