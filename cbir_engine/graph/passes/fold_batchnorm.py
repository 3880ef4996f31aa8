"""Folds an inference BatchNormalization into the convolution (or Gemm) that feeds it.

y = (conv(x, W) + b - mean) * s / sqrt(var + eps) + beta  ==  conv(x, W * k) + (b - mean) * k + beta
with k = s / sqrt(var + eps) per output channel. Computed in float64, stored as float32.
"""

from __future__ import annotations

import numpy as np

from cbir_engine.graph.ir import Graph


def fold_batchnorm(g: Graph) -> bool:
    producers = g.producers()
    consumers = g.consumers()
    changed = False
    for bn in list(g.nodes):
        if bn.op != "BatchNormalization":
            continue
        x = bn.inputs[0]
        conv = producers.get(x)
        if conv is None or conv.op != "Conv" or conv.attrs.get("activation") or conv.input(3):
            continue
        if len(consumers.get(x, [])) != 1 or x in g.outputs:
            continue
        params = [g.const(i) for i in bn.inputs[1:5]]
        w = g.const(conv.inputs[1])
        if w is None or any(p is None for p in params):
            continue
        scale, beta, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)  # type: ignore[arg-type]
        k = scale / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
        b = g.const(conv.input(2))
        b64 = np.zeros(w.shape[0]) if b is None else np.asarray(b, np.float64)
        w_new = (w.astype(np.float64) * k.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
        b_new = ((b64 - mean) * k + beta).astype(w.dtype)
        name = conv.name or conv.outputs[0]
        conv.inputs = [conv.inputs[0], g.add_const(w_new, f"{name}_w_bn"), g.add_const(b_new, f"{name}_b_bn")]
        conv.outputs = list(bn.outputs)
        g.remove_nodes([bn])
        changed = True
    return changed
