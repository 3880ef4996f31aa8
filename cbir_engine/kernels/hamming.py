"""Hamming k-NN on the GPU in Triton: blocked popcount distances and top-k by counting.

Codes are 32-bit words, the database word-major ([words, n], so a block's loads coalesce) and in
id order, so that "smallest position" is "smallest id" among ties. Per query chunk:

1. `hamming_histogram_kernel`: each program computes a [BQ, BN] tile of distances and adds its
   per-query histogram (tl.histogram over query * NBINS + distance) to the query's histogram.
2. torch: the k-th distance of each query is the first bin where the histogram's running sum
   reaches k; `closer` = codes strictly closer, `ties_wanted` = k - closer.
3. `hamming_tile_counts_kernel`: per (query, tile), how many codes are closer and how many tie.
   torch turns these into exclusive offsets over the tiles (position order).
4. `hamming_select_kernel`: recomputes the tile, ranks its closer codes and its ties within the
   tile (cumsum), and writes each kept code to its slot: closer ones to [0, closer), ties to
   [closer, k) in position order, so the smallest positions win. No atomics, deterministic.
5. torch: sort each row of k by (distance, position).

Distances are recomputed in every pass: popcounts are cheap next to reading the codes, and this
keeps every intermediate at O(nq * (bins + tiles)) instead of O(nq * n).
"""

from __future__ import annotations

import os
from typing import Any

import triton
import triton.language as tl

try:  # the CUDA popcount; absent from the interpreter (TRITON_INTERPRET=1)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older triton
    libdevice = None


@triton.jit
def _popcount32(x, USE_POPC: tl.constexpr):
    if USE_POPC:
        return libdevice.popc(x)
    else:
        # SWAR popcount on unsigned words (logical shifts), for the interpreter.
        u = x.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        u = (u * 0x01010101) >> 24
        return u.to(tl.int32)


@triton.jit
def _distance_tile(
    q_ptr, db_ptr, nq, n, c0, W: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, USE_POPC: tl.constexpr
):
    """Distances [BQ, BN] between this program's queries and codes c0 .. c0 + BN."""
    qi = tl.program_id(0) * BQ + tl.arange(0, BQ)
    ci = c0 + tl.arange(0, BN)
    qmask = qi < nq
    cmask = ci < n
    dist = tl.zeros([BQ, BN], dtype=tl.int32)
    for w in range(W):
        qw = tl.load(q_ptr + qi * W + w, mask=qmask, other=0)
        cw = tl.load(db_ptr + w * n + ci, mask=cmask, other=0)
        dist += _popcount32(qw[:, None] ^ cw[None, :], USE_POPC)
    return dist, qi, ci, qmask, cmask


# Each program covers a tile of CHUNKS * BN codes, BN at a time, so its histogram goes out in one
# batch of atomics and the per-tile arrays stay CHUNKS times smaller.


@triton.jit
def hamming_histogram_kernel(
    q_ptr,
    db_ptr,
    hist_ptr,
    nq,
    n,
    W: tl.constexpr,
    NBINS: tl.constexpr,
    BQ: tl.constexpr,
    BN: tl.constexpr,
    CHUNKS: tl.constexpr,
    USE_POPC: tl.constexpr,
):
    counts = tl.zeros([BQ * NBINS], dtype=tl.int32)
    row_bins = tl.arange(0, BQ)[:, None] * NBINS
    for c in range(CHUNKS):
        c0 = (tl.program_id(1) * CHUNKS + c) * BN
        dist, qi, ci, qmask, cmask = _distance_tile(q_ptr, db_ptr, nq, n, c0, W, BQ, BN, USE_POPC)
        valid = qmask[:, None] & cmask[None, :]
        counts += tl.histogram(
            tl.reshape(row_bins + dist, [BQ * BN]), BQ * NBINS, mask=tl.reshape(valid, [BQ * BN])
        )
    offs = tl.program_id(0) * (BQ * NBINS) + tl.arange(0, BQ * NBINS)
    tl.atomic_add(hist_ptr + offs, counts, mask=(offs < nq * NBINS) & (counts > 0))


