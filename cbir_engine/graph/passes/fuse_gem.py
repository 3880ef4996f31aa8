"""Recognises generalised-mean pooling as exported by torch,

    Clip(min=eps) -> Pow(p) -> GlobalAveragePool | ReduceMean(spatial axes, keepdims) -> Pow(q)

(q the exported 1/p), and replaces it with one GeM node, run by one kernel. The intermediate
values must have no other consumer and not be graph outputs.
"""

from __future__ import annotations

import numpy as np

from cbir_engine.graph.ir import Graph, Node, Value
from cbir_engine.graph.ops import OPS, register_op


def _infer(node: Node, ins: list[Value | None]) -> list:
    x = ins[0]
    assert x is not None and x.shape is not None
    return [(x.dtype, (*x.shape[:2], *([1] * (len(x.shape) - 2))))]


def gem_reference(x: np.ndarray, p: float, q: float, eps: float) -> np.ndarray:
    """The GeM op's numpy reference: (mean over spatial dims of max(x, eps)^p)^q, keepdims."""
    axes = tuple(range(2, x.ndim))
    m = np.mean(np.power(np.maximum(x.astype(np.float64), eps), p), axis=axes, keepdims=True)
    return np.power(m, q).astype(x.dtype)


def _evaluate(node: Node, x: np.ndarray) -> list[np.ndarray]:
    a = node.attrs
    return [gem_reference(x, a["p"], a["q"], a["eps"])]


if "GeM" not in OPS:
    register_op("GeM", _infer, _evaluate)


def _scalar(g: Graph, name: str) -> float | None:
    c = g.const(name)
    if c is None or c.size != 1 or c.dtype.kind != "f":
        return None
    return float(c.reshape(()))


def _single_use(g: Graph, consumers: dict[str, list[Node]], name: str) -> bool:
    return len(consumers.get(name, [])) == 1 and name not in g.outputs


def fuse_gem(g: Graph) -> bool:
    producers = g.producers()
    consumers = g.consumers()
    changed = False
    for pow2 in list(g.nodes):
        if pow2.op != "Pow" or len(pow2.inputs) != 2:
            continue
        pool = producers.get(pow2.inputs[0])
        q = _scalar(g, pow2.inputs[1])
        if q is None or pool is None:
            continue
        x_shape = None
        if pool.op == "GlobalAveragePool":
            pass
        elif pool.op == "ReduceMean" and pool.attrs.get("keepdims", 1):
            x_shape = g.shape(pool.inputs[0])
            if x_shape is None:
                continue
            r = len(x_shape)
            axes = sorted(a % r for a in (pool.attrs.get("axes") or []))
            if axes != list(range(2, r)):
                continue
        else:
            continue
        pow1 = producers.get(pool.inputs[0])
        if pow1 is None or pow1.op != "Pow" or len(pow1.inputs) != 2:
            continue
        p = _scalar(g, pow1.inputs[1])
        clip = producers.get(pow1.inputs[0])
        if p is None or clip is None or clip.op != "Clip":
            continue
        eps, hi = clip.attrs.get("min"), clip.attrs.get("max")
        if eps is None or hi is not None or not float(eps) > 0:
            continue
        x = clip.inputs[0]
        shape = g.shape(x)
        if shape is None or len(shape) < 3 or g.values[x].dtype != np.float32:
            continue
        if not all(_single_use(g, consumers, v) for v in (clip.outputs[0], pow1.outputs[0], pool.outputs[0])):
            continue
        fused = Node("GeM", [x], list(pow2.outputs), {"p": p, "q": q, "eps": float(eps)},
                     name=pow2.name or pool.name, origin=pow2.origin, opset=pow2.opset)
        g.remove_nodes([clip, pow1, pool])
        g.nodes[g.nodes.index(pow2)] = fused
        changed = True
        producers = g.producers()
        consumers = g.consumers()
    return changed
