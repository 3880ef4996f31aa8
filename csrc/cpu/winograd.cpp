#include "cpu/winograd.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <immintrin.h>

#include "cpu/gemm.h"
#include "cpu/simd.h"

namespace cbir::cpu {
namespace {

constexpr int A6 = kWinogradAlpha;
constexpr int XI = A6 * A6;  // 36 transformed positions
// Tiles per chunk are bounded so the transformed input and output of a chunk (36 x (C + K) x
// tiles floats) stay around this many floats, whatever the batch and image size.
constexpr size_t kChunkFloats = size_t(1) << 20;
constexpr int NR = kGemmNR;

// Transforms of 8 tiles at once (one tile per SIMD lane). Lavin and Gray's F(4,3) matrices with
// interpolation points 0, +-1, +-2:
//   B^T rows: [4 0 -5 0 1 0] [0 -4 -4 1 1 0] [0 4 -4 -1 1 0] [0 -2 -1 2 1 0] [0 2 -1 -2 1 0] [0 4 0 -5 0 1]
//   A^T rows: [1 1 1 1 1 0] [0 1 -1 2 -2 0] [0 1 1 4 4 0] [0 1 -1 8 -8 1]
using V8 = __m256;

inline V8 add(V8 a, V8 b) { return _mm256_add_ps(a, b); }
inline V8 sub(V8 a, V8 b) { return _mm256_sub_ps(a, b); }
inline V8 mul(float s, V8 a) { return _mm256_mul_ps(_mm256_set1_ps(s), a); }
inline V8 fma(float s, V8 a, V8 b) { return _mm256_fmadd_ps(_mm256_set1_ps(s), a, b); }

// out[0..5] = B^T d for one column of six values.
inline void bt6(const V8 d[6], V8 out[6]) {
  const V8 t1 = sub(d[4], mul(4.0f, d[2])), t2 = sub(d[3], mul(4.0f, d[1]));  // d4-4d2, d3-4d1
  const V8 t3 = sub(d[4], d[2]), t4 = mul(2.0f, sub(d[3], d[1]));               // d4-d2, 2(d3-d1)
  out[0] = add(fma(4.0f, d[0], mul(-5.0f, d[2])), d[4]);
  out[1] = add(t1, t2);
  out[2] = sub(t1, t2);
  out[3] = add(t3, t4);
  out[4] = sub(t3, t4);
  out[5] = add(fma(4.0f, d[1], mul(-5.0f, d[3])), d[5]);
}

// out[0..3] = A^T m for one column of six values.
inline void at6(const V8 m[6], V8 out[4]) {
  const V8 s12 = add(m[1], m[2]), d12 = sub(m[1], m[2]);
  const V8 s34 = add(m[3], m[4]), d34 = sub(m[3], m[4]);
  out[0] = add(add(m[0], s12), s34);
  out[1] = fma(2.0f, d34, d12);
  out[2] = fma(4.0f, s34, s12);
  out[3] = add(fma(8.0f, d34, d12), m[5]);
}

// r[lane] holds 8 values of one lane; afterwards out[k][lane] = r[lane][k] for k < 6.
inline void transpose8x6(const V8 r[8], V8 out[6]) {
  const V8 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const V8 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const V8 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const V8 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const V8 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const V8 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const V8 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const V8 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  out[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  out[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  out[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  out[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  out[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  out[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
}

// c[q][lane] for q < 4 -> rows[lane] = (c[0][lane], c[1][lane], c[2][lane], c[3][lane]).
inline void transpose4x8(const V8 c[4], __m128 rows[8]) {
  const V8 t0 = _mm256_unpacklo_ps(c[0], c[1]), t1 = _mm256_unpackhi_ps(c[0], c[1]);
  const V8 t2 = _mm256_unpacklo_ps(c[2], c[3]), t3 = _mm256_unpackhi_ps(c[2], c[3]);
  const V8 r0 = _mm256_shuffle_ps(t0, t2, 0x44), r1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const V8 r2 = _mm256_shuffle_ps(t1, t3, 0x44), r3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  rows[0] = _mm256_castps256_ps128(r0), rows[4] = _mm256_extractf128_ps(r0, 1);
  rows[1] = _mm256_castps256_ps128(r1), rows[5] = _mm256_extractf128_ps(r1, 1);
  rows[2] = _mm256_castps256_ps128(r2), rows[6] = _mm256_extractf128_ps(r2, 1);
  rows[3] = _mm256_castps256_ps128(r3), rows[7] = _mm256_extractf128_ps(r3, 1);
}

inline __m128 act4(Act act, __m128 v, float a, float b) {
  switch (act) {
    case Act::None: return v;
    case Act::Relu: return _mm_max_ps(_mm_setzero_ps(), v);
    case Act::Clip: return _mm_min_ps(_mm_set1_ps(b), _mm_max_ps(_mm_set1_ps(a), v));
    case Act::LeakyRelu:
      return _mm_blendv_ps(v, _mm_mul_ps(v, _mm_set1_ps(a)), _mm_cmplt_ps(v, _mm_setzero_ps()));
    case Act::Sigmoid: {
      alignas(16) float t[4];
      _mm_store_ps(t, v);
      for (float& e : t) e = 1.0f / (1.0f + std::exp(-e));
      return _mm_load_ps(t);
    }
  }
  return v;
}

// d[i][j] (6x6 per lane) -> B^T d B, written to v[i*6+j].
inline void input_transform8(V8 d[A6][A6], V8 v[XI]) {
  V8 t[A6][A6];
  for (int j = 0; j < A6; ++j) {
    V8 col[6] = {d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j]}, out[6];
    bt6(col, out);
    for (int i = 0; i < A6; ++i) t[i][j] = out[i];
  }
  for (int i = 0; i < A6; ++i) {
    V8 out[6];
    bt6(t[i], out);
    for (int j = 0; j < A6; ++j) v[i * A6 + j] = out[j];
  }
}

// m[i*6+j] (6x6 per lane) -> A^T m A (4x4 per lane).
inline void output_transform8(const V8 m[XI], V8 y[4][4]) {
  V8 t[4][A6];
  for (int j = 0; j < A6; ++j) {
    V8 col[6] = {m[j], m[6 + j], m[12 + j], m[18 + j], m[24 + j], m[30 + j]}, out[4];
    at6(col, out);
    for (int i = 0; i < 4; ++i) t[i][j] = out[i];
  }
  for (int i = 0; i < 4; ++i) at6(t[i], y[i]);
}

}  // namespace

size_t winograd_packed_weight_floats(int K, int C) { return size_t(XI) * packed_a_floats(K, C); }

void pack_winograd_weight(const float* w, int K, int C, float* out) {
  static const double G[A6 * 3] = {0.25,      0,         0,          -1.0 / 6,  -1.0 / 6, -1.0 / 6,
                                   -1.0 / 6,  1.0 / 6,   -1.0 / 6,   1.0 / 24,  1.0 / 12, 1.0 / 6,
                                   1.0 / 24,  -1.0 / 12, 1.0 / 6,    0,         0,        1};
  pack_winograd_weight_with(w, K, C, G, A6, out);
}

void pack_winograd_weight_with(const float* w, int K, int C, const double* G, int alpha, float* out) {
  // U[xi][k][c] = (G g G^T)[xi], then each xi packed as a K x C GEMM A operand.
  const int positions = alpha * alpha;
  std::vector<float> u(size_t(positions) * K * C);
  std::vector<double> t(size_t(alpha) * 3);
  for (int k = 0; k < K; ++k)
    for (int c = 0; c < C; ++c) {
      const float* g = w + (int64_t(k) * C + c) * 9;
      for (int i = 0; i < alpha; ++i)
        for (int j = 0; j < 3; ++j)
          t[i * 3 + j] = G[i * 3] * g[j] + G[i * 3 + 1] * g[3 + j] + G[i * 3 + 2] * g[6 + j];
      for (int i = 0; i < alpha; ++i)
        for (int j = 0; j < alpha; ++j)
          u[(size_t(i * alpha + j) * K + k) * C + c] =
              float(t[i * 3] * G[j * 3] + t[i * 3 + 1] * G[j * 3 + 1] + t[i * 3 + 2] * G[j * 3 + 2]);
    }
  const size_t stride = packed_a_floats(K, C);
  for (int xi = 0; xi < positions; ++xi) pack_a(u.data() + size_t(xi) * K * C, C, 1, K, C, out + xi * stride);
}

WinogradTiling winograd_tiling(const Conv2dParams& p, int out_tile, int positions) {
  WinogradTiling t;
  t.th = (p.OH + out_tile - 1) / out_tile;
  t.tw = (p.OW + out_tile - 1) / out_tile;
  t.per_image = int64_t(t.th) * t.tw;
  t.total = int64_t(p.N) * t.per_image;
  const size_t per_tile = size_t(positions) * size_t(p.C + p.K);
  int64_t chunk = int64_t(std::max<size_t>(NR, kChunkFloats / per_tile));
  chunk = (chunk + NR - 1) / NR * NR;
  // Equal chunks (in whole panels), not full ones and a sliver: 196 tiles in two chunks of 112
  // and 84, not 192 and 4, whose GEMMs would be all edge.
  const int64_t chunks = (t.total + chunk - 1) / chunk;
  chunk = ((t.total + chunks - 1) / chunks + NR - 1) / NR * NR;
  t.chunk = std::min<int64_t>(chunk, t.total);
  t.chunk_padded = (t.chunk + NR - 1) / NR * NR;
  return t;
}

GemmParams winograd_chunk_gemm(const Conv2dParams& p, int positions, int64_t tiles, const float* v, float* m) {
  GemmParams g;
  g.M = p.K;
  g.N = int(tiles);
  g.K = p.C;
  g.batch = positions;
  g.a_packed = p.w;
  g.a_packed_bs = int64_t(packed_a_floats(p.K, p.C));
  g.b_packed = v;
  g.b_packed_bs = winograd_v_stride(p, tiles);
  g.c = m;
  g.ldc = tiles;
  g.c_bs = winograd_m_stride(p, tiles);
  return g;
}

size_t winograd_workspace_floats_for(const Conv2dParams& p, int out_tile, int positions) {
  const WinogradTiling t = winograd_tiling(p, out_tile, positions);
  // V and M of one chunk (the strides only grow with the tile count)
  return size_t(positions) * size_t(winograd_v_stride(p, t.chunk) + winograd_m_stride(p, t.chunk_padded));
}

size_t winograd_scratch_floats_for(const Conv2dParams& p, int out_tile, int positions, int threads) {
  const WinogradTiling t = winograd_tiling(p, out_tile, positions);
  return gemm_scratch_floats(winograd_chunk_gemm(p, positions, t.chunk, nullptr, nullptr), threads);
}

size_t winograd_workspace_floats(const Conv2dParams& p) { return winograd_workspace_floats_for(p, 4, XI); }

size_t winograd_scratch_floats(const Conv2dParams& p, int threads) {
  return winograd_scratch_floats_for(p, 4, XI, threads);
}

void run_winograd_conv3x3(const Conv2dParams& p, float* workspace, Parallel& par) {
  const WinogradTiling t = winograd_tiling(p, 4, XI);
  const int64_t in_plane = int64_t(p.H) * p.W, out_plane = int64_t(p.OH) * p.OW;
  float* V = workspace;                                    // [36][tiles/16][C][16]
  float* M = workspace + size_t(XI) * winograd_v_stride(p, t.chunk);  // [36][K][tiles]

  for (int64_t t0 = 0; t0 < t.total; t0 += t.chunk) {
    const int64_t tiles = std::min(t.chunk, t.total - t0);
    const int64_t padded = (tiles + NR - 1) / NR * NR;
    const int64_t groups = padded / 8;  // 8 tiles per SIMD group; the padding tiles are zeros
    const int64_t xi_stride = winograd_v_stride(p, tiles), m_stride = winograd_m_stride(p, tiles);
    // 1. Input transform, 8 tiles per step, straight into packed-B panels (tasks: see
    // run_transform_tasks). Where each tile's 6x6 patch starts:
    struct TilePos {
      const float* image;  // channel 0 of the tile's image
      int y0, x0;
      bool inside;  // every row has 8 floats from x0 on: plain loads
    };
    auto in_group = [&](int64_t g, int c, const TilePos* pos) {
      // Row i of every lane's 6x6 patch as one vector (6 valid floats), then transposed so
      // that dv[i][k] holds column k of row i across the 8 lanes.
      V8 rows[A6][8];
      for (int lane = 0; lane < 8; ++lane) {
        const TilePos& tp = pos[lane];
        if (!tp.image) {  // past the last tile: zeros
          for (int i = 0; i < A6; ++i) rows[i][lane] = _mm256_setzero_ps();
          continue;
        }
        const float* x = tp.image + int64_t(c) * in_plane;
        const int y0 = tp.y0, x0 = tp.x0;
        if (tp.inside) {
          for (int i = 0; i < A6; ++i) rows[i][lane] = _mm256_loadu_ps(x + int64_t(y0 + i) * p.W + x0);
        } else {
          // Near an edge: a masked load per row reads only the columns inside the image (the
          // rest read as zeros, and masked-off lanes never touch memory); rows outside are zeros.
          const __m256i cols = simd::range_mask(std::max(0, -x0), std::min(A6, p.W - x0));
          for (int i = 0; i < A6; ++i) {
            const int yy = y0 + i;
            rows[i][lane] = (yy >= 0 && yy < p.H)
                                ? _mm256_maskload_ps(x + int64_t(yy) * p.W + x0, cols)
                                : _mm256_setzero_ps();
          }
        }
      }
      V8 dv[A6][A6], v[XI];
      for (int i = 0; i < A6; ++i) transpose8x6(rows[i], dv[i]);
      input_transform8(dv, v);
      // Tiles g*8 .. g*8+7 sit in panel (g*8)/16 at lane offset (g*8)%16, inside the K block
      // of channel c (packed-B layout, see gemm.h).
      const int k0 = c / kGemmKC * kGemmKC, kc = std::min(kGemmKC, p.C - k0);
      float* out = V + padded * k0 + (g * 8 / NR) * int64_t(kc) * NR + int64_t(c - k0) * NR + (g * 8) % NR;
      for (int xi = 0; xi < XI; ++xi) _mm256_storeu_ps(out + xi * xi_stride, v[xi]);
    };
    auto in_positions = [&](int64_t panel, TilePos* pos) {
      for (int lane = 0; lane < NR; ++lane) {
        const int64_t j = panel * NR + lane;
        if (j >= tiles) {
          pos[lane] = TilePos{nullptr, 0, 0, false};
          continue;
        }
        const TileOrigin o = tile_origin(t, t0 + j, 4);
        const int y0 = o.y - p.PT, x0 = o.x - p.PL;
        pos[lane] = TilePos{p.x + o.image * conv_x_batch_stride(p), y0, x0,
                            x0 >= 0 && x0 + 8 <= p.W && y0 >= 0 && y0 + A6 <= p.H};
      }
    };
    run_transform_tasks<TilePos>(par, groups, p.C, in_positions, in_group);
    // 2. The 36 GEMMs.
    run_gemm(winograd_chunk_gemm(p, XI, tiles, V, M), par);  // the 36 GEMMs, V in packed-B panels
    // 3. Output transform, 8 tiles per step, with the epilogue.
    const int64_t out_groups = (tiles + 7) / 8;
    auto out_group = [&](int64_t g, int k, const WinogradOutPos* pos) {
      const int lanes = int(std::min<int64_t>(8, tiles - g * 8));
      const float* src = M + int64_t(k) * tiles + g * 8;
      V8 m[XI];
      if (lanes == 8) {
        for (int xi = 0; xi < XI; ++xi) m[xi] = _mm256_loadu_ps(src + xi * m_stride);
      } else {
        const __m256i mask = simd::tail_mask(lanes);
        for (int xi = 0; xi < XI; ++xi) m[xi] = _mm256_maskload_ps(src + xi * m_stride, mask);
      }
      V8 yv[4][4];
      output_transform8(m, yv);
      const __m128 b = _mm_set1_ps(p.bias ? p.bias[k] : 0.0f);
      __m128 rows[4][8];
      for (int i = 0; i < 4; ++i) transpose4x8(yv[i], rows[i]);
      for (int lane = 0; lane < lanes; ++lane) {
        const WinogradOutPos& op = pos[lane];
        float* out = p.y + op.offset + int64_t(k) * out_plane;
        const float* res = p.residual ? p.residual + op.offset + int64_t(k) * out_plane : nullptr;
        const int cols = op.cols;
        const __m128i mask = _mm256_castsi256_si128(simd::tail_mask(cols));
        for (int i = 0; i < op.rows; ++i) {
          const int64_t o = int64_t(i) * p.OW;
          __m128 v = _mm_add_ps(rows[i][lane], b);
          if (res) v = _mm_add_ps(v, cols == 4 ? _mm_loadu_ps(res + o) : _mm_maskload_ps(res + o, mask));
          v = act4(p.act, v, p.act_a, p.act_b);
          if (cols == 4) {
            _mm_storeu_ps(out + o, v);
          } else {  // via a buffer: masked stores are slow on some CPUs (Zen)
            alignas(16) float part[4];
            _mm_store_ps(part, v);
            for (int q = 0; q < cols; ++q) out[o + q] = part[q];
          }
        }
      }
    };
    auto out_positions = [&](int64_t panel, WinogradOutPos* pos) {
      winograd_out_positions(t, p, 4, t0, tiles, panel, pos);
    };
    run_transform_tasks<WinogradOutPos>(par, out_groups, p.K, out_positions, out_group);
  }
}

}  // namespace cbir::cpu
