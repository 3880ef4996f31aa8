// Winograd F(4x4, 3x3) convolution for 3x3, stride-1, undilated, ungrouped convs: each 6x6 input
// tile and each 3x3 filter are transformed so the convolution becomes 36 independent GEMMs
// (K x C by C x tiles) with 4x fewer multiplies than direct convolution, then 4x4 output tiles
// are transformed back with the fused epilogue (bias, residual, activation).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "cpu/conv.h"
#include "cpu/gemm.h"
#include "cpu/parallel.h"

namespace cbir::cpu {

constexpr int kWinogradAlpha = 6;  // tile size in the transformed domain (4 + 3 - 1)

size_t winograd_packed_weight_floats(int K, int C);
// w: [K, C, 3, 3] -> 36 packed GEMM A operands (K x C each), transformed as G w G^T.
void pack_winograd_weight(const float* w, int K, int C, float* out);

// Workspace (floats, shared by all threads) and per-thread scratch one run needs.
size_t winograd_workspace_floats(const Conv2dParams& p);
size_t winograd_scratch_floats(const Conv2dParams& p, int threads);
// p.w is the pack_winograd_weight output; `workspace` has winograd_workspace_floats floats.
void run_winograd_conv3x3(const Conv2dParams& p, float* workspace, Parallel& par);

// Shared by both tile sizes. Tiles of out_tile x out_tile outputs, processed in chunks whose
// transformed input and output stay within a bounded working set.
struct WinogradTiling {
  int th, tw;             // tiles per image, down and across
  int64_t per_image;      // th * tw
  int64_t total, chunk;   // tiles over the batch, tiles per chunk
  int64_t chunk_padded;   // chunk rounded up to whole GEMM panels: the workspace's tile capacity
};
WinogradTiling winograd_tiling(const Conv2dParams& p, int out_tile, int positions);
// A tile's image and the top-left corner of its output block (tile = index over the batch).
struct TileOrigin {
  int64_t image;
  int y, x;
};
inline TileOrigin tile_origin(const WinogradTiling& t, int64_t tile, int out_tile) {
  const int64_t r = tile % t.per_image;
  return {tile / t.per_image, int(r / t.tw) * out_tile, int(r % t.tw) * out_tile};
}

// Where a tile's output block lands, the same for every output channel.
struct WinogradOutPos {
  int64_t offset;  // of the block's first element in channel 0 of its image
  int rows, cols;  // inside the output (partial blocks at the bottom and right edges)
};
// The output positions of the tiles of one 16-tile panel (of the chunk starting at tile t0 with
// `tiles` tiles); entries past the chunk's last tile are left untouched.
inline void winograd_out_positions(const WinogradTiling& t, const Conv2dParams& p, int out_tile, int64_t t0,
                                   int64_t tiles, int64_t panel, WinogradOutPos* pos) {
  for (int lane = 0; lane < kGemmNR && panel * kGemmNR + lane < tiles; ++lane) {
    const TileOrigin o = tile_origin(t, t0 + panel * kGemmNR + lane, out_tile);
    pos[lane] = WinogradOutPos{o.image * conv_y_batch_stride(p) + int64_t(o.y) * p.OW + o.x,
                               std::min(out_tile, p.OH - o.y), std::min(out_tile, p.OW - o.x)};
  }
}

// How both tile sizes split their input and output transforms into tasks. A transform step takes
// 8 tiles (one per SIMD lane) of one channel; a task takes the two 8-tile groups of one 16-tile
// GEMM panel for a run of channels, so its stores (or loads) cover whole cache lines and move
// forward through each transformed plane. fill(panel, pos) describes the panel's 16 tiles once,
// since their positions are the same for every channel; step(group, channel, pos_of_group) runs.
constexpr int kWinogradChannelRun = 8;
template <class Pos, class Fill, class Step>
void run_transform_tasks(Parallel& par, int64_t groups, int channels, Fill&& fill, Step&& step) {
  const int64_t runs = (channels + kWinogradChannelRun - 1) / kWinogradChannelRun;
  auto task = [&](int64_t t, int) {
    const int64_t panel = t / runs;
    const int c0 = int(t % runs) * kWinogradChannelRun;
    const int c1 = std::min(channels, c0 + kWinogradChannelRun);
    Pos pos[2 * 8];
    fill(panel, pos);
    for (int c = c0; c < c1; ++c)
      for (int64_t g = panel * 2; g < std::min(groups, panel * 2 + 2); ++g) step(g, c, pos + (g - panel * 2) * 8);
  };
  par.run(runs * ((groups + 1) / 2), task);
}

// Floats from one transformed plane (V or M of one position) to the next: `floats` rounded up to
// an odd number of 64-byte lines. A transform step touches all 36 (or 16) planes at one offset;
// with plane sizes that are multiples of 4 KiB (256 channels x 16 tiles, 128 x 64, 64 x 208)
// those accesses all fell in one L1 set.
inline int64_t winograd_plane_stride(int64_t floats) {
  int64_t lines = (floats + 15) / 16;
  if (lines % 2 == 0) ++lines;
  return lines * 16;
}
// A chunk's transformed input V holds plane xi (C x tiles rounded up to whole panels) at
// V + xi * v_stride; its GEMM output M holds plane xi (K x tiles) at M + xi * m_stride.
inline int64_t winograd_v_stride(const Conv2dParams& p, int64_t tiles) {
  return winograd_plane_stride(int64_t(p.C) * ((tiles + kGemmNR - 1) / kGemmNR * kGemmNR));
}
inline int64_t winograd_m_stride(const Conv2dParams& p, int64_t tiles) {
  return winograd_plane_stride(int64_t(p.K) * tiles);
}
// The chunk's batched GEMMs M[xi] (K x tiles) = U[xi] (K x C) * V[xi] (C x tiles).
GemmParams winograd_chunk_gemm(const Conv2dParams& p, int positions, int64_t tiles, const float* v, float* m);
size_t winograd_workspace_floats_for(const Conv2dParams& p, int out_tile, int positions);
size_t winograd_scratch_floats_for(const Conv2dParams& p, int out_tile, int positions, int threads);
// U = G g G^T for every (k, c), G being alpha x 3 (row-major), packed per position.
void pack_winograd_weight_with(const float* w, int K, int C, const double* G, int alpha, float* out);

// F(2x2, 3x3) for small planes (7x7, 8x8), where 4x4 tiles are too few to fill a GEMM panel:
// 16 GEMMs over 2x2 output tiles. Same contract as the F(4x4, 3x3) functions above.
size_t winograd2_packed_weight_floats(int K, int C);
void pack_winograd2_weight(const float* w, int K, int C, float* out);
size_t winograd2_workspace_floats(const Conv2dParams& p);
size_t winograd2_scratch_floats(const Conv2dParams& p, int threads);
void run_winograd2_conv3x3(const Conv2dParams& p, float* workspace, Parallel& par);

}  // namespace cbir::cpu
