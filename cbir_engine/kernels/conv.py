"""Convolution in NHWC as an implicit GEMM, with the epilogue fused (bias, residual, activation).

GEMM view per group g: rows are output pixels (n, oh, ow), columns are output channels, and the
reduction runs over (kh, kw, c). The A tile is gathered straight from the input (no im2col
buffer): a pixel's channels are contiguous in NHWC, so each (kh, kw) step reads rows of BLOCK_K
channels. Weights are prepacked as [G, KH, KW, C/G, K/G] so a B tile is a row-major block.
Operands are fp16, bf16 or fp32 (fp32 with IEEE products, no TF32); the accumulator is fp32.

`x_pix` and `y_pix` are the pixel strides of the input and output in elements: channel slices of
wider tensors (a concat's part, a group) are read and written in place.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from cbir_engine.kernels.common import apply_activation, ieee_dot


@triton.jit
def conv2d_nhwc_kernel(
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
    K,
    x_pix,
    y_pix,
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
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < N * OH * OW
    n_mask = offs_n < K
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    nb = t // OH
    w_group = w_ptr + g.to(tl.int64) * (KH * KW * C * K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kh in range(KH):
        ih = oh * stride_h - pad_h + kh * dil_h
        for kw in range(KW):
            iw = ow * stride_w - pad_w + kw * dil_w
            valid = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            row = ((nb * H + ih) * W + iw).to(tl.int64) * x_pix + g * C
            w_tap = w_group + (kh * KW + kw) * C * K
            for c0 in range(0, C, BLOCK_K):
                offs_c = c0 + tl.arange(0, BLOCK_K)
                c_mask = offs_c < C
                a = tl.load(
                    x_ptr + row[:, None] + offs_c[None, :], mask=valid[:, None] & c_mask[None, :], other=0.0
                )
                b = tl.load(
                    w_tap + offs_c[:, None] * K + offs_n[None, :],
                    mask=c_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )
                if IEEE:
                    acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
    out_c = g * K + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_c, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = offs_m.to(tl.int64)[:, None] * y_pix + out_c[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + out, mask=mask, other=0.0).to(tl.float32)
    acc = apply_activation(acc, act_lo, act_hi, ACT)
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=mask)


def block_shape(c_per_group: int, k_per_group: int, rows: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): tiles no wider than the problem (tl.dot needs >= 16)."""
    bk = 16 if c_per_group <= 16 else 32
    bn = max(16, min(128, triton.next_power_of_2(k_per_group)))
    bm = 64 if rows <= 64 * 132 else 128
    return bm, bn, bk, 4 if bm * bn <= 64 * 64 else 8


def conv2d_nhwc(
    x: Any,
    w_packed: Any,
    bias: Any | None,
    *,
    out: Any,
    residual: Any | None = None,
    stride: tuple[int, int] = (1, 1),
    pads: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    act: int = 0,
    act_lo: float = 0.0,
    act_hi: float = 0.0,
) -> Any:
    """y = act(conv(x, w) + bias + residual) in NHWC. x: [N, H, W, C]; w_packed: [G, KH, KW, C/G, K/G];
    bias: fp32 [K] or None; out (and residual): [N, OH, OW, K], all contiguous, same dtype as x."""
    n, h, wd, c = x.shape
    g, kh, kw, cg, kg = w_packed.shape
    if g != groups or cg * groups != c:
        raise ValueError(f"weights {tuple(w_packed.shape)} do not fit {c} channels in {groups} groups")
    _, oh, ow, k = out.shape
    if k != kg * groups:
        raise ValueError(f"output has {k} channels, the weights make {kg * groups}")
    if x.dtype != w_packed.dtype or out.dtype != x.dtype:
        raise ValueError("x, weights and output must share one dtype")
    rows = n * oh * ow
    bm, bn, bk, warps = block_shape(cg, kg, rows)
    grid = (triton.cdiv(rows, bm), triton.cdiv(kg, bn), groups)
    conv2d_nhwc_kernel[grid](
        x,
        w_packed,
        bias if bias is not None else out,
        residual if residual is not None else out,
        out,
        n,
        h,
        wd,
        cg,
        oh,
        ow,
        kg,
        c,
        k,
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
        IEEE=ieee_dot(x.dtype),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=warps,
    )
    return out


def pack_weights(w: Any, groups: int) -> Any:
    """ONNX/torch conv weights [K, C/G, KH, KW] -> [G, KH, KW, C/G, K/G] (contiguous)."""
    k, cg, kh, kw = w.shape
    return w.reshape(groups, k // groups, cg, kh, kw).permute(0, 3, 4, 2, 1).contiguous()