@triton.jit
def hamming_tile_counts_kernel(
    q_ptr,
    db_ptr,
    kth_ptr,
    closer_ptr,
    ties_ptr,
    nq,
    n,
    ntiles,
    W: tl.constexpr,
    BQ: tl.constexpr,
    BN: tl.constexpr,
    CHUNKS: tl.constexpr,
    USE_POPC: tl.constexpr,
):
    qi = tl.program_id(0) * BQ + tl.arange(0, BQ)
    qmask = qi < nq
    kth = tl.load(kth_ptr + qi, mask=qmask, other=-1)
    closer = tl.zeros([BQ], dtype=tl.int32)
    ties = tl.zeros([BQ], dtype=tl.int32)
    for c in range(CHUNKS):
        c0 = (tl.program_id(1) * CHUNKS + c) * BN
        dist, qi, ci, qmask, cmask = _distance_tile(q_ptr, db_ptr, nq, n, c0, W, BQ, BN, USE_POPC)
        valid = qmask[:, None] & cmask[None, :]
        closer += tl.sum(((dist < kth[:, None]) & valid).to(tl.int32), axis=1)
        ties += tl.sum(((dist == kth[:, None]) & valid).to(tl.int32), axis=1)
    where = qi * ntiles + tl.program_id(1)
    tl.store(closer_ptr + where, closer, mask=qmask)
    tl.store(ties_ptr + where, ties, mask=qmask)


