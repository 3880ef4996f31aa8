"""One importer per ONNX operator, named as the operator (see registry.py for the contract).

Importers normalise what differs between opsets (attributes that became inputs, Softmax's 2-D
coercion before opset 13) so the IR has one form per operator.
"""

from __future__ import annotations

import numpy as np

from cbir_engine.onnx.registry import Ctx, onnx_op

In = str | None  # an input: a value name, or None when the optional input is absent


def _ints(a: np.ndarray | None) -> list[int] | None:
    return None if a is None else [int(v) for v in np.asarray(a).reshape(-1)]


def _scalar(a: np.ndarray | None) -> float | None:
    return None if a is None else float(np.asarray(a).reshape(-1)[0])


# ------------------------------------------------------------------ convolution, normalisation
@onnx_op("Conv", 1, 11, 22)
def Conv(ctx: Ctx, x: In, w: In, b: In = None, *, auto_pad: str = "NOTSET",
         dilations: list[int] | None = None, group: int = 1,
         kernel_shape: list[int] | None = None, pads: list[int] | None = None,
         strides: list[int] | None = None) -> None:
    if auto_pad not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        ctx.fail(f"auto_pad={auto_pad!r}")
    ctx.emit("Conv", [x, w, b], auto_pad=auto_pad, dilations=dilations, group=group,
             kernel_shape=kernel_shape, pads=pads, strides=strides)


@onnx_op("BatchNormalization", 7, 9, 14, 15)
def BatchNormalization(ctx: Ctx, x: In, scale: In, bias: In, mean: In, var: In, *,
                       epsilon: float = 1e-5, momentum: float = 0.9, spatial: int = 1,
                       training_mode: int = 0) -> None:
    if training_mode or len(ctx.outputs) > 1:
        ctx.fail("training mode (running statistics outputs) is not an inference op")
    if not spatial:
        ctx.fail("spatial=0 (per-activation statistics)")
    ctx.emit("BatchNormalization", [x, scale, bias, mean, var], epsilon=epsilon)


@onnx_op("LRN", 1, 13)
def LRN(ctx: Ctx, x: In, *, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0,
        size: int = 1) -> None:
    ctx.emit("LRN", [x], alpha=alpha, beta=beta, bias=bias, size=size)


@onnx_op("LpNormalization", 1, 22)
def LpNormalization(ctx: Ctx, x: In, *, axis: int = -1, p: int = 2) -> None:
    if p not in (1, 2):
        ctx.fail(f"p={p}")
    ctx.emit("LpNormalization", [x], axis=axis, p=p)


# ------------------------------------------------------------------ activations
def _unary(op: str, *versions: int) -> None:
    def fn(ctx: Ctx, x: In) -> None:
        ctx.emit(op, [x])

    fn.__name__ = fn.__qualname__ = op
    onnx_op(op, *versions)(fn)


for _op in ("Sqrt", "Exp", "Log", "Abs", "Neg", "Reciprocal", "Floor", "Ceil", "Sigmoid", "Tanh"):
    _unary(_op, 6, 13)
_unary("Relu", 6, 13, 14)
_unary("Erf", 9, 13)
_unary("Softplus", 1, 22)
_unary("Not", 1)


@onnx_op("LeakyRelu", 6, 16)
def LeakyRelu(ctx: Ctx, x: In, *, alpha: float = 0.01) -> None:
    ctx.emit("LeakyRelu", [x], alpha=alpha)


@onnx_op("Elu", 6, 22)
def Elu(ctx: Ctx, x: In, *, alpha: float = 1.0) -> None:
    ctx.emit("Elu", [x], alpha=alpha)


@onnx_op("HardSigmoid", 6, 22)
def HardSigmoid(ctx: Ctx, x: In, *, alpha: float = 0.2, beta: float = 0.5) -> None:
    ctx.emit("HardSigmoid", [x], alpha=alpha, beta=beta)


@onnx_op("Clip", 6, 11, 12, 13)
def Clip(ctx: Ctx, x: In, lo: In = None, hi: In = None, *, min: float | None = None,
         max: float | None = None) -> None:
    if ctx.opset < 11 or lo is None and hi is None and (min is not None or max is not None):
        bounds = (min, max)
    else:
        if (lo and ctx.const(lo) is None) or (hi and ctx.const(hi) is None):
            ctx.fail("min and max must be constants")
        bounds = (_scalar(ctx.const(lo)), _scalar(ctx.const(hi)))
    ctx.emit("Clip", [x], min=bounds[0], max=bounds[1])


@onnx_op("Identity", 1, 13, 14, 16, 19, 21, 23, 24, 25)
def Identity(ctx: Ctx, x: In) -> None:
    ctx.emit("Identity", [x])


