#include "cpu/winograd.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/gemm.h"

namespace cbir::cpu {
namespace {

constexpr int A6 = kWinogradAlpha;
constexpr int XI = A6 * A6;  // 36 transformed positions
// Tiles per chunk are bounded so the transformed input and output of a chunk (36 x (C + K) x
// tiles floats) stay around this many floats, whatever the batch and image size.
constexpr size_t kChunkFloats = size_t(4) << 20;

// d (6x6) -> B^T d B, interpolation points 0, +-1, +-2 (Lavin and Gray's F(4,3) matrices).
inline void input_transform(const float d[A6][A6], float out[A6][A6]) {
  float t[A6][A6];
  for (int j = 0; j < A6; ++j) {
    const float d0 = d[0][j], d1 = d[1][j], d2 = d[2][j], d3 = d[3][j], d4 = d[4][j], d5 = d[5][j];
    t[0][j] = 4 * d0 - 5 * d2 + d4;
    t[1][j] = -4 * d1 - 4 * d2 + d3 + d4;
    t[2][j] = 4 * d1 - 4 * d2 - d3 + d4;
    t[3][j] = -2 * d1 - d2 + 2 * d3 + d4;
    t[4][j] = 2 * d1 - d2 - 2 * d3 + d4;
    t[5][j] = 4 * d1 - 5 * d3 + d5;
  }
  for (int i = 0; i < A6; ++i) {
    const float d0 = t[i][0], d1 = t[i][1], d2 = t[i][2], d3 = t[i][3], d4 = t[i][4], d5 = t[i][5];
    out[i][0] = 4 * d0 - 5 * d2 + d4;
    out[i][1] = -4 * d1 - 4 * d2 + d3 + d4;
    out[i][2] = 4 * d1 - 4 * d2 - d3 + d4;
    out[i][3] = -2 * d1 - d2 + 2 * d3 + d4;
    out[i][4] = 2 * d1 - d2 - 2 * d3 + d4;
    out[i][5] = 4 * d1 - 5 * d3 + d5;
  }
}

// m (6x6) -> A^T m A (4x4).
inline void output_transform(const float m[A6][A6], float out[4][4]) {
  float t[4][A6];
  for (int j = 0; j < A6; ++j) {
    const float m0 = m[0][j], m1 = m[1][j], m2 = m[2][j], m3 = m[3][j], m4 = m[4][j], m5 = m[5][j];
    t[0][j] = m0 + m1 + m2 + m3 + m4;
    t[1][j] = m1 - m2 + 2 * (m3 - m4);
    t[2][j] = m1 + m2 + 4 * (m3 + m4);
    t[3][j] = m1 - m2 + 8 * (m3 - m4) + m5;
  }
  for (int i = 0; i < 4; ++i) {
    const float m0 = t[i][0], m1 = t[i][1], m2 = t[i][2], m3 = t[i][3], m4 = t[i][4], m5 = t[i][5];
    out[i][0] = m0 + m1 + m2 + m3 + m4;
    out[i][1] = m1 - m2 + 2 * (m3 - m4);
    out[i][2] = m1 + m2 + 4 * (m3 + m4);
    out[i][3] = m1 - m2 + 8 * (m3 - m4) + m5;
  }
}

struct Tiling {
  int th, tw;          // tiles per image, down and across
  int64_t total;       // tiles over the whole batch
  int64_t chunk;       // tiles per chunk
};

Tiling tiling(const Conv2dParams& p) {
  Tiling t;
  t.th = (p.OH + 3) / 4;
  t.tw = (p.OW + 3) / 4;
  t.total = int64_t(p.N) * t.th * t.tw;
  const size_t per_tile = size_t(XI) * size_t(p.C + p.K);
  int64_t chunk = int64_t(std::max<size_t>(16, kChunkFloats / per_tile));
  chunk = (chunk + kGemmNR - 1) / kGemmNR * kGemmNR;
  t.chunk = std::min<int64_t>(chunk, t.total);
  return t;
}

float act_scalar(Act act, float v, float a, float b) {
  switch (act) {
    case Act::None: return v;
    case Act::Relu: return v < 0.0f ? 0.0f : v;
    case Act::Clip: return v < a ? a : (v > b ? b : v);
    case Act::LeakyRelu: return v < 0.0f ? v * a : v;
    case Act::Sigmoid: return 1.0f / (1.0f + std::exp(-v));
  }
  return v;
}

}  // namespace

size_t winograd_packed_weight_floats(int K, int C) { return size_t(XI) * packed_a_floats(K, C); }

void pack_winograd_weight(const float* w, int K, int C, float* out) {
  static const double G[A6][3] = {{0.25, 0, 0},
                                  {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                  {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                  {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                  {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                  {0, 0, 1}};
  // U[xi][k][c] = (G g G^T)[xi], then each xi packed as a K x C matrix.
  std::vector<float> u(size_t(XI) * K * C);
  for (int k = 0; k < K; ++k)
    for (int c = 0; c < C; ++c) {
      const float* g = w + (int64_t(k) * C + c) * 9;
      double t[A6][3];
      for (int i = 0; i < A6; ++i)
        for (int j = 0; j < 3; ++j) t[i][j] = G[i][0] * g[j] + G[i][1] * g[3 + j] + G[i][2] * g[6 + j];
      for (int i = 0; i < A6; ++i)
        for (int j = 0; j < A6; ++j)
          u[(size_t(i * A6 + j) * K + k) * C + c] = float(t[i][0] * G[j][0] + t[i][1] * G[j][1] + t[i][2] * G[j][2]);
    }
  const size_t stride = packed_a_floats(K, C);
  for (int xi = 0; xi < XI; ++xi) pack_a(u.data() + size_t(xi) * K * C, C, 1, K, C, out + xi * stride);
}

size_t winograd_workspace_floats(const Conv2dParams& p) {
  const Tiling t = tiling(p);
  return size_t(XI) * size_t(p.C + p.K) * size_t(t.chunk);
}

static GemmParams chunk_gemm(const Conv2dParams& p, int64_t tiles, float* v, float* m) {
  GemmParams g;
  g.M = p.K;
  g.N = int(tiles);
  g.K = p.C;
  g.batch = XI;
  g.a_packed = p.w;
  g.a_packed_bs = int64_t(packed_a_floats(p.K, p.C));
  g.b = v;
  g.b_rs = tiles;
  g.b_cs = 1;
  g.b_bs = int64_t(p.C) * tiles;
  g.c = m;
  g.ldc = tiles;
  g.c_bs = int64_t(p.K) * tiles;
  return g;
}

size_t winograd_scratch_floats(const Conv2dParams& p, int threads) {
  const Tiling t = tiling(p);
  return gemm_scratch_floats(chunk_gemm(p, t.chunk, nullptr, nullptr), threads);
}

void run_winograd_conv3x3(const Conv2dParams& p, float* workspace, Parallel& par) {
  const Tiling t = tiling(p);
  const int64_t per_image = int64_t(t.th) * t.tw;
  const int64_t in_plane = int64_t(p.H) * p.W, out_plane = int64_t(p.OH) * p.OW;
  float* V = workspace;                                   // [36][C][chunk]
  float* M = workspace + size_t(XI) * p.C * t.chunk;      // [36][K][chunk]
  constexpr int64_t kTilesPerTask = 32;

  for (int64_t t0 = 0; t0 < t.total; t0 += t.chunk) {
    const int64_t tiles = std::min(t.chunk, t.total - t0);
    const int64_t groups = (tiles + kTilesPerTask - 1) / kTilesPerTask;
    // 1. Input transform: V[xi][c][tile].
    auto in_task = [&](int64_t task, int) {
      const int c = int(task / groups);
      const int64_t g0 = (task % groups) * kTilesPerTask, g1 = std::min(tiles, g0 + kTilesPerTask);
      for (int64_t j = g0; j < g1; ++j) {
        const int64_t tile = t0 + j, n = tile / per_image, r = tile % per_image;
        const int y0 = int(r / t.tw) * 4 - p.PT, x0 = int(r % t.tw) * 4 - p.PL;
        const float* x = p.x + (n * p.C + c) * in_plane;
        float d[A6][A6], v[A6][A6];
        const bool inside = y0 >= 0 && x0 >= 0 && y0 + A6 <= p.H && x0 + A6 <= p.W;
        for (int i = 0; i < A6; ++i) {
          const int yy = y0 + i;
          const float* row = x + int64_t(yy) * p.W;
          for (int k = 0; k < A6; ++k) {
            const int xx = x0 + k;
            d[i][k] = (inside || (yy >= 0 && yy < p.H && xx >= 0 && xx < p.W)) ? row[xx] : 0.0f;
          }
        }
        input_transform(d, v);
        float* out = V + int64_t(c) * tiles + j;
        for (int xi = 0; xi < XI; ++xi) out[int64_t(xi) * p.C * tiles] = v[xi / A6][xi % A6];
      }
    };
    par.run(int64_t(p.C) * groups, in_task);
    // 2. 36 GEMMs: M[xi] = U[xi] (K x C) V[xi] (C x tiles).
    run_gemm(chunk_gemm(p, tiles, V, M), par);
    // 3. Output transform with the epilogue.
    auto out_task = [&](int64_t task, int) {
      const int k = int(task / groups);
      const int64_t g0 = (task % groups) * kTilesPerTask, g1 = std::min(tiles, g0 + kTilesPerTask);
      const float b = p.bias ? p.bias[k] : 0.0f;
      for (int64_t j = g0; j < g1; ++j) {
        const int64_t tile = t0 + j, n = tile / per_image, r = tile % per_image;
        const int y0 = int(r / t.tw) * 4, x0 = int(r % t.tw) * 4;
        float m[A6][A6], y[4][4];
        const float* src = M + int64_t(k) * tiles + j;
        for (int xi = 0; xi < XI; ++xi) m[xi / A6][xi % A6] = src[int64_t(xi) * p.K * tiles];
        output_transform(m, y);
        float* out = p.y + (n * p.K + k) * out_plane;
        const float* res = p.residual ? p.residual + (n * p.K + k) * out_plane : nullptr;
        const int rows = std::min(4, p.OH - y0), cols = std::min(4, p.OW - x0);
        for (int i = 0; i < rows; ++i)
          for (int q = 0; q < cols; ++q) {
            const int64_t o = int64_t(y0 + i) * p.OW + x0 + q;
            float v = y[i][q] + b;
            if (res) v += res[o];
            out[o] = act_scalar(p.act, v, p.act_a, p.act_b);
          }
      }
    };
    par.run(int64_t(p.K) * groups, out_task);
  }
}

}  // namespace cbir::cpu
