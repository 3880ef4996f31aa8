// Winograd F(2x2, 3x3): the small-plane companion of the F(4x4, 3x3) path. At 7x7 or 8x8 outputs
// (the last stage of ResNet, GoogLeNet, Inception v3, DenseNet at batch 1) a 4x4-tile transform
// leaves only 4 tiles, too few to fill a GEMM panel of 16 columns; 2x2 tiles give 16 and still
// cut the multiplies 2.25x against the direct GEMM (whose 49 columns waste most of a panel).
#include <algorithm>
#include <cmath>

#include <immintrin.h>

#include "cpu/gemm.h"
#include "cpu/simd.h"
#include "cpu/winograd.h"

namespace cbir::cpu {
namespace {

constexpr int A4 = 4;          // transformed tile side (2 + 3 - 1)
constexpr int XI = A4 * A4;    // 16 transformed positions
constexpr int NR = kGemmNR;

// B^T d for one column (d0..d3) of 8 tiles: B^T rows [1 0 -1 0] [0 1 1 0] [0 -1 1 0] [0 1 0 -1].
inline void bt4(const __m256 d[4], __m256 o[4]) {
  o[0] = _mm256_sub_ps(d[0], d[2]);
  o[1] = _mm256_add_ps(d[1], d[2]);
  o[2] = _mm256_sub_ps(d[2], d[1]);
  o[3] = _mm256_sub_ps(d[1], d[3]);
}

// A^T m for one column: A^T rows [1 1 1 0] [0 1 -1 -1].
inline void at4(const __m256 m[4], __m256 o[2]) {
  o[0] = _mm256_add_ps(_mm256_add_ps(m[0], m[1]), m[2]);
  o[1] = _mm256_sub_ps(_mm256_sub_ps(m[1], m[2]), m[3]);
}

inline float act1(Act act, float v, float a, float b) {
  switch (act) {
    case Act::None: return v;
    case Act::Relu: return simd::relu(v);
    case Act::Clip: return simd::clip(v, a, b);
    case Act::LeakyRelu: return v < 0.0f ? v * a : v;
    case Act::Sigmoid: return 1.0f / (1.0f + std::exp(-v));
  }
  return v;
}

}  // namespace

size_t winograd2_packed_weight_floats(int K, int C) { return size_t(XI) * packed_a_floats(K, C); }

void pack_winograd2_weight(const float* w, int K, int C, float* out) {
  static const double G[A4 * 3] = {1, 0, 0, 0.5, 0.5, 0.5, 0.5, -0.5, 0.5, 0, 0, 1};
  pack_winograd_weight_with(w, K, C, G, A4, out);
}

size_t winograd2_workspace_floats(const Conv2dParams& p) { return winograd_workspace_floats_for(p, 2, XI); }

size_t winograd2_scratch_floats(const Conv2dParams& p, int threads) {
  return winograd_scratch_floats_for(p, 2, XI, threads);
}

void run_winograd2_conv3x3(const Conv2dParams& p, float* workspace, Parallel& par) {
  const WinogradTiling t = winograd_tiling(p, 2, XI);
  const int64_t in_plane = int64_t(p.H) * p.W, out_plane = int64_t(p.OH) * p.OW;
  float* V = workspace;                                  // [16][tiles/16][C][16] (packed B)
  float* M = workspace + size_t(XI) * winograd_v_stride(p, t.chunk);  // [16][K][tiles]

  for (int64_t t0 = 0; t0 < t.total; t0 += t.chunk) {
    const int64_t tiles = std::min(t.chunk, t.total - t0);
    const int64_t padded = (tiles + NR - 1) / NR * NR;
    const int64_t groups = padded / 8;
    const int64_t xi_stride = winograd_v_stride(p, tiles), m_stride = winograd_m_stride(p, tiles);
    // 1. Input transform, 8 tiles per step, written into packed-B panels (tasks: see
    //    run_transform_tasks); each patch row is one masked load (zeros outside).
    struct TilePos {
      const float* image;  // channel 0 of the tile's image; null past the last tile
      int y0;
      __m128i cols;  // the patch columns inside the image
      int x0;
    };
    auto in_group = [&](int64_t g, int c, const TilePos* pos) {
      __m256 patch[XI];  // patch[i * 4 + k]: element (i, k) of the 8 lanes' patches
      for (int i = 0; i < A4; ++i) {
        __m128 row[8];
        for (int lane = 0; lane < 8; ++lane) {
          const TilePos& tp = pos[lane];
          const int yy = tp.y0 + i;
          row[lane] = tp.image && yy >= 0 && yy < p.H
                          ? _mm_maskload_ps(tp.image + int64_t(c) * in_plane + int64_t(yy) * p.W + tp.x0, tp.cols)
                          : _mm_setzero_ps();
        }
        simd::transpose8x4(row, patch + i * A4);
      }
      __m256 tmp[A4][A4], v[XI];
      for (int k = 0; k < A4; ++k) {  // columns: B^T d
        const __m256 col[4] = {patch[k], patch[4 + k], patch[8 + k], patch[12 + k]};
        __m256 o[4];
        bt4(col, o);
        for (int i = 0; i < A4; ++i) tmp[i][k] = o[i];
      }
      for (int i = 0; i < A4; ++i) {  // rows: (B^T d) B
        __m256 o[4];
        bt4(tmp[i], o);
        for (int k = 0; k < A4; ++k) v[i * A4 + k] = o[k];
      }
      const int k0 = c / kGemmKC * kGemmKC, kc = std::min(kGemmKC, p.C - k0);
      float* out = V + padded * k0 + (g * 8 / NR) * int64_t(kc) * NR + int64_t(c - k0) * NR + (g * 8) % NR;
      for (int xi = 0; xi < XI; ++xi) _mm256_storeu_ps(out + xi * xi_stride, v[xi]);
    };
    auto in_positions = [&](int64_t panel, TilePos* pos) {
      for (int lane = 0; lane < NR; ++lane) {
        const int64_t j = panel * NR + lane;
        if (j >= tiles) {
          pos[lane] = TilePos{nullptr, 0, _mm_setzero_si128(), 0};
          continue;
        }
        const TileOrigin o = tile_origin(t, t0 + j, 2);
        const int y0 = o.y - p.PT, x0 = o.x - p.PL;
        const __m128i cols = _mm256_castsi256_si128(simd::range_mask(std::max(0, -x0), std::min(A4, p.W - x0)));
        pos[lane] = TilePos{p.x + o.image * conv_x_batch_stride(p), y0, cols, x0};
      }
    };
    run_transform_tasks<TilePos>(par, groups, p.C, in_positions, in_group);
    // 2. The 16 GEMMs.
    run_gemm(winograd_chunk_gemm(p, XI, tiles, V, M), par);
    // 3. Output transform with the epilogue: 8 tiles of one output channel per step.
    const int64_t out_groups = (tiles + 7) / 8;
    auto out_group = [&](int64_t g, int k, const WinogradOutPos* pos) {
      const int lanes = int(std::min<int64_t>(8, tiles - g * 8));
      const float* src = M + int64_t(k) * tiles + g * 8;
      alignas(32) float buf[8];
      __m256 m[XI];
      for (int xi = 0; xi < XI; ++xi) {
        const float* s = src + xi * m_stride;
        if (lanes == 8) {
          m[xi] = _mm256_loadu_ps(s);
        } else {
          for (int l = 0; l < 8; ++l) buf[l] = l < lanes ? s[l] : 0.0f;
          m[xi] = _mm256_load_ps(buf);
        }
      }
      __m256 tmp[2][A4], y[2][2];
      for (int j = 0; j < A4; ++j) {
        const __m256 col[4] = {m[j], m[4 + j], m[8 + j], m[12 + j]};
        __m256 o[2];
        at4(col, o);
        tmp[0][j] = o[0], tmp[1][j] = o[1];
      }
      for (int i = 0; i < 2; ++i) at4(tmp[i], y[i]);
      alignas(32) float yv[2][2][8];
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) _mm256_store_ps(yv[i][j], y[i][j]);
      const float bias = p.bias ? p.bias[k] : 0.0f;
      for (int lane = 0; lane < lanes; ++lane) {
        const WinogradOutPos& op = pos[lane];
        float* out = p.y + op.offset + int64_t(k) * out_plane;
        const float* res = p.residual ? p.residual + op.offset + int64_t(k) * out_plane : nullptr;
        for (int i = 0; i < op.rows; ++i)
          for (int j = 0; j < op.cols; ++j) {
            const int64_t o = int64_t(i) * p.OW + j;
            float v = yv[i][j][lane] + bias;
            if (res) v += res[o];
            out[o] = act1(p.act, v, p.act_a, p.act_b);
          }
      }
    };
    auto out_positions = [&](int64_t panel, WinogradOutPos* pos) {
      winograd_out_positions(t, p, 2, t0, tiles, panel, pos);
    };
    run_transform_tasks<WinogradOutPos>(par, out_groups, p.K, out_positions, out_group);
  }
}

}  // namespace cbir::cpu