@onnx_op("Dropout", 7, 10, 12, 13, 22)
def Dropout(ctx: Ctx, x: In, ratio: In = None, training_mode: In = None, *,
            ratio_: float = 0.5, seed: int = 0) -> None:
    # Inference: Dropout is the identity. The mask output only exists for training.
    if training_mode and (ctx.const(training_mode) is None or bool(ctx.const(training_mode))):
        ctx.fail("training_mode must be a constant false")
    if len(ctx.outputs) > 1 and ctx.outputs[1]:
        ctx.fail("the mask output (training only)")
    ctx.emit("Identity", [x], [ctx.outputs[0]])


# ------------------------------------------------------------------ elementwise arithmetic
def _binary(op: str, *versions: int) -> None:
    def fn(ctx: Ctx, a: In, b: In) -> None:
        ctx.emit(op, [a, b])

    fn.__name__ = fn.__qualname__ = op
    onnx_op(op, *versions)(fn)


for _op in ("Add", "Sub", "Mul", "Div"):
    _binary(_op, 7, 13, 14)
_binary("Pow", 7, 12, 13, 15)
for _op in ("Equal",):
    _binary(_op, 7, 11, 13, 19)
for _op in ("Less", "Greater"):
    _binary(_op, 7, 9, 13)
for _op in ("LessOrEqual", "GreaterOrEqual"):
    _binary(_op, 12, 16)
for _op in ("And", "Or"):
    _binary(_op, 7)


@onnx_op("Mod", 10, 13)
def Mod(ctx: Ctx, a: In, b: In, *, fmod: int = 0) -> None:
    if fmod:
        ctx.fail("fmod=1")
    ctx.emit("Mod", [a, b])


def _variadic(op: str, binary: str, mean: bool, *versions: int) -> None:
    def fn(ctx: Ctx, *xs: In) -> None:
        items = [x for x in xs if x]
        if not items:
            ctx.fail("needs at least one input")
        if len(items) == 1 and not mean:
            ctx.emit("Identity", items)
            return
        acc = items[0]
        for i, x in enumerate(items[1:]):
            last = i == len(items) - 2 and not mean
            acc = ctx.emit(binary, [acc, x], None if last else [ctx.tmp(binary.lower())])[0]
        if mean:
            dtype = ctx.graph.values[items[0]].dtype
            ctx.emit("Div", [acc, ctx.add_const(np.array(len(items), dtype=dtype))])

    fn.__name__ = fn.__qualname__ = op
    onnx_op(op, *versions)(fn)


_variadic("Sum", "Add", False, 8, 13)
_variadic("Mean", "Add", True, 8, 13)
_variadic("Max", "Max", False, 8, 12, 13)
_variadic("Min", "Min", False, 8, 12, 13)


@onnx_op("Where", 9, 16)
def Where(ctx: Ctx, cond: In, x: In, y: In) -> None:
    ctx.emit("Where", [cond, x, y])


# ------------------------------------------------------------------ pooling
@onnx_op("MaxPool", 8, 10, 11, 12, 22)
def MaxPool(ctx: Ctx, x: In, *, auto_pad: str = "NOTSET", ceil_mode: int = 0,
            dilations: list[int] | None = None, kernel_shape: list[int] | None = None,
            pads: list[int] | None = None, storage_order: int = 0,
            strides: list[int] | None = None) -> None:
    if len(ctx.outputs) > 1 and ctx.outputs[1]:
        ctx.fail("the Indices output")
    if kernel_shape is None:
        ctx.fail("kernel_shape is required")
    ctx.emit("MaxPool", [x], [ctx.outputs[0]], auto_pad=auto_pad, ceil_mode=ceil_mode,
             dilations=dilations, kernel_shape=kernel_shape, pads=pads, strides=strides)


@onnx_op("AveragePool", 7, 10, 11, 19, 22)
def AveragePool(ctx: Ctx, x: In, *, auto_pad: str = "NOTSET", ceil_mode: int = 0,
                count_include_pad: int = 0, dilations: list[int] | None = None,
                kernel_shape: list[int] | None = None, pads: list[int] | None = None,
                strides: list[int] | None = None) -> None:
    if kernel_shape is None:
        ctx.fail("kernel_shape is required")
    ctx.emit("AveragePool", [x], auto_pad=auto_pad, ceil_mode=ceil_mode,
             count_include_pad=count_include_pad, dilations=dilations,
             kernel_shape=kernel_shape, pads=pads, strides=strides)


@onnx_op("GlobalAveragePool", 1, 22)
def GlobalAveragePool(ctx: Ctx, x: In) -> None:
    ctx.emit("GlobalAveragePool", [x])


