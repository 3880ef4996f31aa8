"""Shape arithmetic shared by shape inference and lowering (dims may be symbolic strings)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from cbir_engine.errors import ShapeError
from cbir_engine.graph.ir import Dim, Shape


def broadcast(*shapes: Shape) -> Shape:
    """Numpy broadcasting of shapes whose dims may be symbols."""
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for axis in range(rank):
        dims = [s[len(s) - rank + axis] for s in shapes if len(s) - rank + axis >= 0]
        ints = {d for d in dims if isinstance(d, int) and d != 1}
        syms = [d for d in dims if isinstance(d, str)]
        if len(ints) > 1:
            raise ShapeError(f"shapes {list(shapes)} do not broadcast (axis {axis}: {sorted(ints)})")
        if ints:
            out.append(ints.pop())
        elif syms:
            out.append(syms[0])
        else:
            out.append(1)
    return tuple(out)


def numel(shape: Sequence[Dim]) -> int:
    if not all(isinstance(d, int) for d in shape):
        raise ShapeError(f"shape {tuple(shape)} is not static")
    return math.prod(shape)  # type: ignore[arg-type]


def norm_axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < max(rank, 1):
        raise ShapeError(f"{what} {axis} out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def window_geometry(
    in_dims: Sequence[Dim],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int],
    auto_pad: str,
    ceil_mode: bool = False,
    pool: bool = False,
) -> tuple[tuple[Dim, ...], tuple[int, ...], tuple[int, ...]]:
    """Output spatial dims and the explicit (begin, end) pads of a conv or pooling window.

    ONNX semantics: NOTSET uses `pads`; SAME_UPPER/SAME_LOWER pad so that out = ceil(in/stride)
    (the odd pad at the end / the beginning); VALID pads nothing. With ceil_mode, a last window
    that would start beyond the input and its left padding is dropped (as torch does).
    """
    n = len(kernel)
    out: list[Dim] = []
    begin: list[int] = []
    end: list[int] = []
    for i in range(n):
        d, k, s, dil = in_dims[i], kernel[i], strides[i], dilations[i]
        span = dil * (k - 1) + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            if not isinstance(d, int):
                out.append(f"{d}/{s}" if s != 1 else d)
                begin.append(0)
                end.append(0)
                continue
            o = -(-d // s)
            total = max(0, (o - 1) * s + span - d)
            small, big = total // 2, total - total // 2
            b, e = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
        elif auto_pad == "VALID":
            b = e = 0
        else:
            b, e = pads[i], pads[n + i]
        begin.append(b)
        end.append(e)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(o)
            continue
        if not isinstance(d, int):
            out.append(f"({d}+{b + e}-{span})/{s}+1")
            continue
        size = d + b + e - span
        if size < 0:
            raise ShapeError(
                f"window of span {span} does not fit an input of size {d} with pads {b}+{e}"
            )
        if ceil_mode:
            o = -(-size // s) + 1
            if (o - 1) * s >= d + b:
                o -= 1
        else:
            o = size // s + 1
        out.append(o)
    return tuple(out), tuple(begin), tuple(end)
