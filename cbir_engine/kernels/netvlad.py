"""NetVLAD on NHWC features in three kernels (the fused op of cbir_engine.graph.passes.fuse_netvlad):

1. `netvlad_assign_kernel`: per block of local descriptors x_i (a pixel's D channels), the soft
   assignment a_i = softmax_k(w_k . x_i / s_i + b_k) (s_i = max(|x_i|, eps_in) when the input is
   normalised, else 1), stored with 1 / s_i. The row scale moves out of the products, so x is read
   once.
2. `netvlad_aggregate_kernel`: per (image, block of D), V[k, d] = sum_i a_ik x_id / s_i
   - c_kd sum_i a_ik, a [K, BLOCK_I] x [BLOCK_I, BLOCK_D] product in fp32 (IEEE): the
   intra-normalisation scales every cluster's row to unit length, so a cluster of small mass
   would magnify fp16 rounding of its assignments (those under 6e-5 are subnormal in fp16).
   It is K * HW * D multiply-adds per image, small next to the backbone.
3. `netvlad_normalize_kernel`: per image, each row of V divided by max(|V_k|, eps_intra), then the
   whole by max(|V|, eps_out), written out as [K * D] in the output dtype.

Intermediates (A: N x HW x K, V: N x K x D) are fp32.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl


@triton.jit
def netvlad_assign_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    a_ptr,
    inv_ptr,
    HW,
    D,
    K,
    eps_in,
    NORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    img = tl.program_id(1)
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_k = tl.arange(0, BLOCK_K)
    i_mask = offs_i < HW
    k_mask = offs_k < K
    rows = (img.to(tl.int64) * HW + offs_i) * D
    logits = tl.zeros([BLOCK_I, BLOCK_K], dtype=tl.float32)
    sq = tl.zeros([BLOCK_I], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        x = tl.load(
            x_ptr + rows[:, None] + offs_d[None, :], mask=i_mask[:, None] & d_mask[None, :], other=0.0
        )
        w = tl.load(
            w_ptr + offs_d[:, None] * K + offs_k[None, :], mask=d_mask[:, None] & k_mask[None, :], other=0.0
        )
        if IEEE:
            logits = tl.dot(x.to(tl.float32), w.to(tl.float32), logits, input_precision="ieee")
        else:
            logits = tl.dot(x, w, logits)
        xf = x.to(tl.float32)
        sq += tl.sum(xf * xf, axis=1)
    inv = tl.full([BLOCK_I], 1.0, dtype=tl.float32)
    if NORMALIZE:
        inv = 1.0 / tl.maximum(tl.sqrt(sq), eps_in)
    logits = logits * inv[:, None]
    if HAS_BIAS:
        logits += tl.load(b_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    logits = tl.where(k_mask[None, :], logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    a = e / tl.sum(e, axis=1)[:, None]
    out = (img.to(tl.int64) * HW + offs_i)[:, None] * K + offs_k[None, :]
    tl.store(a_ptr + out, a, mask=i_mask[:, None] & k_mask[None, :])
    tl.store(inv_ptr + img.to(tl.int64) * HW + offs_i, inv, mask=i_mask)


@triton.jit
def netvlad_aggregate_kernel(
    x_ptr,
    a_ptr,
    inv_ptr,
    c_ptr,
    v_ptr,
    HW,
    D,
    K,
    BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    img = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    d_mask = offs_d < D
    k_mask = offs_k < K
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    mass = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i0 in range(0, HW, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        i_mask = offs_i < HW
        rows = img.to(tl.int64) * HW + offs_i
        # A^T tile [BLOCK_K, BLOCK_I]; padded clusters and pixels load as zero.
        at = tl.load(
            a_ptr + rows[None, :] * K + offs_k[:, None], mask=k_mask[:, None] & i_mask[None, :], other=0.0
        )
        inv = tl.load(inv_ptr + rows, mask=i_mask, other=0.0)
        x = tl.load(
            x_ptr + rows[:, None] * D + offs_d[None, :], mask=i_mask[:, None] & d_mask[None, :], other=0.0
        )
        xs = x.to(tl.float32) * inv[:, None]
        acc = tl.dot(at, xs, acc, input_precision="ieee")
        mass += tl.sum(at, axis=1)
    mask = k_mask[:, None] & d_mask[None, :]
    c = tl.load(c_ptr + offs_k[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    v = acc - c * mass[:, None]
    tl.store(v_ptr + (img.to(tl.int64) * K + offs_k[:, None]) * D + offs_d[None, :], v, mask=mask)


@triton.jit
def netvlad_normalize_kernel(
    v_ptr,
    y_ptr,
    D,
    K,
    eps_intra,
    eps_out,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    img = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    base = img.to(tl.int64) * K * D
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = k_mask[:, None] & (offs_d < D)[None, :]
        v = tl.load(v_ptr + base + offs_k[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        sq += tl.sum(v * v, axis=1)
    intra = 1.0 / tl.maximum(tl.sqrt(sq), eps_intra)
    total = tl.sum(sq * intra * intra, axis=0)
    scale = intra / tl.maximum(tl.sqrt(total), eps_out)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = k_mask[:, None] & (offs_d < D)[None, :]
        at = base + offs_k[:, None] * D + offs_d[None, :]
        v = tl.load(v_ptr + at, mask=mask, other=0.0)
        tl.store(y_ptr + at, (v * scale[:, None]).to(y_ptr.dtype.element_ty), mask=mask)


def block_k(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def netvlad_nhwc(
    x: Any,
    w_t: Any,
    bias: Any | None,
    centroids: Any,
    *,
    out: Any,
    normalize_input: bool,
    eps_in: float,
    eps_intra: float,
    eps_out: float,
) -> Any:
    """x: [N, H, W, D] (or [N, HW, D]); w_t: [D, K] (the 1x1 conv's weights, transposed, x's dtype);
    bias fp32 [K] or None; centroids fp32 [K, D]; out: [N, K * D] in x's dtype."""
    import torch

    from cbir_engine.kernels.common import ieee_dot

    n, d = x.shape[0], x.shape[-1]
    hw = x.numel() // (n * d)
    dw, k = w_t.shape
    if dw != d or tuple(centroids.shape) != (k, d) or tuple(out.shape) != (n, k * d):
        raise ValueError(
            f"NetVLAD shapes disagree: x {tuple(x.shape)}, w_t {tuple(w_t.shape)}, "
            f"centroids {tuple(centroids.shape)}, out {tuple(out.shape)}"
        )
    if k > 256:
        raise ValueError("the Triton NetVLAD keeps all clusters in one tile: at most 256")
    bk = block_k(k)
    ieee = ieee_dot(x.dtype)
    assign = torch.empty((n, hw, k), dtype=torch.float32, device=x.device)
    inv = torch.empty((n, hw), dtype=torch.float32, device=x.device)
    v = torch.empty((n, k, d), dtype=torch.float32, device=x.device)
    bi, bd = 32, 32
    netvlad_assign_kernel[(triton.cdiv(hw, bi), n)](
        x,
        w_t,
        bias if bias is not None else centroids,
        assign,
        inv,
        hw,
        d,
        k,
        float(eps_in),
        NORMALIZE=bool(normalize_input),
        HAS_BIAS=bias is not None,
        IEEE=ieee,
        BLOCK_I=bi,
        BLOCK_D=bd,
        BLOCK_K=bk,
        num_warps=4,
    )
    netvlad_aggregate_kernel[(triton.cdiv(d, bd), n)](
        x,
        assign,
        inv,
        centroids,
        v,
        hw,
        d,
        k,
        BLOCK_I=bi,
        BLOCK_D=bd,
        BLOCK_K=bk,
        num_warps=4,
    )
    netvlad_normalize_kernel[(n,)](
        v, out, d, k, float(eps_intra), float(eps_out), BLOCK_D=bd, BLOCK_K=bk, num_warps=4
    )
    return out