@onnx_op("GlobalMaxPool", 1, 22)
def GlobalMaxPool(ctx: Ctx, x: In) -> None:
    ctx.emit("GlobalMaxPool", [x])


# ------------------------------------------------------------------ dense
@onnx_op("Gemm", 7, 9, 11, 13)
def Gemm(ctx: Ctx, a: In, b: In, c: In = None, *, alpha: float = 1.0, beta: float = 1.0,
         transA: int = 0, transB: int = 0) -> None:
    ctx.emit("Gemm", [a, b, c], alpha=alpha, beta=beta, transA=transA, transB=transB)


@onnx_op("MatMul", 9, 13)
def MatMul(ctx: Ctx, a: In, b: In) -> None:
    ctx.emit("MatMul", [a, b])


# ------------------------------------------------------------------ shape and layout
@onnx_op("Flatten", 9, 11, 13, 21, 23, 24, 25)
def Flatten(ctx: Ctx, x: In, *, axis: int = 1) -> None:
    ctx.emit("Flatten", [x], axis=axis)


@onnx_op("Reshape", 5, 13, 14, 19, 21, 23, 24, 25)
def Reshape(ctx: Ctx, x: In, shape: In, *, allowzero: int = 0) -> None:
    ctx.emit("Reshape", [x, shape], allowzero=allowzero)


def _axes(ctx: Ctx, attr: list[int] | None, inp: In, what: str) -> list[int] | None:
    if inp:
        return _ints(ctx.require_const(inp, what))
    return attr


@onnx_op("Squeeze", 1, 11, 13, 21, 23, 24, 25)
def Squeeze(ctx: Ctx, x: In, axes_in: In = None, *, axes: list[int] | None = None) -> None:
    ctx.emit("Squeeze", [x], axes=_axes(ctx, axes, axes_in, "axes"))


@onnx_op("Unsqueeze", 1, 11, 13, 21, 23, 24, 25)
def Unsqueeze(ctx: Ctx, x: In, axes_in: In = None, *, axes: list[int] | None = None) -> None:
    ax = _axes(ctx, axes, axes_in, "axes")
    if ax is None:
        ctx.fail("axes are required")
    ctx.emit("Unsqueeze", [x], axes=ax)


@onnx_op("Transpose", 1, 13, 21, 23, 24, 25)
def Transpose(ctx: Ctx, x: In, *, perm: list[int] | None = None) -> None:
    ctx.emit("Transpose", [x], perm=perm)


@onnx_op("Concat", 4, 11, 13)
def Concat(ctx: Ctx, *xs: In, axis: int = 0) -> None:
    ctx.emit("Concat", list(xs), axis=axis)


@onnx_op("Split", 2, 11, 13, 18)
def Split(ctx: Ctx, x: In, split_in: In = None, *, axis: int = 0,
          split: list[int] | None = None, num_outputs: int | None = None) -> None:
    sizes = _axes(ctx, split, split_in, "split")
    ctx.emit("Split", [x], axis=axis, split=sizes, num_outputs=len(ctx.outputs))


@onnx_op("Pad", 2, 11, 13, 18, 19, 21, 23, 24, 25)
def Pad(ctx: Ctx, x: In, pads_in: In = None, value_in: In = None, axes_in: In = None, *,
        mode: str = "constant", pads: list[int] | None = None, value: float = 0.0) -> None:
    if mode not in ("constant", "reflect", "edge", "wrap"):
        ctx.fail(f"mode={mode!r}")
    if ctx.opset >= 11:
        pads = _ints(ctx.require_const(pads_in, "pads"))
        value = _scalar(ctx.const(value_in)) if value_in else 0.0
        if value_in and ctx.const(value_in) is None:
            ctx.fail("constant_value must be a constant")
    axes = _ints(ctx.require_const(axes_in, "axes")) if axes_in else None
    if pads is None:
        ctx.fail("pads are required")
    ctx.emit("Pad", [x], mode=mode, pads=pads, value=value or 0.0, axes=axes)


@onnx_op("Slice", 1, 10, 11, 13)
def Slice(ctx: Ctx, x: In, starts_in: In = None, ends_in: In = None, axes_in: In = None,
          steps_in: In = None, *, starts: list[int] | None = None, ends: list[int] | None = None,
          axes: list[int] | None = None) -> None:
    if ctx.opset < 10:
        names = [ctx.add_const(np.array(v, np.int64)) if v is not None else None
                 for v in (starts, ends, axes)]
        ctx.emit("Slice", [x, *names])
    else:
        ctx.emit("Slice", [x, starts_in, ends_in, axes_in, steps_in])


