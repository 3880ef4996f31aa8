"""The IR operators: for each, shape/dtype inference and a numpy reference.

IR operators carry ONNX names and ONNX semantics with attributes normalised by the importer
(defaults filled in, opset differences removed: Clip bounds, Squeeze/Unsqueeze axes, Reduce axes and
Pad pads are attributes here). The numpy references fold constants and serve as the simple
reference the kernels are tested against. Operators marked ``fold_only`` have no kernel: they
must disappear by constant folding (the Shape/Gather/Slice/Concat chains that exporters emit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cbir_engine.errors import ShapeError, UnsupportedOpError
from cbir_engine.graph.ir import Dim, Node, Shape, Value
from cbir_engine.graph.shapes import broadcast, norm_axis, window_geometry

F32 = np.dtype(np.float32)
I64 = np.dtype(np.int64)

Out = list[tuple[np.dtype, Shape]]


@dataclass(frozen=True)
class OpDef:
    infer: Callable[[Node, list[Value | None]], Out]
    evaluate: Callable[..., list[np.ndarray]] | None = None
    fold_only: bool = False  # no kernel: must be constant-folded away
    alias: bool = False  # output 0 shares input 0's memory (reshape family)


OPS: dict[str, OpDef] = {}


def register_op(name: str, infer: Callable, evaluate: Callable | None = None, *,
                fold_only: bool = False, alias: bool = False) -> None:
    """Declares an IR operator (modules adding fused ops call this at import)."""
    if name in OPS:
        raise ValueError(f"IR op {name} is already registered")
    OPS[name] = OpDef(infer, evaluate, fold_only=fold_only, alias=alias)


_register = register_op


def _shape(v: Value | None, node: Node, what: str = "input") -> Shape:
    if v is None or v.shape is None:
        raise ShapeError(f"{node.describe()}: {what} has no known shape")
    return v.shape


class NotConstant(UnsupportedOpError):
    """A value the op needs as a constant (a shape, axes) is computed at run time."""


def _const(v: Value | None, node: Node, what: str) -> np.ndarray:
    if v is None or v.const is None:
        raise NotConstant(node.op, node.origin or node.name, node.opset, f"{what} must be constant")
    return v.const


# ---------------------------------------------------------------- elementwise
def _same(node: Node, ins: list[Value | None]) -> Out:
    v = ins[0]
    return [(v.dtype, _shape(v, node))]  # type: ignore[union-attr]


def _act(fn: Callable[[np.ndarray, dict], np.ndarray]) -> Callable[..., list[np.ndarray]]:
    def ev(node: Node, x: np.ndarray, *rest: np.ndarray) -> list[np.ndarray]:
        with np.errstate(all="ignore"):
            return [np.asarray(fn(x, node.attrs)).astype(x.dtype, copy=False)]

    return ev


def _erf(x: np.ndarray) -> np.ndarray:
    import math

    return np.vectorize(math.erf, otypes=[x.dtype])(x) if x.size else x.copy()


UNARY: dict[str, Callable[[np.ndarray, dict], np.ndarray]] = {
    "Relu": lambda x, a: np.where(x < 0, np.zeros_like(x), x),
    "Sigmoid": lambda x, a: 1.0 / (1.0 + np.exp(-x)),
    "Tanh": lambda x, a: np.tanh(x),
    "Clip": lambda x, a: _clip(x, a.get("min"), a.get("max")),
    "LeakyRelu": lambda x, a: np.where(x < 0, x * np.asarray(a["alpha"], x.dtype), x),
    "Sqrt": lambda x, a: np.sqrt(x),
    "Exp": lambda x, a: np.exp(x),
    "Log": lambda x, a: np.log(x),
    "Abs": lambda x, a: np.abs(x),
    "Neg": lambda x, a: -x,
    "Reciprocal": lambda x, a: 1.0 / x,
    "Floor": lambda x, a: np.floor(x),
    "Ceil": lambda x, a: np.ceil(x),
    "Softplus": lambda x, a: np.log1p(np.exp(x)),
    "Elu": lambda x, a: np.where(x < 0, a["alpha"] * (np.exp(x) - 1.0), x),
    "HardSigmoid": lambda x, a: np.clip(a["alpha"] * x + a["beta"], 0, 1),
    "Erf": lambda x, a: _erf(x),
    "Identity": lambda x, a: x,
    "Not": lambda x, a: np.logical_not(x),
}


def _clip(x: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    y = x
    if lo is not None:
        y = np.where(y < lo, np.asarray(lo, x.dtype), y)
    if hi is not None:
        y = np.where(y > hi, np.asarray(hi, x.dtype), y)
    return y


for _name, _fn in UNARY.items():
    _register(_name, _same, _act(_fn), fold_only=_name == "Not")


def _apply_fused_act(y: np.ndarray, attrs: dict) -> np.ndarray:
    act = attrs.get("activation", "")
    if not act:
        return y
    return UNARY[act](y, attrs.get("activation_attrs", {})).astype(y.dtype, copy=False)


def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    q = np.floor_divide(a, b)
    # ONNX integer division truncates toward zero.
    return np.where((np.mod(a, b) != 0) & ((a < 0) != (b < 0)), q + 1, q)


BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": lambda a, b: _int_div(a, b) if np.issubdtype(a.dtype, np.integer) else a / b,
    "Pow": lambda a, b: np.power(a, b.astype(a.dtype)) if a.dtype.kind == "f" else np.power(a, b),
    "Max": np.maximum,
    "Min": np.minimum,
    "Mod": np.mod,
}
COMPARE: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Equal": np.equal,
    "Less": np.less,
    "Greater": np.greater,
    "LessOrEqual": np.less_equal,
    "GreaterOrEqual": np.greater_equal,
    "And": np.logical_and,
    "Or": np.logical_or,
}


def _infer_binary(node: Node, ins: list[Value | None]) -> Out:
    a, b = ins[0], ins[1]
    return [(a.dtype, broadcast(_shape(a, node), _shape(b, node)))]  # type: ignore[union-attr]


def _infer_compare(node: Node, ins: list[Value | None]) -> Out:
    return [(np.dtype(bool), broadcast(_shape(ins[0], node), _shape(ins[1], node)))]


def _binary_eval(fn: Callable) -> Callable[..., list[np.ndarray]]:
    def ev(node: Node, a: np.ndarray, b: np.ndarray, residual: np.ndarray | None = None) -> list[np.ndarray]:
        # `residual` (input 2, from fuse_residual_eltwise) is added before the fused activation.
        with np.errstate(all="ignore"):
            y = np.asarray(fn(a, b))
            if residual is not None:
                y = y + residual
            y = y.astype(a.dtype, copy=False)
        return [_apply_fused_act(y, node.attrs)]

    return ev


for _name, _fn in BINARY.items():
    _register(_name, _infer_binary, _binary_eval(_fn), fold_only=_name == "Mod")
for _name, _fn in COMPARE.items():
    _register(_name, _infer_compare, lambda n, a, b, _f=_fn: [np.asarray(_f(a, b))], fold_only=True)


def _infer_where(node: Node, ins: list[Value | None]) -> Out:
    shapes = [_shape(v, node) for v in ins]
    return [(ins[1].dtype, broadcast(*shapes))]  # type: ignore[union-attr]


_register("Where", _infer_where, lambda n, c, x, y: [np.where(c, x, y)], fold_only=True)


# ---------------------------------------------------------------- convolution family
def _spatial(node: Node, x: Shape, w_shape: Shape | None = None) -> tuple:
    a = node.attrs
    nsp = len(x) - 2
    kernel = a.get("kernel_shape") or (w_shape[2:] if w_shape else None)
    if kernel is None or len(kernel) != nsp:
        raise ShapeError(f"{node.describe()}: kernel {kernel} does not match input rank {len(x)}")
    return window_geometry(
        x[2:],
        [int(k) for k in kernel],
        a.get("strides") or [1] * nsp,
        a.get("dilations") or [1] * nsp,
        a.get("pads") or [0] * (2 * nsp),
        a.get("auto_pad", "NOTSET"),
        bool(a.get("ceil_mode", 0)),
    )


def conv_geometry(node: Node, x: Shape, w: Shape) -> tuple:
    return _spatial(node, x, w)


def _infer_conv(node: Node, ins: list[Value | None]) -> Out:
    x, w = _shape(ins[0], node), _shape(ins[1], node, "weight")
    if len(x) < 3 or len(w) != len(x):
        raise ShapeError(f"{node.describe()}: input rank {len(x)} and weight rank {len(w)} do not match")
    group = node.attrs.get("group", 1)
    if isinstance(x[1], int) and isinstance(w[1], int) and x[1] != w[1] * group:
        raise ShapeError(
            f"{node.describe()}: input has {x[1]} channels, weight expects {w[1]} x {group} groups"
        )
    out, _, _ = conv_geometry(node, x, w)
    return [(ins[0].dtype, (x[0], w[0], *out))]  # type: ignore[union-attr]


def conv_reference(node: Node, x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None,
                   residual: np.ndarray | None = None, in_scale: np.ndarray | None = None,
                   in_shift: np.ndarray | None = None) -> list[np.ndarray]:
    """Direct N-D convolution in float64 (slow; for folding and tests). With in_scale/in_shift
    (fuse_input_affine), x first becomes x * in_scale + in_shift per channel, then
    `input_activation` (Relu) if set."""
    out, pb, pe = conv_geometry(node, x.shape, w.shape)
    a = node.attrs
    nsp = x.ndim - 2
    if in_scale is not None and in_shift is not None:
        shp = (1, -1) + (1,) * nsp
        x = x.astype(np.float64) * in_scale.reshape(shp) + in_shift.reshape(shp)
        if a.get("input_activation") == "Relu":
            x = np.maximum(x, 0.0)
    strides = a.get("strides") or [1] * nsp
    dil = a.get("dilations") or [1] * nsp
    group = a.get("group", 1)
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(pb[i], pe[i]) for i in range(nsp)])
    n, c = x.shape[:2]
    k = w.shape[0]
    cg, kg = c // group, k // group
    y = np.zeros((n, k, *out), np.float64)
    for g in range(group):
        wg = w[g * kg:(g + 1) * kg].astype(np.float64)
        for idx in np.ndindex(*w.shape[2:]):
            sl = tuple(
                slice(idx[i] * dil[i], idx[i] * dil[i] + (out[i] - 1) * strides[i] + 1, strides[i])
                for i in range(nsp)
            )
            patch = xp[(slice(None), slice(g * cg, (g + 1) * cg), *sl)]
            y[:, g * kg:(g + 1) * kg] += np.einsum("nc...,kc->nk...", patch, wg[(..., *idx)])
    if b is not None:
        y += b.reshape((1, -1) + (1,) * nsp)
    if residual is not None:
        y += residual
    return [_apply_fused_act(y.astype(w.dtype), a)]


_register("Conv", _infer_conv, conv_reference)


def _infer_bn(node: Node, ins: list[Value | None]) -> Out:
    return [(ins[0].dtype, _shape(ins[0], node))]  # type: ignore[union-attr]


def _bn_eval(node: Node, x, scale, bias, mean, var) -> list[np.ndarray]:
    eps = node.attrs.get("epsilon", 1e-5)
    shp = (1, -1) + (1,) * (x.ndim - 2)
    s = (scale / np.sqrt(var + eps)).reshape(shp)
    y = (x - mean.reshape(shp)) * s + bias.reshape(shp)
    return [_apply_fused_act(y.astype(x.dtype), node.attrs)]


_register("BatchNormalization", _infer_bn, _bn_eval)


def _infer_pool(node: Node, ins: list[Value | None]) -> Out:
    x = _shape(ins[0], node)
    if len(x) < 3:
        raise ShapeError(f"{node.describe()}: input must have spatial dims, got rank {len(x)}")
    out, _, _ = _spatial(node, x)
    return [(ins[0].dtype, (x[0], x[1], *out))]  # type: ignore[union-attr]


def pool_reference(node: Node, x: np.ndarray) -> list[np.ndarray]:
    out, pb, pe = _spatial(node, x.shape)
    a = node.attrs
    nsp = x.ndim - 2
    k, s = a["kernel_shape"], a.get("strides") or [1] * nsp
    dil = a.get("dilations") or [1] * nsp
    is_max = node.op == "MaxPool"
    y = np.zeros(x.shape[:2] + tuple(out), x.dtype)
    for o in np.ndindex(*out):
        taps = [[o[i] * s[i] - pb[i] + j * dil[i] for j in range(k[i])] for i in range(nsp)]
        inside = [[t for t in taps[i] if 0 <= t < x.shape[2 + i]] for i in range(nsp)]
        win = x[(slice(None), slice(None), *np.ix_(*inside))] if all(inside) else None
        if is_max:
            y[(..., *o)] = -np.inf if win is None else win.reshape(*x.shape[:2], -1).max(-1)
            continue
        if a.get("count_include_pad", 0):
            cnt = np.prod([sum(-pb[i] <= t < x.shape[2 + i] + pe[i] for t in taps[i]) for i in range(nsp)])
        else:
            cnt = np.prod([len(v) for v in inside])
        total = 0.0 if win is None else win.reshape(*x.shape[:2], -1).sum(-1)
        y[(..., *o)] = total / max(cnt, 1)
    return [y]


_register("MaxPool", _infer_pool, pool_reference)
_register("AveragePool", _infer_pool, pool_reference)


def _infer_global_pool(node: Node, ins: list[Value | None]) -> Out:
    x = _shape(ins[0], node)
    return [(ins[0].dtype, (x[0], x[1]) + (1,) * (len(x) - 2))]  # type: ignore[union-attr]


_register(
    "GlobalAveragePool",
    _infer_global_pool,
    lambda n, x: [x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)],
)
_register(
    "GlobalMaxPool",
    _infer_global_pool,
    lambda n, x: [x.max(axis=tuple(range(2, x.ndim)), keepdims=True)],
)


def _lrn_eval(node: Node, x: np.ndarray) -> list[np.ndarray]:
    a = node.attrs
    size = a["size"]
    sq = np.square(x.astype(np.float64))
    c = x.shape[1]
    s = np.zeros_like(sq)
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    for i in range(c):
        s[:, i] = sq[:, max(0, i - lo):min(c - 1, i + hi) + 1].sum(axis=1)
    y = x / (a.get("bias", 1.0) + a.get("alpha", 1e-4) / size * s) ** a.get("beta", 0.75)
    return [y.astype(x.dtype)]


_register("LRN", _same, _lrn_eval)


# ---------------------------------------------------------------- dense
def _infer_gemm(node: Node, ins: list[Value | None]) -> Out:
    a, b = _shape(ins[0], node), _shape(ins[1], node)
    if len(a) != 2 or len(b) != 2:
        raise ShapeError(f"{node.describe()}: Gemm needs 2-D operands, got {a} and {b}")
    m, k = (a[1], a[0]) if node.attrs.get("transA") else a
    k2, n = (b[1], b[0]) if node.attrs.get("transB") else b
    if isinstance(k, int) and isinstance(k2, int) and k != k2:
        raise ShapeError(f"{node.describe()}: inner dims {k} and {k2} differ")
    if len(ins) > 2 and ins[2] is not None:
        broadcast(_shape(ins[2], node), (m, n))
    return [(ins[0].dtype, (m, n))]  # type: ignore[union-attr]


def _gemm_eval(node: Node, a, b, c=None, residual=None) -> list[np.ndarray]:
    at = node.attrs
    a = a.T if at.get("transA") else a
    b = b.T if at.get("transB") else b
    y = at.get("alpha", 1.0) * (a.astype(np.float64) @ b)
    if c is not None:
        y = y + at.get("beta", 1.0) * c
    return [_apply_fused_act(y.astype(a.dtype), at)]


_register("Gemm", _infer_gemm, _gemm_eval)


def _infer_matmul(node: Node, ins: list[Value | None]) -> Out:
    a, b = _shape(ins[0], node), _shape(ins[1], node)
    if not a or not b:
        raise ShapeError(f"{node.describe()}: MatMul of a scalar")
    a2 = (1, *a) if len(a) == 1 else a
    b2 = (*b, 1) if len(b) == 1 else b
    if isinstance(a2[-1], int) and isinstance(b2[-2], int) and a2[-1] != b2[-2]:
        raise ShapeError(f"{node.describe()}: inner dims {a2[-1]} and {b2[-2]} differ")
    batch = broadcast(a2[:-2], b2[:-2])
    out: tuple[Dim, ...] = (*batch, a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return [(ins[0].dtype, out)]  # type: ignore[union-attr]


_register("MatMul", _infer_matmul, lambda n, a, b: [np.matmul(a, b)])


# ---------------------------------------------------------------- shape family
def _infer_reshape(node: Node, ins: list[Value | None]) -> Out:
    x = _shape(ins[0], node)
    target = _const(ins[1], node, "target shape")
    allowzero = node.attrs.get("allowzero", 0)
    out: list[Dim] = []
    for i, d in enumerate(int(t) for t in target):
        if d == 0 and not allowzero:
            if i >= len(x):
                raise ShapeError(f"{node.describe()}: 0 copies dim {i} of a rank-{len(x)} input")
            out.append(x[i])
        else:
            out.append(d)
    if out.count(-1) > 1:
        raise ShapeError(f"{node.describe()}: more than one -1 in {list(target)}")
    if -1 in out:
        known = [d for d in out if d != -1]
        if all(isinstance(d, int) for d in (*x, *known)):
            total = int(np.prod(x, dtype=np.int64))
            rest = int(np.prod(known, dtype=np.int64))
            if rest == 0 or total % rest:
                raise ShapeError(f"{node.describe()}: cannot reshape {x} to {list(target)}")
            out[out.index(-1)] = total // rest
        else:
            out[out.index(-1)] = f"{node.outputs[0]}:{out.index(-1)}"
    elif all(isinstance(d, int) for d in (*x, *out)) and np.prod(x) != np.prod(out):
        raise ShapeError(f"{node.describe()}: cannot reshape {x} to {out}")
    return [(ins[0].dtype, tuple(out))]  # type: ignore[union-attr]


def _reshape_eval(node: Node, x: np.ndarray, shape: np.ndarray) -> list[np.ndarray]:
    ins = [Value("x", x.dtype, x.shape), Value("s", shape.dtype, shape.shape, shape)]
    _, out = _infer_reshape(node, ins)[0]
    return [x.reshape(out)]


_register("Reshape", _infer_reshape, _reshape_eval, alias=True)


def flatten_axis(node: Node, rank: int) -> int:
    axis = node.attrs.get("axis", 1)
    if not -rank <= axis <= rank:
        raise ShapeError(f"{node.describe()}: axis {axis} out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _infer_flatten(node: Node, ins: list[Value | None]) -> Out:
    x = _shape(ins[0], node)
    axis = flatten_axis(node, len(x))
    lead, tail = x[:axis], x[axis:]

    def prod(ds: tuple) -> Dim:
        if all(isinstance(d, int) for d in ds):
            return int(np.prod(ds, dtype=np.int64))
        return ds[0] if len(ds) == 1 else "*".join(map(str, ds))

    return [(ins[0].dtype, (prod(lead), prod(tail)))]  # type: ignore[union-attr]


def _flatten_eval(node: Node, x: np.ndarray) -> list[np.ndarray]:
    axis = flatten_axis(node, x.ndim)
    return [x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))]


_register("Flatten", _infer_flatten, _flatten_eval, alias=True)


def _infer_squeeze(node: Node, ins: list[Value | None]) -> Out:
    x = _shape(ins[0], node)
    axes = node.attrs.get("axes")
    if axes is None:
        if not all(isinstance(d, int) for d in x):
            raise ShapeError(f"{node.describe()}: Squeeze without axes needs a static shape")
        keep = [d for d in x if d != 1]
    else:
        ax = {norm_axis(a, len(x)) for a in axes}
        for a in ax:
            if isinstance(x[a], int) and x[a] != 1:
                raise ShapeError(f"{node.describe()}: cannot squeeze axis {a} of size {x[a]}")
        keep = [d for i, d in enumerate(x) if i not in ax]
    return [(ins[0].dtype, tuple(keep))]  # type: ignore[union-attr]


def _infer_unsqueeze(node: Node, ins: list[Value | None]) -> Out:
    x = _shape(ins[0], node)
    rank = len(x) + len(node.attrs["axes"])
    ax = sorted(norm_axis(a, rank) for a in node.attrs["axes"])
    if len(set(ax)) != len(ax):
        raise ShapeError(f"{node.describe()}: repeated axes {node.attrs['axes']}")
    out = list(x)
    for a in ax:
        out.insert(a, 1)
    return [(ins[0].dtype, tuple(out))]  # type: ignore[union-attr]


def _reshape_like(infer: Callable) -> Callable[..., list[np.ndarray]]:
    def ev(node: Node, x: np.ndarray) -> list[np.ndarray]:
        return [x.reshape(infer(node, [Value("x", x.dtype, x.shape)])[0][1])]

    return ev


_register("Squeeze", _infer_squeeze, _reshape_like(_infer_squeeze), alias=True)
_register("Unsqueeze", _infer_unsqueeze, _reshape_like(_infer_unsqueeze), alias=True)


def _infer_transpose(node: Node, ins: list[Value | None]) -> Out:
    x = _shape(ins[0], node)
    perm = node.attrs.get("perm") or list(range(len(x)))[::-1]
    if sorted(perm) != list(range(len(x))):
        raise ShapeError(f"{node.describe()}: perm {perm} is not a permutation of rank {len(x)}")
    return [(ins[0].dtype, tuple(x[p] for p in perm))]  # type: ignore[union-attr]


_register(
    "Transpose",
    _infer_transpose,
    lambda n, x: [np.asarray(np.transpose(x, n.attrs.get("perm") or None), order="C")],
)


def _infer_concat(node: Node, ins: list[Value | None]) -> Out:
    shapes = [_shape(v, node) for v in ins if v is not None]
    rank = len(shapes[0])
    axis = norm_axis(node.attrs["axis"], rank)
    out = list(shapes[0])
    for s in shapes[1:]:
        if len(s) != rank:
            raise ShapeError(f"{node.describe()}: inputs of ranks {rank} and {len(s)}")
    dims = [s[axis] for s in shapes]
    out[axis] = sum(dims) if all(isinstance(d, int) for d in dims) else "+".join(map(str, dims))
    return [(ins[0].dtype, tuple(out))]  # type: ignore[union-attr]


_register(
    "Concat",
    _infer_concat,
    lambda n, *xs: [np.concatenate([x for x in xs if x is not None], axis=n.attrs["axis"])],
)


def full_pads(node: Node, rank: int) -> list[int]:
    """Pad's (begin..., end...) over all `rank` dims (the IR keeps ONNX's optional `axes`)."""
    pads = [int(p) for p in node.attrs["pads"]]
    axes = node.attrs.get("axes")
    if axes is None:
        if len(pads) != 2 * rank:
            raise ShapeError(f"{node.describe()}: {len(pads)} pads for rank {rank}")
        return pads
    if len(pads) != 2 * len(axes):
        raise ShapeError(f"{node.describe()}: {len(pads)} pads for {len(axes)} axes")
    full = [0] * (2 * rank)
    for i, a in enumerate(axes):
        a = norm_axis(int(a), rank)
        full[a], full[rank + a] = pads[i], pads[len(axes) + i]
    return full


def _infer_pad(node: Node, ins: list[Value | None]) -> Out:
    x = _shape(ins[0], node)
    r = len(x)
    pads = full_pads(node, r)
    out = tuple(
        d + pads[i] + pads[r + i] if isinstance(d, int) else d for i, d in enumerate(x)
    )
    if any(isinstance(d, int) and d < 0 for d in out):
        raise ShapeError(f"{node.describe()}: pads {pads} crop {x} below zero")
    return [(ins[0].dtype, out)]  # type: ignore[union-attr]


def _pad_eval(node: Node, x: np.ndarray) -> list[np.ndarray]:
    r = x.ndim
    pads = full_pads(node, r)
    mode = node.attrs.get("mode", "constant")
    crop = tuple(slice(max(0, -pads[i]), x.shape[i] - max(0, -pads[r + i])) for i in range(r))
    x = x[crop]
    width = [(max(0, pads[i]), max(0, pads[r + i])) for i in range(r)]
    if mode == "constant":
        return [np.pad(x, width, constant_values=node.attrs.get("value", 0.0))]
    return [np.pad(x, width, mode=mode)]


_register("Pad", _infer_pad, _pad_eval)


def _infer_expand(node: Node, ins: list[Value | None]) -> Out:
    target = tuple(int(d) for d in _const(ins[1], node, "shape"))
    return [(ins[0].dtype, broadcast(_shape(ins[0], node), target))]  # type: ignore[union-attr]


_register(
    "Expand",
    _infer_expand,
    lambda n, x, s: [np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(int(d) for d in s))).copy()],
)


# ---------------------------------------------------------------- reductions, softmax
def reduce_axes(node: Node, rank: int) -> tuple[int, ...]:
    axes = node.attrs.get("axes")
    if axes is None or len(axes) == 0:
        if axes is not None and node.attrs.get("noop_with_empty_axes", 0):
            return ()
        return tuple(range(rank))
    return tuple(sorted({norm_axis(a, rank) for a in axes}))


def _infer_reduce(node: Node, ins: list[Value | None]) -> Out:
    x = _shape(ins[0], node)
    axes = reduce_axes(node, len(x))
    keep = node.attrs.get("keepdims", 1)
    out = tuple(1 if i in axes else d for i, d in enumerate(x)) if keep else tuple(
        d for i, d in enumerate(x) if i not in axes
    )
    return [(ins[0].dtype, out)]  # type: ignore[union-attr]


REDUCE: dict[str, Callable[[np.ndarray, tuple, bool], np.ndarray]] = {
    "ReduceSum": lambda x, ax, k: np.sum(x, axis=ax, keepdims=k),
    "ReduceMean": lambda x, ax, k: np.mean(x, axis=ax, keepdims=k),
    "ReduceMax": lambda x, ax, k: np.max(x, axis=ax, keepdims=k),
    "ReduceMin": lambda x, ax, k: np.min(x, axis=ax, keepdims=k),
    "ReduceProd": lambda x, ax, k: np.prod(x, axis=ax, keepdims=k),
    "ReduceL2": lambda x, ax, k: np.sqrt(np.sum(np.square(x), axis=ax, keepdims=k)),
    "ReduceL1": lambda x, ax, k: np.sum(np.abs(x), axis=ax, keepdims=k),
    "ReduceSumSquare": lambda x, ax, k: np.sum(np.square(x), axis=ax, keepdims=k),
}


def _reduce_eval(fn: Callable) -> Callable[..., list[np.ndarray]]:
    def ev(node: Node, x: np.ndarray) -> list[np.ndarray]:
        axes = reduce_axes(node, x.ndim)
        if not axes:
            return [x.copy()]
        with np.errstate(all="ignore"):
            return [np.asarray(fn(x, axes, bool(node.attrs.get("keepdims", 1)))).astype(x.dtype)]

    return ev


for _name, _fn in REDUCE.items():
    _register(_name, _infer_reduce, _reduce_eval(_fn))


def softmax_blocks(node: Node, shape: Shape) -> tuple[int, int, int]:
    """(outer, axis, inner) of a Softmax; `legacy` (opset < 13) flattens to 2-D at `axis`."""
    r = len(shape)
    axis = norm_axis(node.attrs.get("axis", -1), r)
    dims = [int(d) for d in shape]
    if node.attrs.get("legacy"):
        return int(np.prod(dims[:axis])), int(np.prod(dims[axis:])), 1
    return int(np.prod(dims[:axis])), dims[axis], int(np.prod(dims[axis + 1:]))


def _softmax_eval(node: Node, x: np.ndarray) -> list[np.ndarray]:
    o, a, i = softmax_blocks(node, x.shape)
    v = x.reshape(o, a, i).astype(np.float64)
    m = v.max(axis=1, keepdims=True)
    e = np.exp(v - m)
    s = e.sum(axis=1, keepdims=True)
    y = (v - m - np.log(s)) if node.op == "LogSoftmax" else e / s
    return [y.reshape(x.shape).astype(x.dtype)]


_register("Softmax", _same, _softmax_eval)
_register("LogSoftmax", _same, _softmax_eval)


def _lpnorm_eval(node: Node, x: np.ndarray) -> list[np.ndarray]:
    axis = norm_axis(node.attrs.get("axis", -1), x.ndim)
    p = node.attrs.get("p", 2)
    n = np.sum(np.abs(x), axis=axis, keepdims=True) if p == 1 else np.sqrt(
        np.sum(np.square(x), axis=axis, keepdims=True)
    )
    with np.errstate(all="ignore"):  # a zero vector stays zero (ONNX defines 0/0 = 0 here)
        return [np.where(n == 0, 0, x / n).astype(x.dtype)]


_register("LpNormalization", _same, _lpnorm_eval)


# ---------------------------------------------------------------- fold-only helpers
def _infer_shape_op(node: Node, ins: list[Value | None]) -> Out:
    x = _shape(ins[0], node)
    start, end = _shape_range(node, len(x))
    return [(I64, (max(0, end - start),))]


def _shape_range(node: Node, rank: int) -> tuple[int, int]:
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return start, end


def shape_value(node: Node, shape: Shape) -> np.ndarray | None:
    """The value of a Shape node when the dims it reads are known."""
    start, end = _shape_range(node, len(shape))
    dims = shape[start:end]
    if all(isinstance(d, int) for d in dims):
        return np.array(dims, dtype=np.int64)
    return None


_register("Shape", _infer_shape_op, None, fold_only=True)
_register("Size", lambda n, ins: [(I64, ())], None, fold_only=True)


def _infer_gather(node: Node, ins: list[Value | None]) -> Out:
    x, idx = _shape(ins[0], node), _shape(ins[1], node)
    axis = norm_axis(node.attrs.get("axis", 0), len(x))
    return [(ins[0].dtype, (*x[:axis], *idx, *x[axis + 1:]))]  # type: ignore[union-attr]


def _gather_eval(node: Node, x: np.ndarray, idx: np.ndarray) -> list[np.ndarray]:
    axis = norm_axis(node.attrs.get("axis", 0), x.ndim)
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    return [np.take(x, idx, axis=axis)]


_register("Gather", _infer_gather, _gather_eval, fold_only=True)


def slice_params(node: Node, rank: int, starts, ends, axes, steps) -> list[tuple[int, int, int, int]]:
    axes = list(range(len(starts))) if axes is None else [norm_axis(int(a), rank) for a in axes]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    return [(a, int(s), int(e), st) for a, s, e, st in zip(axes, starts, ends, steps, strict=True)]


def _slice_eval(node: Node, x, starts, ends, axes=None, steps=None) -> list[np.ndarray]:
    sl = [slice(None)] * x.ndim
    for a, s, e, st in slice_params(node, x.ndim, starts, ends, axes, steps):
        if st == 0:
            raise ShapeError(f"{node.describe()}: slice step 0")
        big = np.iinfo(np.int64).max
        s = None if (st < 0 and s >= big) else s
        e = None if (st < 0 and e <= -big - 1) or (st > 0 and e >= big) else e
        sl[a] = slice(s, e, st)
    return [x[tuple(sl)]]


def _infer_slice(node: Node, ins: list[Value | None]) -> Out:
    x = _shape(ins[0], node)
    consts = [v.const if v is not None else None for v in ins[1:]]
    if any(c is None for c in consts[:2]) or (len(consts) > 2 and any(
            ins[i + 1] is not None and consts[i] is None for i in range(2, len(consts)))):
        raise NotConstant("Slice", node.origin or node.name, node.opset,
                          "starts/ends/axes/steps must be constant")
    if not all(isinstance(d, int) for d in x):
        out = list(x)
        for a, *_ in slice_params(node, len(x), *(consts + [None] * (4 - len(consts)))):
            out[a] = f"{node.outputs[0]}:{a}"
        return [(ins[0].dtype, tuple(out))]  # type: ignore[union-attr]
    probe = np.empty(x, dtype=np.uint8)
    return [(ins[0].dtype, _slice_eval(node, probe, *(consts + [None] * (4 - len(consts))))[0].shape)]  # type: ignore[union-attr]


_register("Slice", _infer_slice, _slice_eval)


def _infer_cast(node: Node, ins: list[Value | None]) -> Out:
    return [(np.dtype(node.attrs["to"]), _shape(ins[0], node))]


_register("Cast", _infer_cast, lambda n, x: [x.astype(n.attrs["to"])], fold_only=True)


def _infer_cos(node: Node, ins: list[Value | None]) -> Out:
    shape = tuple(int(d) for d in _const(ins[0], node, "shape"))
    value = node.attrs.get("value")
    dtype = np.asarray(value).dtype if value is not None else F32
    return [(dtype, shape)]


def _cos_eval(node: Node, shape: np.ndarray) -> list[np.ndarray]:
    value = node.attrs.get("value")
    v = np.asarray(value).reshape(-1)[0] if value is not None else np.float32(0)
    return [np.full(tuple(int(d) for d in shape), v, dtype=np.asarray(v).dtype)]


_register("ConstantOfShape", _infer_cos, _cos_eval, fold_only=True)


def _range_eval(node: Node, start, limit, delta) -> list[np.ndarray]:
    return [np.arange(start, limit, delta, dtype=np.asarray(start).dtype)]


def _infer_range(node: Node, ins: list[Value | None]) -> Out:
    vals = [v.const if v is not None else None for v in ins]
    if any(c is None for c in vals):
        raise NotConstant("Range", node.origin or node.name, node.opset, "inputs must be constant")
    return [(ins[0].dtype, _range_eval(node, *vals)[0].shape)]  # type: ignore[union-attr]


_register("Range", _infer_range, _range_eval, fold_only=True)


def split_sizes(node: Node, dim: Dim) -> list[int]:
    sizes = node.attrs.get("split")
    n = node.attrs.get("num_outputs") or len(node.outputs)
    if sizes is not None:
        if len(sizes) != len(node.outputs):
            raise ShapeError(f"{node.describe()}: {len(sizes)} sizes for {len(node.outputs)} outputs")
        return [int(s) for s in sizes]
    if not isinstance(dim, int):
        raise ShapeError(f"{node.describe()}: cannot split a symbolic dim evenly")
    chunk = -(-dim // n)  # the last part may be smaller (opset 18)
    return [min(chunk, max(0, dim - i * chunk)) for i in range(n)]


def _infer_split(node: Node, ins: list[Value | None]) -> Out:
    x = _shape(ins[0], node)
    axis = norm_axis(node.attrs.get("axis", 0), len(x))
    outs = []
    for s in split_sizes(node, x[axis]):
        shp = list(x)
        shp[axis] = s
        outs.append((ins[0].dtype, tuple(shp)))  # type: ignore[union-attr]
    return outs


def _split_eval(node: Node, x: np.ndarray) -> list[np.ndarray]:
    axis = norm_axis(node.attrs.get("axis", 0), x.ndim)
    bounds = np.cumsum(split_sizes(node, x.shape[axis]))[:-1]
    return [np.asarray(p, order="C") for p in np.split(x, bounds, axis=axis)]


_register("Split", _infer_split, _split_eval)


def _infer_tile(node: Node, ins: list[Value | None]) -> Out:
    x = _shape(ins[0], node)
    reps = [int(r) for r in _const(ins[1], node, "repeats")]
    return [(ins[0].dtype, tuple(d * r if isinstance(d, int) else d for d, r in zip(x, reps, strict=True)))]  # type: ignore[union-attr]


_register("Tile", _infer_tile, lambda n, x, r: [np.tile(x, [int(v) for v in r])], fold_only=True)


def evaluate(node: Node, arrays: list[np.ndarray | None]) -> list[np.ndarray]:
    """Runs the numpy reference of `node` on `arrays` (None for absent optional inputs)."""
    op = OPS.get(node.op)
    if op is None or op.evaluate is None:
        raise UnsupportedOpError(node.op, node.origin or node.name, node.opset, "no reference implementation")
    while arrays and arrays[-1] is None:
        arrays = arrays[:-1]
    return op.evaluate(node, *arrays)
