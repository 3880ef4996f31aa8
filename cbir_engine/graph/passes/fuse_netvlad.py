"""Recognises a NetVLAD head as exported by torch and replaces it with one NetVLAD node, run by
one fused kernel (soft-assignment, residual aggregation and the three normalisations).

The subgraph, from the feature map x [N, D, H, W]:

    xn = x / Clip(ReduceL2(x, axes=[1]), min=eps_in)          (optional input normalisation)
    A  = Reshape(Softmax(Conv1x1(xn, W, b), axis=1)) -> [N, K, HW]
    S  = MatMul(A, Transpose(Reshape(xn) -> [N, D, HW])) - C * ReduceSum(A, axes=[2])
    V  = S / Clip(ReduceL2(S, axes=[2]), min=eps_intra)
    y  = R / Clip(ReduceL2(R, axes=[1]), min=eps_out),  R = Reshape(V) -> [N, K * D]

The Reshape targets are computed from the batch size at run time, so the pass checks what they
resolve to by specialising a copy of the graph to two batch sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cbir_engine.graph.ir import Graph, Node, Value
from cbir_engine.graph.ops import OPS, register_op
from cbir_engine.graph.passes.dead_nodes import remove_dead_nodes


def _infer(node: Node, ins: list[Value | None]) -> list:
    x, w = ins[0], ins[1]
    assert x is not None and x.shape is not None and w is not None and w.shape is not None
    k, d = w.shape
    return [(x.dtype, (x.shape[0], k * d if isinstance(d, int) and isinstance(k, int) else None))]


def netvlad_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, c: np.ndarray,
                    normalize_input: bool, eps_in: float, eps_intra: float, eps_out: float) -> np.ndarray:
    """The NetVLAD op's numpy reference (float64 inside), vectorised over clusters."""
    n, d = x.shape[:2]
    xs = x.reshape(n, d, -1).astype(np.float64)
    if normalize_input:
        xs = xs / np.maximum(np.sqrt((xs ** 2).sum(1, keepdims=True)), eps_in)
    logits = np.einsum("kd,ndi->nki", w.astype(np.float64), xs)
    if b is not None:
        logits += b.astype(np.float64)[None, :, None]
    logits -= logits.max(1, keepdims=True)
    a = np.exp(logits)
    a /= a.sum(1, keepdims=True)
    v = np.einsum("nki,ndi->nkd", a, xs) - c.astype(np.float64)[None] * a.sum(2)[:, :, None]
    v /= np.maximum(np.sqrt((v ** 2).sum(2, keepdims=True)), eps_intra)
    v = v.reshape(n, -1)
    return (v / np.maximum(np.sqrt((v ** 2).sum(1, keepdims=True)), eps_out)).astype(x.dtype)


def _evaluate(node: Node, x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None,
              c: np.ndarray | None = None) -> list[np.ndarray]:
    a = node.attrs
    assert c is not None
    return [netvlad_forward(x, w, b, c, bool(a["normalize_input"]), a["eps_in"], a["eps_intra"],
                            a["eps_out"])]


if "NetVLAD" not in OPS:
    register_op("NetVLAD", _infer, _evaluate)


class _NoMatch(Exception):
    pass


class _Matcher:
    def __init__(self, g: Graph) -> None:
        self.g = g
        self.producers = g.producers()
        self.consumers = g.consumers()
        self.nodes: list[Node] = []
        self._concrete: list[Graph] | None = None

    def prod(self, value: str, op: str, **attrs: object) -> Node:
        n = self.producers.get(value)
        if n is None or n.op != op or n.attrs.get("activation"):
            raise _NoMatch
        for k, want in attrs.items():
            if n.attrs.get(k) != want:
                raise _NoMatch
        self.nodes.append(n)
        return n

    def uses(self, value: str, count: int) -> None:
        # Shape consumers only read the (static) shape, which the value keeps after fusion.
        users = [n for n in self.consumers.get(value, []) if n.op != "Shape"]
        if len(users) != count or value in self.g.outputs:
            raise _NoMatch

    def l2_axis(self, n: Node, rank: int | None) -> int:
        axes = n.attrs.get("axes") or []
        if len(axes) != 1 or not n.attrs.get("keepdims", 1):
            raise _NoMatch
        a = int(axes[0])
        if a < 0:
            if rank is None:
                raise _NoMatch
            a += rank
        return a

    def normalised(self, out: Node, rank: int | None) -> tuple[str, int, float]:
        """out = v / Clip(ReduceL2(v, axis), min=eps): returns (v, axis, eps)."""
        if out.op != "Div":
            raise _NoMatch
        v, den = out.inputs
        clip = self.prod(den, "Clip")
        eps, hi = clip.attrs.get("min"), clip.attrs.get("max")
        if eps is None or hi is not None:
            raise _NoMatch
        red = self.prod(clip.inputs[0], "ReduceL2")
        if red.inputs[0] != v:
            raise _NoMatch
        self.uses(den, 1)
        self.uses(red.outputs[0], 1)
        return v, self.l2_axis(red, rank), float(eps)

    def concrete_shapes(self) -> list[Callable[[str], tuple | None]]:
        """Shape lookups in copies of the graph specialised to batch sizes 2 and 3."""
        from cbir_engine.graph.passes.propagate import propagate

        if self._concrete is None:
            self._concrete = []
            for size in (2, 3):
                gc = self.g.copy()
                for name in gc.inputs:
                    s = gc.values[name].shape
                    if s is not None:
                        gc.values[name].shape = tuple(size if isinstance(d, str) else d for d in s)
                try:
                    propagate(gc)
                except Exception as e:  # a model that needs other sizes: no fusion
                    raise _NoMatch from e
                self._concrete.append(gc)
        return [lambda v, gc=gc: gc.values[v].shape for gc in self._concrete]