@onnx_op("Expand", 8, 13)
def Expand(ctx: Ctx, x: In, shape: In) -> None:
    ctx.emit("Expand", [x, shape])


@onnx_op("Tile", 6, 13)
def Tile(ctx: Ctx, x: In, repeats: In) -> None:
    ctx.emit("Tile", [x, repeats])


# ------------------------------------------------------------------ softmax and reductions
def _softmax(op: str) -> None:
    def fn(ctx: Ctx, x: In, *, axis: int | None = None) -> None:
        legacy = ctx.opset < 13
        ctx.emit(op, [x], axis=(1 if legacy else -1) if axis is None else axis, legacy=legacy)

    fn.__name__ = fn.__qualname__ = op
    onnx_op(op, 1, 11, 13)(fn)


_softmax("Softmax")
_softmax("LogSoftmax")


def _reduce(op: str, versions: tuple[int, ...], axes_input_since: int) -> None:
    def fn(ctx: Ctx, x: In, axes_in: In = None, *, axes: list[int] | None = None,
           keepdims: int = 1, noop_with_empty_axes: int = 0) -> None:
        if ctx.opset >= axes_input_since:
            ax = _axes(ctx, None, axes_in, "axes")
        else:
            ax = axes
        ctx.emit(op, [x], axes=ax, keepdims=keepdims, noop_with_empty_axes=noop_with_empty_axes)

    fn.__name__ = fn.__qualname__ = op
    onnx_op(op, *versions)(fn)


_reduce("ReduceSum", (1, 11, 13), 13)
for _op in ("ReduceMean", "ReduceL2", "ReduceL1", "ReduceSumSquare", "ReduceProd"):
    _reduce(_op, (1, 11, 13, 18), 18)
for _op in ("ReduceMax", "ReduceMin"):
    _reduce(_op, (1, 11, 12, 13, 18, 20), 18)


# ------------------------------------------------------------------ constants and shape chains
@onnx_op("Constant", 1, 9, 11, 12, 13, 19, 21, 23, 24, 25)
def Constant(ctx: Ctx, *, value: np.ndarray | None = None, value_float: float | None = None,
             value_floats: list[float] | None = None, value_int: int | None = None,
             value_ints: list[int] | None = None, value_string: str | None = None,
             value_strings: list[str] | None = None, sparse_value: object = None) -> None:
    if value is not None:
        arr = np.asarray(value)
    elif value_float is not None:
        arr = np.array(value_float, np.float32)
    elif value_floats is not None:
        arr = np.array(value_floats, np.float32)
    elif value_int is not None:
        arr = np.array(value_int, np.int64)
    elif value_ints is not None:
        arr = np.array(value_ints, np.int64)
    else:
        ctx.fail("only numeric dense constants are supported")
        return
    ctx.graph.set_const(ctx.outputs[0], arr)


@onnx_op("Shape", 1, 13, 15, 19, 21, 23, 24, 25, fold_only=True)
def Shape(ctx: Ctx, x: In, *, start: int = 0, end: int | None = None) -> None:
    attrs: dict = {"start": start}
    if end is not None:
        attrs["end"] = end
    ctx.emit("Shape", [x], **attrs)


@onnx_op("Size", 1, 13, 19, 21, 23, 24, 25, fold_only=True)
def Size(ctx: Ctx, x: In) -> None:
    ctx.emit("Size", [x])


@onnx_op("Gather", 1, 11, 13, fold_only=True)
def Gather(ctx: Ctx, x: In, indices: In, *, axis: int = 0) -> None:
    ctx.emit("Gather", [x, indices], axis=axis)


@onnx_op("Cast", 6, 9, 13, 19, 21, 23, 24, 25, fold_only=True)
def Cast(ctx: Ctx, x: In, *, to: int = 1, saturate: int = 1, round_mode: str = "up") -> None:
    from onnx import helper

    try:
        dtype = helper.tensor_dtype_to_np_dtype(to)
    except Exception:
        ctx.fail(f"cast to ONNX type {to}")
        return
    if dtype.kind not in "biuf" or dtype.itemsize > 8:
        ctx.fail(f"cast to {dtype}")
    ctx.emit("Cast", [x], to=dtype)


@onnx_op("ConstantOfShape", 9, 20, 21, 23, 24, 25, fold_only=True)
def ConstantOfShape(ctx: Ctx, shape: In, *, value: np.ndarray | None = None) -> None:
    ctx.emit("ConstantOfShape", [shape], value=value)


@onnx_op("Range", 11, fold_only=True)
def Range(ctx: Ctx, start: In, limit: In, delta: In) -> None:
    ctx.emit("Range", [start, limit, delta])
