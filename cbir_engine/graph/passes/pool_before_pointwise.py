"""Moves an average pool that reads a pointwise conv in front of the conv.

A 1x1 conv applies the same linear map at every pixel, and an average pool without padding takes
sums of pixels whose weights add up to 1, so the two commute, bias included:
avg(W x + b) = W avg(x) + b. Pooling first runs the conv on fewer pixels. DenseNet's transitions
(BN -> ReLU -> 1x1 conv -> 2x2 average pool, stride 2) are the case in the seed networks: their
three convs hold 10.9% of DenseNet-121's FLOPs (its plan's count at batch 1), and pooling first
cuts the network's FLOPs by 8.2%.

Only where the result is the same up to rounding: no fused activation or residual on the conv,
no padding or ceil mode on the pool, the conv's output read by the pool alone. The pool then
averages the conv's input channels instead of its output channels, so it must shrink the image:
a pool that keeps the pixel count would only move work from the conv to itself.
"""

from __future__ import annotations

import math

import numpy as np

from cbir_engine.graph.ir import Graph, Node


def _linear_pointwise(conv: Node, w: np.ndarray | None) -> bool:
    a = conv.attrs
    return (
        conv.op == "Conv"
        and len(conv.outputs) == 1
        and len([i for i in conv.inputs if i]) <= 3
        and w is not None
        and w.ndim == 4
        and w.shape[2:] == (1, 1)
        and all(v == 1 for v in a.get("strides") or [1, 1])
        and not any(a.get("pads") or [0])
        and a.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
        and not a.get("activation")
        and not a.get("input_activation")
    )


def _shrinking_average(pool: Node) -> bool:
    a = pool.attrs
    if pool.op == "GlobalAveragePool":
        return True
    if pool.op != "AveragePool" or len(pool.outputs) != 1 or len(pool.inputs) != 1:  # no folded BatchNorm
        return False
    if (
        a.get("ceil_mode", 0)
        or any(a.get("pads") or [0])
        or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
    ):
        return False
    if any(d != 1 for d in a.get("dilations") or [1]):
        return False
    return math.prod(a.get("strides") or [1]) > 1


def pool_before_pointwise_conv(g: Graph) -> bool:
    consumers = g.consumers()
    changed = False
    for conv in list(g.nodes):
        if conv.op != "Conv" or not _linear_pointwise(conv, g.const(conv.input(1))):
            continue
        y = conv.outputs[0]
        readers = consumers.get(y, [])
        if len(readers) != 1 or y in g.outputs or not _shrinking_average(readers[0]):
            continue
        pool = readers[0]
        x, z = conv.inputs[0], pool.outputs[0]
        pooled = g.fresh_name(f"{z}_pooled")
        g.value(pooled).dtype = g.values[x].dtype
        pool.inputs = [x]
        pool.outputs = [pooled]
        conv.inputs[0] = pooled
        conv.outputs = [z]
        del g.values[y]
        changed = True
    if changed:
        g.toposort()
    return changed
