"""Max and average pooling in NHWC (any window, stride, padding, dilation for max).

Programs own BLOCK_P output pixels by BLOCK_C channels, as in the depthwise conv. Padding never
wins a max (the identity is -inf). Average pooling divides by the taps inside the input
(COUNT_PAD=False) or inside the padded input (COUNT_PAD=True, ONNX count_include_pad: positions
past the end padding, as ceil_mode can make, still do not count). Sums are in fp32.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl


@triton.jit
def pool_nhwc_kernel(
    x_ptr,
    y_ptr,
    N,
    H,
    W,
    C,
    OH,
    OW,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    pad_h_end,
    pad_w_end,
    dil_h,
    dil_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    IS_MAX: tl.constexpr,
    COUNT_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = offs_p < N * OH * OW
    c_mask = offs_c < C
    ow = offs_p % OW
    t = offs_p // OW
    oh = t % OH
    nb = t // OH
    if IS_MAX:
        acc = tl.full([BLOCK_P, BLOCK_C], float("-inf"), dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    count = tl.zeros([BLOCK_P], dtype=tl.float32)
    for kh in range(KH):
        ih = oh * stride_h - pad_h + kh * dil_h
        for kw in range(KW):
            iw = ow * stride_w - pad_w + kw * dil_w
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            valid = p_mask & inside
            row = ((nb * H + ih) * W + iw).to(tl.int64) * C
            mask = valid[:, None] & c_mask[None, :]
            if IS_MAX:
                v = tl.load(x_ptr + row[:, None] + offs_c[None, :], mask=mask, other=float("-inf"))
                acc = tl.maximum(acc, v.to(tl.float32))
            else:
                v = tl.load(x_ptr + row[:, None] + offs_c[None, :], mask=mask, other=0.0)
                acc += v.to(tl.float32)
                if COUNT_PAD:
                    padded = (ih >= -pad_h) & (ih < H + pad_h_end) & (iw >= -pad_w) & (iw < W + pad_w_end)
                    count += padded.to(tl.float32)
                else:
                    count += inside.to(tl.float32)
    if not IS_MAX:
        acc = acc / tl.maximum(count, 1.0)[:, None]
    out = offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


def pool_nhwc(
    x: Any,
    *,
    out: Any,
    kernel: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilation: tuple[int, int] = (1, 1),
    is_max: bool = True,
    count_include_pad: bool = False,
) -> Any:
    """x: [N, H, W, C] -> out [N, OH, OW, C]; pads = (top, left, bottom, right)."""
    n, h, w, c = x.shape
    _, oh, ow, co = out.shape
    if co != c or out.dtype != x.dtype:
        raise ValueError("pooling keeps channels and dtype")
    bc = max(16, min(128, triton.next_power_of_2(c)))
    bp = max(16, 4096 // bc)
    grid = (triton.cdiv(n * oh * ow, bp), triton.cdiv(c, bc))
    pool_nhwc_kernel[grid](
        x,
        out,
        n,
        h,
        w,
        c,
        oh,
        ow,
        stride[0],
        stride[1],
        pads[0],
        pads[1],
        pads[2],
        pads[3],
        dilation[0],
        dilation[1],
        KH=kernel[0],
        KW=kernel[1],
        IS_MAX=is_max,
        COUNT_PAD=count_include_pad,
        BLOCK_P=bp,
        BLOCK_C=bc,
        num_warps=4,
    )
    return out