def _match(g: Graph, final: Node, m: _Matcher) -> tuple[Node, dict]:
    m.nodes = [final]
    r, axis, eps_out = m.normalised(final, 2)
    if axis != 1:
        raise _NoMatch
    m.uses(r, 2)
    reshape_r = m.prod(r, "Reshape")
    vout = reshape_r.inputs[0]
    m.uses(vout, 1)
    div_v = m.prod(vout, "Div")
    s, axis, eps_intra = m.normalised(div_v, 3)
    if axis != 2:
        raise _NoMatch
    m.uses(s, 2)
    sub = m.prod(s, "Sub")
    mm = m.prod(sub.inputs[0], "MatMul")
    mul = m.prod(sub.inputs[1], "Mul")
    m.uses(sub.inputs[0], 1)
    m.uses(sub.inputs[1], 1)
    c_name, rs_name = mul.inputs
    if g.const(c_name) is None:
        c_name, rs_name = rs_name, c_name
    cent = g.const(c_name)
    rs = m.prod(rs_name, "ReduceSum")
    m.uses(rs_name, 1)
    if cent is None or cent.dtype != np.float32 or rs.attrs.get("axes") not in ([2], [-1]) \
            or not rs.attrs.get("keepdims", 1):
        raise _NoMatch
    a3 = mm.inputs[0]
    if rs.inputs[0] != a3:
        raise _NoMatch
    m.uses(a3, 2)
    tr = m.prod(mm.inputs[1], "Transpose")
    m.uses(mm.inputs[1], 1)
    if list(tr.attrs.get("perm") or []) != [0, 2, 1]:
        raise _NoMatch
    x3 = tr.inputs[0]
    m.uses(x3, 1)
    reshape_x = m.prod(x3, "Reshape")
    reshape_a = m.prod(a3, "Reshape")
    sm_out = reshape_a.inputs[0]
    m.uses(sm_out, 1)
    sm = m.prod(sm_out, "Softmax")
    if sm.attrs.get("legacy") or sm.attrs.get("axis", -1) != 1:
        raise _NoMatch
    m.uses(sm.inputs[0], 1)
    conv = m.prod(sm.inputs[0], "Conv")
    xn = conv.inputs[0]
    if reshape_x.inputs[0] != xn:
        raise _NoMatch
    w = g.const(conv.input(1))
    b = g.const(conv.input(2)) if conv.input(2) else None
    a = conv.attrs
    if w is None or w.ndim != 4 or w.shape[2:] != (1, 1) or w.dtype != np.float32 \
            or (conv.input(2) and b is None) or a.get("group", 1) != 1 \
            or any(s != 1 for s in a.get("strides") or [1]) or any(p != 0 for p in a.get("pads") or [0]) \
            or any(d != 1 for d in a.get("dilations") or [1]) \
            or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise _NoMatch
    k, d = int(w.shape[0]), int(w.shape[1])
    if cent.size != k * d or cent.shape[-2:] != (k, d):
        raise _NoMatch
    # Optional input normalisation.
    x, normalize, eps_in = xn, False, 1e-12
    xn_prod = m.producers.get(xn)
    if xn_prod is not None and xn_prod.op == "Div" and not xn_prod.attrs.get("activation"):
        saved = list(m.nodes)
        try:
            m.nodes.append(xn_prod)
            cand, axis, eps = m.normalised(xn_prod, 4)
            if axis == 1:
                m.uses(xn, 2)
                x, normalize, eps_in = cand, True, eps
            else:
                m.nodes = saved
        except _NoMatch:
            m.nodes = saved
    xs = g.shape(x)
    if xs is None or len(xs) != 4 or xs[1] != d or g.values[x].dtype != np.float32:
        raise _NoMatch
    # What the run-time Reshapes resolve to.
    for shape_of in m.concrete_shapes():
        cx = shape_of(x)
        if cx is None or any(not isinstance(v, int) for v in cx):
            raise _NoMatch
        n, hw = cx[0], cx[2] * cx[3]
        if shape_of(a3) != (n, k, hw) or shape_of(x3) != (n, d, hw) or shape_of(r) != (n, k * d):
            raise _NoMatch
    attrs = {"normalize_input": int(normalize), "eps_in": eps_in, "eps_intra": eps_intra, "eps_out": eps_out}
    consts = {"w": w.reshape(k, d), "b": b, "c": cent.reshape(k, d)}
    return conv, {"x": x, "attrs": attrs, "consts": consts}


def fuse_netvlad(g: Graph) -> bool:
    changed = False
    m = _Matcher(g)
    for final in list(g.nodes):
        if final.op != "Div" or final.attrs.get("activation"):
            continue
        try:
            _, found = _match(g, final, m)
        except _NoMatch:
            continue
        c = found["consts"]
        w = g.add_const(np.ascontiguousarray(c["w"]), "netvlad_w")
        b = g.add_const(np.ascontiguousarray(c["b"]), "netvlad_b") if c["b"] is not None else ""
        cent = g.add_const(np.ascontiguousarray(c["c"]), "netvlad_c")
        fused = Node("NetVLAD", [found["x"], w, b, cent], list(final.outputs), found["attrs"],
                     name=final.name, origin=final.origin, opset=final.opset)
        dead = [n for n in m.nodes if n is not final]
        g.remove_nodes(dead)
        g.nodes[g.nodes.index(final)] = fused
        changed = True
        m = _Matcher(g)
    if changed:
        remove_dead_nodes(g)  # the Shape chains that computed the Reshape targets
    return changed