@triton.jit
def hamming_select_kernel(
    q_ptr,
    db_ptr,
    kth_ptr,
    closer_total_ptr,
    ties_wanted_ptr,
    closer_off_ptr,
    ties_off_ptr,
    out_pos_ptr,
    out_dist_ptr,
    nq,
    n,
    ntiles,
    k,
    W: tl.constexpr,
    BQ: tl.constexpr,
    BN: tl.constexpr,
    CHUNKS: tl.constexpr,
    USE_POPC: tl.constexpr,
):
    qi = tl.program_id(0) * BQ + tl.arange(0, BQ)
    qmask = qi < nq
    kth = tl.load(kth_ptr + qi, mask=qmask, other=-1)
    wanted = tl.load(ties_wanted_ptr + qi, mask=qmask, other=0)
    closer_total = tl.load(closer_total_ptr + qi, mask=qmask, other=0)
    where = qi * ntiles + tl.program_id(1)
    # Next free slot for a closer code / rank of the next tie, carried over the chunks in
    # position order.
    closer_next = tl.load(closer_off_ptr + where, mask=qmask, other=0)
    tie_next = tl.load(ties_off_ptr + where, mask=qmask, other=0)
    row = qi[:, None].to(tl.int64) * k
    for c in range(CHUNKS):
        c0 = (tl.program_id(1) * CHUNKS + c) * BN
        dist, qi, ci, qmask, cmask = _distance_tile(q_ptr, db_ptr, nq, n, c0, W, BQ, BN, USE_POPC)
        valid = qmask[:, None] & cmask[None, :]
        closer = (dist < kth[:, None]) & valid
        ties = (dist == kth[:, None]) & valid
        closer_i = closer.to(tl.int32)
        ties_i = ties.to(tl.int32)
        closer_slot = closer_next[:, None] + tl.cumsum(closer_i, axis=1) - closer_i
        tie_rank = tie_next[:, None] + tl.cumsum(ties_i, axis=1) - ties_i
        keep_tie = ties & (tie_rank < wanted[:, None])
        slot = tl.where(closer, closer_slot, closer_total[:, None] + tie_rank)
        keep = closer | keep_tie
        positions = ci[None, :] + tl.zeros([BQ, BN], dtype=tl.int32)
        tl.store(out_pos_ptr + row + slot, positions, mask=keep)
        tl.store(out_dist_ptr + row + slot, dist, mask=keep)
        closer_next += tl.sum(closer_i, axis=1)
        tie_next += tl.sum(ties_i, axis=1)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def tile_shape(bits: int) -> tuple[int, int, int, int]:
    """(NBINS, BQ, BN, CHUNKS): histogram bins per query (a power of two > bits), queries per
    program (keeping BQ * NBINS, the program's histogram, at or under 4096 bins), codes per step
    and steps per program."""
    nbins = _next_pow2(bits + 1)
    bq = max(1, min(16, 4096 // nbins))
    return nbins, bq, 128, 8


def hamming_knn(
    queries: Any,
    db_t: Any,
    bits: int,
    k: int,
    *,
    query_chunk: int | None = None,
    block_n: int | None = None,
    chunks: int | None = None,
) -> tuple[Any, Any]:
    """k nearest by (distance, position) with Triton.

    queries: int32 [nq, W] code words; db_t: int32 [W, n] word-major database (torch tensors on
    the GPU, or on the CPU under TRITON_INTERPRET=1). Returns (distances int32 [nq, k],
    positions int64 [nq, k]) as torch tensors, each row sorted by (distance, position).
    """
    import torch

    nq, words = queries.shape
    n = db_t.shape[1]
    if db_t.shape[0] != words:
        raise ValueError("queries and database differ in words per code")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}]")
    if n * words >= 2**31:
        raise ValueError("the Triton kernel indexes the database with 32-bit offsets (n * words < 2^31)")
    nbins, bq, bn, steps = tile_shape(bits)
    bn = block_n or bn
    steps = chunks or steps
    use_popc = not interpreting()
    device = queries.device
    ntiles = triton.cdiv(n, bn * steps)
    # Per chunk the intermediates hold (bins + 2 * tiles) ints per query.
    if query_chunk is None:
        query_chunk = max(bq, min(nq, (64 << 20) // (4 * (nbins + 2 * ntiles) + 1)))
    out_d = torch.empty((nq, k), dtype=torch.int32, device=device)
    out_p = torch.empty((nq, k), dtype=torch.int64, device=device)
    queries = queries.contiguous()
    db_t = db_t.contiguous()
    for q0 in range(0, nq, query_chunk):
        q = queries[q0 : q0 + query_chunk]
        m = q.shape[0]
        grid = (triton.cdiv(m, bq), ntiles)
        hist = torch.zeros((m, nbins), dtype=torch.int32, device=device)
        hamming_histogram_kernel[grid](
            q, db_t, hist, m, n, W=words, NBINS=nbins, BQ=bq, BN=bn, CHUNKS=steps, USE_POPC=use_popc
        )
        running = hist.cumsum(dim=1)
        kth = (running < k).sum(dim=1).to(torch.int32)  # first bin whose running sum reaches k
        closer_total = torch.where(
            kth > 0,
            running.gather(1, (kth.long() - 1).clamp(min=0)[:, None])[:, 0],
            torch.zeros_like(kth),
        ).to(torch.int32)
        ties_wanted = (k - closer_total).to(torch.int32)
        closer = torch.empty((m, ntiles), dtype=torch.int32, device=device)
        ties = torch.empty((m, ntiles), dtype=torch.int32, device=device)
        hamming_tile_counts_kernel[grid](
            q, db_t, kth, closer, ties, m, n, ntiles, W=words, BQ=bq, BN=bn, CHUNKS=steps, USE_POPC=use_popc
        )
        closer_off = (closer.cumsum(dim=1) - closer).to(torch.int32)
        ties_off = (ties.cumsum(dim=1) - ties).to(torch.int32)
        pos = torch.empty((m, k), dtype=torch.int32, device=device)
        dist = torch.empty((m, k), dtype=torch.int32, device=device)
        hamming_select_kernel[grid](
            q,
            db_t,
            kth,
            closer_total,
            ties_wanted,
            closer_off,
            ties_off,
            pos,
            dist,
            m,
            n,
            ntiles,
            k,
            W=words,
            BQ=bq,
            BN=bn,
            CHUNKS=steps,
            USE_POPC=use_popc,
        )
        key = dist.to(torch.int64) * n + pos.to(torch.int64)
        key, _ = torch.sort(key, dim=1)
        out_d[q0 : q0 + m] = (key // n).to(torch.int32)
        out_p[q0 : q0 + m] = key % n
    return out_d, out_p
