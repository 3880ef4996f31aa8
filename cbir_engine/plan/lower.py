"""Lowering: each node of a specialised graph (all shapes known) -> kernel steps.

A step names a kernel of the C++ executor with integer and float arguments and operands. Operands
are values (placed in the arena later by the memory plan) or constants (weights, prepacked once
and cached by the engine across batch sizes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cbir_engine.errors import PlanFileError, UnsupportedOpError
from cbir_engine.graph.ir import Graph, Node
from cbir_engine.graph.ops import (
    OPS,
    conv_geometry,
    full_pads,
    reduce_axes,
    slice_params,
    softmax_blocks,
    split_sizes,
)
from cbir_engine.graph.shapes import norm_axis, window_geometry

ACT = {"": 0, "Relu": 1, "Clip": 2, "LeakyRelu": 3, "Sigmoid": 4}
UNARY = {
    "Relu": 0, "Sigmoid": 1, "Tanh": 2, "Clip": 3, "LeakyRelu": 4, "Sqrt": 5, "Exp": 6, "Log": 7,
    "Abs": 8, "Neg": 9, "Reciprocal": 10, "Floor": 12, "Ceil": 13, "Softplus": 14, "Elu": 15,
    "HardSigmoid": 16, "Erf": 17,
}
BINARY = {"Add": 0, "Sub": 1, "Mul": 2, "Div": 3, "Pow": 4, "Max": 5, "Min": 6}
REDUCE = {
    "ReduceSum": 0, "ReduceMean": 1, "ReduceMax": 2, "ReduceMin": 3, "ReduceL2": 4,
    "ReduceL1": 5, "ReduceSumSquare": 6, "ReduceProd": 7,
}
PAD_MODE = {"constant": 0, "reflect": 1, "edge": 2, "wrap": 3}
CONV_METHOD = {"gemm": 0, "depthwise": 1, "winograd": 2, "winograd_f2": 3, "direct": 4}


def winograd_method(c: int, k: int, oh: int, ow: int, n: int = 1) -> str | None:
    """The Winograd variant that beats the GEMM path for a 3x3 stride-1 conv of a batch of n, if
    any. Both need enough channels to amortise the transforms. F(4x4,3x3) needs 16 or more 4x4
    tiles over the batch to fill its GEMMs and to amortise its transformed weights (36 per
    filter); with fewer, F(2x2,3x3) still gives at least 4 tiles an image from 4x4 up, with 16
    products per tile in place of 36 per 2x2 outputs. Measured (2 threads, Zen 4), F(2x2) time /
    F(4x4) time: 512->512 at 7x7 0.51 (batch 1, 4 tiles), 0.93 (batch 2), 1.44 (batch 4), 1.49
    (batch 8); 448->384 at 8x8 0.54, 0.97, 1.60, 1.61; 128->32 at 7x7 0.72 (batch 1), 1.64
    (batch 4), 1.31-1.69 (batch 8, two runs); 256->256 at 14x14, batch 1 (16 tiles): 1.53."""
    if c < 16 or k < 16:
        return None
    if oh >= 12 and ow >= 12:
        return "winograd"
    if 4 <= oh < 12 and 4 <= ow < 12:
        return "winograd" if n * -(-oh // 4) * -(-ow // 4) >= 16 else "winograd_f2"
    return None


def winograd_depends_on_batch(c: int, k: int, oh: int, ow: int) -> bool:
    """Whether winograd_method picks another tile size for another batch size."""
    return winograd_method(c, k, oh, ow, 1) != winograd_method(c, k, oh, ow, 1 << 20)


def direct_pays(c: int, k: int, kh: int, kw: int, sh: int, sw: int, oh: int, ow: int) -> bool:
    """Whether the direct kernel (output channels in the vector lanes, pixels broadcast from an
    NHWC copy of the input) beats the GEMM path for an ungrouped conv that Winograd does not take.

    The GEMM path puts pixels in the lanes, 16 a panel, and packs its B operand from the image:
    it wastes the padded columns of planes whose pixel count is not a multiple of 16 (49 -> 64
    at 7x7) and pays an im2col gather per tap, which weighs most for strided, 1x7/7x1 and 5x5
    convs. Measured on single-conv models, interleaved, 1 thread (Zen 4), direct/GEMM time:
    0.82-0.91 for 1x7/7x1 at 17x17, 0.78 for 5x5 at 35x35, 0.91-0.95 for 1x1 at 7x7, 0.81-0.95
    for stride-2 convs with 7x7, 14x14 and 17x17 outputs; but 1.08-1.18 where the pixel count
    fills the panels exactly (1x1 at 14x14 is 196 = 12.25 panels and still lost: 1.08-1.10;
    1x1 and 1x3 at 8x8, a stride-2 3x3 with an 8x8 output) and about 1.0 at 28x28 outputs.
    Once the GEMM prefetched its output and residual rows, a stride-2 1x1 with a 14x14 output
    (ResNet's 512->1024 projection) ran 1.05x (batch 1) and 1.14x (batch 8, 2 threads) longer
    direct than as a GEMM, whose strided gather is a plain copy of every other pixel; at 7x7
    outputs direct still wins (0.79). Remeasured after the direct kernel's epilogue went to
    vectors and its tiles of at most 4 pixels took two channel blocks (AVX-512), stride-2 3x3
    convs whose outputs fill the panels, here sent to the GEMM: 128->128 at 56x56 (28x28 out)
    0.92 at 1 thread, 0.965 at batch 1 and 1.024 at batch 8 on 2 threads; 192->320 at 17x17
    (8x8 out) 0.98, 0.919 and 0.950. The sign turns with the batch, so the rule is unchanged.
    """
    if c < 16 or k < 16:  # the stem's 3 input channels: a copy and a short reduction per tap
        return False
    pixels = oh * ow
    if pixels <= 49 or kh * kw >= 25:
        return True
    if kh == kw == 1:
        return False
    return (kh != kw or sh > 1 or sw > 1) and pixels % 16 != 0


ALIAS_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
MAX_RANK = 8


@dataclass(frozen=True)
class Operand:
    """A tensor as a kernel sees it: a value (arena) or a constant (index), viewed with `shape`."""

    shape: tuple[int, ...]
    value: str | None = None
    const: int | None = None


@dataclass
class PlanStep:
    kernel: str
    ints: list[int]
    floats: list[float]
    operands: list[Operand | None]
    node: str  # "Op 'name'" of the node it implements
    label: str  # what runs it, for summaries
    flops: int = 0
    outputs: list[str] = field(default_factory=list)


def epilogue_activation(node: Node) -> tuple[int, float, float]:
    """The fused activation of a node as the kernels take it (CPU and GPU): (code, lo, hi), where
    lo/hi are Clip's bounds and lo is LeakyRelu's alpha."""
    act = node.attrs.get("activation", "")
    if act not in ACT:
        raise UnsupportedOpError(node.op, node.origin or node.name, node.opset, f"fused activation {act}")
    a = node.attrs.get("activation_attrs", {})
    if act == "Clip":
        lo, hi = a.get("min"), a.get("max")
        return ACT[act], -math.inf if lo is None else float(lo), math.inf if hi is None else float(hi)
    if act == "LeakyRelu":
        return ACT[act], float(a.get("alpha", 0.01)), 0.0
    return ACT[act], 0.0, 0.0


def _act_label(node: Node) -> str:
    act = node.attrs.get("activation")
    return f" +{act.lower()}" if act else ""


def _contig_strides(shape: tuple[int, ...]) -> list[int]:
    out, s = [], 1
    for d in reversed(shape):
        out.append(s)
        s *= d
    return out[::-1]


def _broadcast_strides(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[int]:
    pad = len(out_shape) - len(in_shape)
    full = (1,) * pad + tuple(in_shape)
    strides = _contig_strides(full)
    return [0 if full[i] == 1 and out_shape[i] != 1 else strides[i] for i in range(len(out_shape))]


def _collapse(shape: list[int], *strides: list[int]) -> tuple[list[int], list[list[int]]]:
    """Merges neighbouring dims that every operand walks the same way (contiguous or broadcast)."""
    dims = [i for i, d in enumerate(shape) if d != 1] or [len(shape) - 1] if shape else []
    out_shape: list[int] = []
    out_strides: list[list[int]] = [[] for _ in strides]
    for i in dims:
        if out_shape and all(st[i] * shape[i] == os[-1] for st, os in zip(strides, out_strides, strict=True)):
            out_shape[-1] *= shape[i]
            for st, os in zip(strides, out_strides, strict=True):
                os[-1] = st[i]
            continue
        out_shape.append(shape[i])
        for st, os in zip(strides, out_strides, strict=True):
            os.append(st[i])
    return out_shape, out_strides


Packer = Callable[[str, str, Callable[[], np.ndarray]], np.ndarray]

# Lowerings that live outside this module (fused retrieval heads, ...): op -> fn(lowering, node).
LOWERINGS: dict[str, Callable[[Lowering, Node], None]] = {}


def register_lowering(op: str) -> Callable:
    def deco(fn: Callable[[Lowering, Node], None]) -> Callable[[Lowering, Node], None]:
        if op in LOWERINGS:
            raise ValueError(f"a lowering for {op} is already registered")
        LOWERINGS[op] = fn
        return fn

    return deco


class Lowering:
    """Turns the nodes of a specialised graph into PlanSteps."""

    def __init__(self, g: Graph, packer: Packer, packed_only: frozenset[str] = frozenset(),
                 winograd: bool = True):
        self.g = g
        self.winograd = winograd
        self.packer = packer
        self.packed_only = packed_only  # constants present only in packed form (loaded plans)
        self.raw_constants: set[str] = set()  # constants kernels read as they are
        self.steps: list[PlanStep] = []
        self.constants: list[np.ndarray] = []
        self._const_ids: dict[str, int] = {}
        self.alias: dict[str, str] = {}  # value -> the value that owns its memory

    # ---- operands ----
    def root(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def shape(self, name: str) -> tuple[int, ...]:
        s = self.g.values[name].shape
        assert s is not None and all(isinstance(d, int) for d in s), f"{name}: {s}"
        return tuple(int(d) for d in s)  # type: ignore[arg-type]

    def constant(self, key: str, make: Callable[[], np.ndarray]) -> int:
        if key not in self._const_ids:
            arr = np.asarray(make(), dtype=np.float32, order="C")
            self._const_ids[key] = len(self.constants)
            self.constants.append(arr)
        return self._const_ids[key]

    def operand(self, name: str, shape: tuple[int, ...] | None = None) -> Operand | None:
        if not name:
            return None
        v = self.g.values[name]
        shp = tuple(shape) if shape is not None else self.shape(name)
        if v.is_const:
            if name in self.packed_only:
                raise PlanFileError(f"the saved plan holds '{name}' only prepacked, but a kernel "
                                    "needs it raw; save the plan again from the ONNX model")
            self.raw_constants.add(name)
            if v.const.dtype != np.float32:  # type: ignore[union-attr]
                raise UnsupportedOpError("(constant)", name, None,
                                         f"{v.const.dtype} constant read by a float32 kernel")  # type: ignore[union-attr]
            return Operand(shp, const=self.constant(f"value:{name}", lambda: v.const))  # type: ignore[arg-type,return-value]
        return Operand(shp, value=self.root(name))

    def packed(self, name: str, kind: str, make: Callable[[], np.ndarray]) -> Operand:
        if name in self.packed_only:
            def make() -> np.ndarray:
                raise PlanFileError(f"the saved plan lacks the '{kind}' packing of '{name}'")
        arr = self.packer(name, kind, make)
        return Operand((arr.size,), const=self.constant(f"{kind}:{name}", lambda: arr))

    def emit(self, node: Node, kernel: str, ints: list[int], floats: list[float],
             operands: list[Operand | None], label: str = "", flops: int = 0) -> None:
        self.steps.append(PlanStep(kernel, [int(i) for i in ints], [float(f) for f in floats],
                                   operands, node.describe(), label or kernel, int(flops),
                                   list(node.outputs)))

    def fail(self, node: Node, detail: str) -> None:
        raise UnsupportedOpError(node.op, node.origin or node.name, node.opset, detail)

    # ---- driver ----
    def run(self) -> None:
        for node in self.g.nodes:
            op = OPS[node.op]
            if op.fold_only:
                self.fail(node, "only supported when its inputs are constant (shape computations); "
                                "here they are computed at run time")
            for name in [*node.inputs, *node.outputs]:
                if name and self.g.values[name].dtype != np.float32 and not self.g.values[name].is_const:
                    self.fail(node, f"{self.g.values[name].dtype} tensors (the engine computes in float32)")
            if node.op in ALIAS_OPS:
                self.alias[node.outputs[0]] = node.inputs[0]
                continue
            if node.op in LOWERINGS:
                LOWERINGS[node.op](self, node)
                continue
            fn = getattr(self, f"lower_{node.op}", None)
            if fn is None:
                for table, method in ((UNARY, self.lower_unary), (BINARY, self.lower_binary),
                                      (REDUCE, self.lower_reduce)):
                    if node.op in table:
                        fn = method
                        break
            if fn is None:
                self.fail(node, "no CPU kernel")
            fn(node)  # type: ignore[misc]

    # ---- convolution family ----
    def lower_Conv(self, node: Node) -> None:
        x_shape, w_shape = self.shape(node.inputs[0]), self.shape(node.inputs[1])
        nsp = len(x_shape) - 2
        if nsp not in (1, 2):
            self.fail(node, f"{nsp}-D convolution (1-D and 2-D are supported)")
        out, pb, pe = conv_geometry(node, x_shape, w_shape)
        a = node.attrs
        strides = list(a.get("strides") or [1] * nsp)
        dil = list(a.get("dilations") or [1] * nsp)
        group = int(a.get("group", 1))
        y_shape = self.shape(node.outputs[0])
        if nsp == 1:  # a 1-D conv is a 2-D conv over rows of height 1
            x4 = (x_shape[0], x_shape[1], 1, x_shape[2])
            y4 = (y_shape[0], y_shape[1], 1, y_shape[2])
            kh, kw, sh, sw, dh, dw, pt, pl = 1, w_shape[2], 1, strides[0], 1, dil[0], 0, pb[0]
        else:
            x4, y4 = x_shape, y_shape
            kh, kw = w_shape[2], w_shape[3]
            sh, sw, dh, dw, pt, pl = strides[0], strides[1], dil[0], dil[1], pb[0], pb[1]
        C, K = x4[1], y4[1]
        w_name = node.inputs[1]
        w_const = self.g.const(w_name)
        w_raw_shape = (K, C // group, kh, kw)
        method = "gemm"
        if group > 1 and group == C and K % C == 0:
            method = "depthwise"
        elif (self.winograd and w_const is not None
              and (kh, kw, sh, sw, dh, dw, group) == (3, 3, 1, 1, 1, 1, 1)):
            method = winograd_method(C, K, y4[2], y4[3], y4[0]) or "gemm"
            if winograd_depends_on_batch(C, K, y4[2], y4[3]) and w_name not in self.packed_only:
                # Another batch size takes the other tile size: keep the raw weight (in memory
                # and in saved plans) to pack it from.
                self.raw_constants.add(w_name)
        if (method == "gemm" and w_const is not None and group == 1 and not node.input(4)
                and direct_pays(C, K, kh, kw, sh, sw, y4[2], y4[3])):
            method = "direct"
        from cbir_engine import _C

        if method == "depthwise" or w_const is None:
            w_op = self.operand(w_name, w_raw_shape)
            prepacked = 0
        else:
            # Each method's prepacked weight layout: the plan file keeps it under `kind`.
            kind, pack = {
                "winograd": ("winograd_f4x3", _C.pack_winograd_weight),
                "winograd_f2": ("winograd_f2x3", _C.pack_winograd2_weight),
                "direct": ("direct_conv", _C.pack_direct_conv_weight),
                "gemm": (f"conv_g{group}", lambda w: _C.pack_conv2d_weight(w, group)),
            }[method]
            w4 = np.asarray(w_const.reshape(w_raw_shape), np.float32, order="C")
            try:
                w_op = self.packed(w_name, kind, lambda: pack(w4))
            except PlanFileError:
                # A plan saved with only the other Winograd packing (and no raw weight) still
                # runs every batch size, with the tile size it has.
                if method not in ("winograd", "winograd_f2"):
                    raise
                method = "winograd_f2" if method == "winograd" else "winograd"
                kind, pack = {"winograd": ("winograd_f4x3", _C.pack_winograd_weight),
                              "winograd_f2": ("winograd_f2x3", _C.pack_winograd2_weight)}[method]
                w_op = self.packed(w_name, kind, lambda: pack(w4))
            prepacked = 1
        act, act_a, act_b = epilogue_activation(node)
        ints = [kh, kw, sh, sw, pt, pl, dh, dw, group, act, CONV_METHOD[method], prepacked]
        operands = [self.operand(node.inputs[0], x4), w_op, self.operand(node.input(2)),
                    self.operand(node.input(3), y4), self.operand(node.outputs[0], y4)]
        if node.input(4):  # fuse_input_affine: x * scale + shift (+ReLU) applied while packing
            if method != "gemm":
                self.fail(node, "an input affine runs only on the GEMM path")
            ints.append(1 if node.attrs.get("input_activation") == "Relu" else 0)
            operands += [self.operand(node.input(4), (C,)), self.operand(node.input(5), (C,))]
        self.emit(
            node, "conv2d", ints, [act_a, act_b], operands,
            label=f"conv2d/{method} {kh}x{kw}/s{sh}"
                  + (f" g{group}" if group > 1 and method != "depthwise" else "")
                  + (" +input_affine" + ("_relu" if node.attrs.get("input_activation") else "")
                     if node.input(4) else "")
                  + (" +residual" if node.input(3) else "")
                  + _act_label(node),
            flops=2 * math.prod(y4) * (C // group) * kh * kw,
        )

    def lower_BatchNormalization(self, node: Node) -> None:
        params = [self.g.const(i) for i in node.inputs[1:5]]
        if any(p is None for p in params):
            self.fail(node, "run-time statistics (decompose_batchnorm should have run)")
        scale, bias, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)  # type: ignore[arg-type]
        k = scale / np.sqrt(var + node.attrs.get("epsilon", 1e-5))
        key = node.outputs[0]
        s_op = Operand((k.size,), const=self.constant(f"bn_scale:{key}", lambda: k))
        h_op = Operand((k.size,), const=self.constant(f"bn_shift:{key}", lambda: bias - mean * k))
        act, act_a, act_b = epilogue_activation(node)
        self.emit(node, "channel_affine", [act], [act_a, act_b],
                  [self.operand(node.inputs[0]), s_op, h_op, self.operand(node.outputs[0])],
                  label="channel_affine")

    def _pool_args(self, node: Node) -> tuple[list[int], tuple, tuple]:
        x_shape = self.shape(node.inputs[0])
        nsp = len(x_shape) - 2
        if nsp not in (1, 2):
            self.fail(node, f"{nsp}-D pooling (1-D and 2-D are supported)")
        a = node.attrs
        k = list(a["kernel_shape"])
        s = list(a.get("strides") or [1] * nsp)
        d = list(a.get("dilations") or [1] * nsp)
        out, pb, pe = window_geometry(x_shape[2:], k, s, d, a.get("pads") or [0] * (2 * nsp),
                                      a.get("auto_pad", "NOTSET"), bool(a.get("ceil_mode", 0)))
        y_shape = self.shape(node.outputs[0])
        if nsp == 1:
            ints = [1, k[0], 1, s[0], 0, pb[0], 0, pe[0], 1, d[0]]
            return ints, (*x_shape[:2], 1, x_shape[2]), (*y_shape[:2], 1, y_shape[2])
        ints = [k[0], k[1], s[0], s[1], pb[0], pb[1], pe[0], pe[1], d[0], d[1]]
        return ints, x_shape, y_shape

    def lower_MaxPool(self, node: Node) -> None:
        ints, x4, y4 = self._pool_args(node)
        self.emit(node, "maxpool2d", ints + [0],
                  [], [self.operand(node.inputs[0], x4), self.operand(node.outputs[0], y4)],
                  label=f"maxpool2d {ints[0]}x{ints[1]}/s{ints[2]}")

    def lower_AveragePool(self, node: Node) -> None:
        ints, x4, y4 = self._pool_args(node)
        ints.append(int(node.attrs.get("count_include_pad", 0)))
        operands = [self.operand(node.inputs[0], x4), self.operand(node.outputs[0], y4)]
        label = f"avgpool2d {ints[0]}x{ints[1]}/s{ints[2]}"
        if node.input(1):  # fuse_input_affine: x * scale + shift (+ReLU) applied as x is read
            relu = node.attrs.get("input_activation") == "Relu"
            ints.append(int(relu))
            operands += [self.operand(node.input(1), (x4[1],)), self.operand(node.input(2), (x4[1],))]
            label += " +input_affine" + ("_relu" if relu else "")
        self.emit(node, "avgpool2d", ints, [], operands, label=label)

    def _global_pool(self, node: Node, kind: int, label: str) -> None:
        self.emit(node, "global_pool", [kind], [],
                  [self.operand(node.inputs[0]), self.operand(node.outputs[0])], label=label)

    def lower_GlobalAveragePool(self, node: Node) -> None:
        self._global_pool(node, 0, "global_avg_pool")

    def lower_GlobalMaxPool(self, node: Node) -> None:
        self._global_pool(node, 1, "global_max_pool")

    def lower_LRN(self, node: Node) -> None:
        a = node.attrs
        self.emit(node, "lrn", [a["size"]], [a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0)],
                  [self.operand(node.inputs[0]), self.operand(node.outputs[0])])

    # ---- dense ----
    def _matrix(self, name: str, rows_cols: tuple[int, int], trans: bool, which: str
                ) -> tuple[Operand, int, int, int]:
        """An operand for GEMM side `which` ('a' or 'b'): (operand, packed, row stride, col stride)."""
        from cbir_engine import _C

        shape = self.shape(name)
        c = self.g.const(name)
        if c is not None and c.ndim == 2:
            view = c.T if trans else c
            pack = _C.pack_gemm_a if which == "a" else _C.pack_gemm_b
            op = self.packed(name, f"gemm_{which}{'T' if trans else ''}",
                             lambda: pack(np.asarray(view, np.float32)))
            return op, 1, 0, 0
        op = self.operand(name)
        assert op is not None
        rs, cs = (1, shape[-1]) if trans else (shape[-1], 1)
        del rows_cols
        return op, 0, rs, cs

    def lower_Gemm(self, node: Node) -> None:
        a = node.attrs
        ta, tb = bool(a.get("transA", 0)), bool(a.get("transB", 0))
        a_shape, b_shape = self.shape(node.inputs[0]), self.shape(node.inputs[1])
        M, K = (a_shape[1], a_shape[0]) if ta else a_shape
        N = b_shape[0] if tb else b_shape[1]
        a_op, a_packed, a_rs, a_cs = self._matrix(node.inputs[0], (M, K), ta, "a")
        b_op, b_packed, b_rs, b_cs = self._matrix(node.inputs[1], (K, N), tb, "b")
        beta = float(a.get("beta", 1.0))
        bias_mode, bias_op, res_op, res_rs, res_cs = 0, None, None, 0, 0
        c_name = node.input(2)
        if c_name and beta != 0.0:
            c_shape = self.shape(c_name)
            c_const = self.g.const(c_name)
            full = (1,) * (2 - len(c_shape)) + c_shape
            if c_const is not None and full[0] == 1 and full[1] == N:
                bias_mode = 2
                bias_op = Operand((N,), const=self.constant(
                    f"gemm_bias:{c_name}:{beta}", lambda: beta * np.asarray(c_const, np.float64).reshape(-1)))
                beta = 1.0
            elif c_const is not None and full[1] == 1 and full[0] == M and M > 1:
                bias_mode = 1
                bias_op = Operand((M,), const=self.constant(
                    f"gemm_rowbias:{c_name}:{beta}",
                    lambda: beta * np.asarray(c_const, np.float64).reshape(-1)))
                beta = 1.0
            else:
                res_op = self.operand(c_name)
                res_rs = 0 if full[0] == 1 else full[1]
                res_cs = 0 if full[1] == 1 else 1
        act, act_a, act_b = epilogue_activation(node)
        self.emit(
            node, "gemm",
            [M, N, K, a_packed, a_rs, a_cs, b_packed, b_rs, b_cs, bias_mode, res_rs, res_cs, act, 0],
            [a.get("alpha", 1.0), beta, act_a, act_b],
            [a_op, b_op, bias_op, res_op, self.operand(node.outputs[0])],
            label="gemm" + (" packed-B" if b_packed else "") + _act_label(node),
            flops=2 * M * N * K,
        )

    def lower_MatMul(self, node: Node) -> None:
        a_shape, b_shape = self.shape(node.inputs[0]), self.shape(node.inputs[1])
        a2 = (1, *a_shape) if len(a_shape) == 1 else a_shape
        b2 = (*b_shape, 1) if len(b_shape) == 1 else b_shape
        M, K, N = a2[-2], a2[-1], b2[-1]
        out_batch = tuple(np.broadcast_shapes(a2[:-2], b2[:-2]))
        if len(b2) == 2 and len(a2) >= 2:
            # No batch on B: fold A's batch dims into M (one bigger GEMM, B packed once).
            M = M * math.prod(a2[:-2])
            nb, bshape, a_bs, b_bs = 0, [], [], []
        else:
            nb = len(out_batch)
            if nb > MAX_RANK:
                self.fail(node, "too many batch dims")
            bshape = list(out_batch)
            a_bs = _broadcast_strides(a2[:-2], out_batch)
            a_bs = [s * M * K for s in a_bs] if nb else []
            b_bs = _broadcast_strides(b2[:-2], out_batch)
            b_bs = [s * K * N for s in b_bs] if nb else []
        b_const = self.g.const(node.inputs[1])
        if b_const is not None and len(b2) == 2:
            from cbir_engine import _C

            b_op = self.packed(node.inputs[1], "gemm_b",
                               lambda: _C.pack_gemm_b(np.asarray(b_const, np.float32).reshape(K, N)))
            b_packed, b_rs, b_cs = 1, 0, 0
        else:
            b_op, b_packed, b_rs, b_cs = self.operand(node.inputs[1]), 0, N, 1
        a_op = self.operand(node.inputs[0])
        self.emit(
            node, "gemm",
            [M, N, K, 0, K, 1, b_packed, b_rs, b_cs, 0, 0, 0, 0, nb, *bshape, *a_bs, *b_bs, *([0] * nb)],
            [1.0, 1.0, 0.0, 0.0],
            [a_op, b_op, None, None, self.operand(node.outputs[0])],
            label="matmul" + (" packed-B" if b_packed else ""),
            flops=2 * M * N * K * max(1, math.prod(bshape)),
        )

    # ---- elementwise ----
    def lower_unary(self, node: Node) -> None:
        a = node.attrs
        lo, hi = 0.0, 0.0
        if node.op == "Clip":
            lo = -math.inf if a.get("min") is None else float(a["min"])
            hi = math.inf if a.get("max") is None else float(a["max"])
        elif node.op in ("LeakyRelu", "Elu"):
            lo = float(a.get("alpha", 0.01 if node.op == "LeakyRelu" else 1.0))
        elif node.op == "HardSigmoid":
            lo, hi = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
        self.emit(node, "unary", [UNARY[node.op]], [lo, hi],
                  [self.operand(node.inputs[0]), self.operand(node.outputs[0])],
                  label=node.op.lower())

    def lower_binary(self, node: Node) -> None:
        self._binary(node, BINARY[node.op], node.inputs[0], node.inputs[1])

    def _binary(self, node: Node, op: int, a_name: str, b_name: str | None) -> None:
        out = self.shape(node.outputs[0])
        a_shape = self.shape(a_name)
        a_st = _broadcast_strides(a_shape, out)
        if b_name is None:  # Expand: x + 0 broadcast to the output shape
            b_op = Operand((1,), const=self.constant("zero", lambda: np.zeros(1, np.float32)))
            b_st = [0] * len(out)
        else:
            b_op = self.operand(b_name)
            b_st = _broadcast_strides(self.shape(b_name), out)
        if not out:
            shape, (a_st, b_st) = [1], ([0], [0])
        else:
            shape, (a_st, b_st) = _collapse(list(out), a_st, b_st)
        if len(shape) > MAX_RANK:
            self.fail(node, f"rank {len(shape)} after merging dims (at most {MAX_RANK})")
        act, act_a, act_b = epilogue_activation(node)
        operands = [self.operand(a_name), b_op, self.operand(node.outputs[0])]
        residual = node.input(2) if b_name is not None else ""
        if residual:  # fuse_residual_eltwise: same shape as the output, added before the activation
            if self.shape(residual) != tuple(out):
                self.fail(node, "the residual must have the output's shape")
            operands.append(self.operand(residual))
        self.emit(node, "binary", [op, act, len(shape), *shape, *a_st, *b_st], [act_a, act_b], operands,
                  label=node.op.lower() + (" +residual" if residual else "") + _act_label(node))

    def lower_Expand(self, node: Node) -> None:
        self._binary(node, BINARY["Add"], node.inputs[0], None)

    # ---- reductions ----
    def lower_reduce(self, node: Node) -> None:
        shape = self.shape(node.inputs[0])
        axes = reduce_axes(node, len(shape))
        if not axes:
            self._copy(node, node.inputs[0], node.outputs[0])
            return
        if len(shape) > MAX_RANK:
            self.fail(node, f"rank {len(shape)}")
        flags = [1 if i in axes else 0 for i in range(len(shape))]
        self.emit(node, "reduce", [REDUCE[node.op], len(shape), *shape, *flags], [],
                  [self.operand(node.inputs[0]), self.operand(node.outputs[0])],
                  label=node.op[6:].lower() + f" over {list(axes)}")

    def lower_Softmax(self, node: Node) -> None:
        o, a, i = softmax_blocks(node, self.shape(node.inputs[0]))
        self.emit(node, "softmax", [o, a, i, int(node.op == "LogSoftmax")], [],
                  [self.operand(node.inputs[0]), self.operand(node.outputs[0])], label=node.op.lower())

    lower_LogSoftmax = lower_Softmax

    def lower_LpNormalization(self, node: Node) -> None:
        shape = self.shape(node.inputs[0])
        axis = norm_axis(node.attrs.get("axis", -1), len(shape))
        o, a, i = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
        self.emit(node, "lp_normalize", [o, a, i, node.attrs.get("p", 2)], [],
                  [self.operand(node.inputs[0]), self.operand(node.outputs[0])], label="lp_normalize")

    # ---- layout ----
    def _copy(self, node: Node, src: str, dst: str) -> None:
        self.emit(node, "copy", [], [], [self.operand(src), self.operand(dst)], label="copy")

    def lower_Concat(self, node: Node) -> None:
        ins = [i for i in node.inputs if i]
        out = self.shape(node.outputs[0])
        axis = norm_axis(node.attrs["axis"], len(out))
        outer = math.prod(out[:axis])
        chunks = [math.prod(self.shape(i)[axis:]) for i in ins]
        self.emit(node, "concat", [outer, *chunks], [],
                  [*(self.operand(i) for i in ins), self.operand(node.outputs[0])], label="concat")

    def lower_Transpose(self, node: Node) -> None:
        shape = self.shape(node.inputs[0])
        perm = list(node.attrs.get("perm") or range(len(shape))[::-1])
        if len(shape) > MAX_RANK:
            self.fail(node, f"rank {len(shape)}")
        self.emit(node, "transpose", [len(shape), *shape, *perm], [],
                  [self.operand(node.inputs[0]), self.operand(node.outputs[0])], label="transpose")

    def _crop_or_pad(self, node: Node, src: str, dst: str, begin: list[int], end: list[int],
                     mode: int = 0, value: float = 0.0, label: str = "pad") -> None:
        shape = self.shape(src)
        if len(shape) > MAX_RANK:
            self.fail(node, f"rank {len(shape)}")
        self.emit(node, "pad", [mode, len(shape), *shape, *begin, *end], [value],
                  [self.operand(src), self.operand(dst)], label=label)

    def lower_Pad(self, node: Node) -> None:
        shape = self.shape(node.inputs[0])
        pads = full_pads(node, len(shape))
        r = len(shape)
        mode = node.attrs.get("mode", "constant")
        if mode in ("reflect", "wrap") and any(
            max(pads[i], pads[r + i]) > (shape[i] - 1 if mode == "reflect" else shape[i]) for i in range(r)
        ):
            self.fail(node, f"{mode} padding wider than the input")
        self._crop_or_pad(node, node.inputs[0], node.outputs[0], pads[:r], pads[r:],
                          PAD_MODE[mode], float(node.attrs.get("value", 0.0)), label=f"pad/{mode}")

    def lower_Slice(self, node: Node) -> None:
        shape = self.shape(node.inputs[0])
        consts = [self.g.const(i) for i in node.inputs[1:]] + [None] * (5 - len(node.inputs))
        begin, end = [0] * len(shape), [0] * len(shape)
        for axis, s, e, step in slice_params(node, len(shape), *consts[:4]):
            if step != 1:
                self.fail(node, "slices with a step other than 1 on run-time tensors")
            lo, hi, _ = slice(s, e, 1).indices(shape[axis])
            hi = max(hi, lo)
            begin[axis], end[axis] = -lo, -(shape[axis] - hi)
        self._crop_or_pad(node, node.inputs[0], node.outputs[0], begin, end, label="slice")

    def lower_Split(self, node: Node) -> None:
        shape = self.shape(node.inputs[0])
        axis = norm_axis(node.attrs.get("axis", 0), len(shape))
        start = 0
        for out, size in zip(node.outputs, split_sizes(node, shape[axis]), strict=True):
            begin, end = [0] * len(shape), [0] * len(shape)
            begin[axis], end[axis] = -start, -(shape[axis] - start - size)
            if out:
                self._crop_or_pad(node, node.inputs[0], out, begin, end, label="split")
            start += size
