"""Depthwise convolution in NHWC (groups = channels, one filter per channel), epilogue fused.

Each program owns BLOCK_P output pixels by BLOCK_C channels: in NHWC a pixel's channels are
contiguous, so every tap is one coalesced [BLOCK_P, BLOCK_C] load, multiplied by a row of the
weights packed [KH, KW, C]. No tensor cores: a depthwise conv has no reduction across channels.
Any kernel shape (1x7, 7x1, 3x3, ...), stride, padding and dilation.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from cbir_engine.kernels.common import apply_activation


@triton.jit
def depthwise_nhwc_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
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
    dil_h,
    dil_w,
    act_lo,
    act_hi,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    ACT: tl.constexpr,
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
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for kh in range(KH):
        ih = oh * stride_h - pad_h + kh * dil_h
        for kw in range(KW):
            iw = ow * stride_w - pad_w + kw * dil_w
            valid = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            row = ((nb * H + ih) * W + iw).to(tl.int64) * C
            v = tl.load(
                x_ptr + row[:, None] + offs_c[None, :], mask=valid[:, None] & c_mask[None, :], other=0.0
            )
            wt = tl.load(w_ptr + (kh * KW + kw) * C + offs_c, mask=c_mask, other=0.0)
            acc += v.to(tl.float32) * wt.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    out = offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
    mask = p_mask[:, None] & c_mask[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + out, mask=mask, other=0.0).to(tl.float32)
    acc = apply_activation(acc, act_lo, act_hi, ACT)
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=mask)


def block_shape(c: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): up to 128 channels across, 4096 outputs a program."""
    bc = max(16, min(128, triton.next_power_of_2(c)))
    return max(16, 4096 // bc), bc


def depthwise_nhwc(
    x: Any,
    w_packed: Any,
    bias: Any | None,
    *,
    out: Any,
    residual: Any | None = None,
    stride: tuple[int, int] = (1, 1),
    pads: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    act: int = 0,
    act_lo: float = 0.0,
    act_hi: float = 0.0,
) -> Any:
    """x: [N, H, W, C]; w_packed: [KH, KW, C]; bias fp32 [C] or None; out, residual: [N, OH, OW, C]."""
    n, h, wd, c = x.shape
    kh, kw, cw = w_packed.shape
    _, oh, ow, k = out.shape
    if cw != c or k != c:
        raise ValueError(f"depthwise conv of {c} channels got weights for {cw} and an output of {k}")
    bp, bc = block_shape(c)
    grid = (triton.cdiv(n * oh * ow, bp), triton.cdiv(c, bc))
    depthwise_nhwc_kernel[grid](
        x,
        w_packed,
        bias if bias is not None else out,
        residual if residual is not None else out,
        out,
        n,
        h,
        wd,
        c,
        oh,
        ow,
        stride[0],
        stride[1],
        pads[0],
        pads[1],
        dilation[0],
        dilation[1],
        float(act_lo),
        float(act_hi),
        KH=kh,
        KW=kw,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        ACT=act,
        BLOCK_P=bp,
        BLOCK_C=bc,
        num_warps=4,
    )
    return out


def pack_weights(w: Any) -> Any:
    """Depthwise weights [C, 1, KH, KW] -> [KH, KW, C]."""
    return w[:, 0].permute(1, 2, 0).contiguous()
