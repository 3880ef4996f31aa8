// Pooling and LRN on NCHW planes; one task per (n, c) plane.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/ops.h"
#include "cpu/simd.h"

namespace cbir::cpu {

void run_maxpool2d(const Pool2dParams& p, Parallel& par) {
  const int64_t in_plane = int64_t(p.H) * p.W, out_plane = int64_t(p.OH) * p.OW;
  auto task = [&](int64_t t, int) {
    const float* x = p.x + t * in_plane;
    float* y = p.y + t * out_plane;
    for (int oy = 0; oy < p.OH; ++oy) {
      for (int ox = 0; ox < p.OW; ++ox) {
        float m = -std::numeric_limits<float>::infinity();
        bool nan = false;
        for (int ky = 0; ky < p.KH; ++ky) {
          const int iy = oy * p.SH - p.PT + ky * p.DH;
          if (iy < 0 || iy >= p.H) continue;
          const float* xr = x + int64_t(iy) * p.W;
          for (int kx = 0; kx < p.KW; ++kx) {
            const int ix = ox * p.SW - p.PL + kx * p.DW;
            if (ix < 0 || ix >= p.W) continue;
            const float v = xr[ix];
            nan |= v != v;
            m = v > m ? v : m;
          }
        }
        y[int64_t(oy) * p.OW + ox] = nan ? std::numeric_limits<float>::quiet_NaN() : m;
      }
    }
  };
  par.run(int64_t(p.N) * p.C, task);
}

void run_avgpool2d(const Pool2dParams& p, Parallel& par) {
  const int64_t in_plane = int64_t(p.H) * p.W, out_plane = int64_t(p.OH) * p.OW;
  auto task = [&](int64_t t, int) {
    const float* x = p.x + t * in_plane;
    float* y = p.y + t * out_plane;
    for (int oy = 0; oy < p.OH; ++oy) {
      int rows_pad = 0;  // window taps inside the padded image
      for (int ky = 0; ky < p.KH; ++ky) {
        const int iy = oy * p.SH - p.PT + ky * p.DH;
        rows_pad += (iy >= -p.PT && iy < p.H + p.PB);
      }
      for (int ox = 0; ox < p.OW; ++ox) {
        float s = 0.0f;
        int valid = 0, cols_pad = 0;
        for (int kx = 0; kx < p.KW; ++kx) {
          const int ix = ox * p.SW - p.PL + kx * p.DW;
          cols_pad += (ix >= -p.PL && ix < p.W + p.PR);
        }
        for (int ky = 0; ky < p.KH; ++ky) {
          const int iy = oy * p.SH - p.PT + ky * p.DH;
          if (iy < 0 || iy >= p.H) continue;
          const float* xr = x + int64_t(iy) * p.W;
          for (int kx = 0; kx < p.KW; ++kx) {
            const int ix = ox * p.SW - p.PL + kx * p.DW;
            if (ix < 0 || ix >= p.W) continue;
            s += xr[ix];
            ++valid;
          }
        }
        const int div = p.count_include_pad ? rows_pad * cols_pad : valid;
        y[int64_t(oy) * p.OW + ox] = s / float(std::max(div, 1));
      }
    }
  };
  par.run(int64_t(p.N) * p.C, task);
}

void run_global_pool(GlobalPool kind, int64_t outer, int64_t inner, const float* x, float* y,
                     Parallel& par) {
  auto task = [&](int64_t t, int) {
    const float* row = x + t * inner;
    int64_t j = 0;
    if (kind == GlobalPool::Avg) {
      __m256 acc = _mm256_setzero_ps();
      for (; j + 8 <= inner; j += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(row + j));
      float s = simd::hsum(acc);
      for (; j < inner; ++j) s += row[j];
      y[t] = s / float(inner);
    } else {
      float m = -std::numeric_limits<float>::infinity();
      bool nan = false;
      for (; j < inner; ++j) {
        nan |= row[j] != row[j];
        m = row[j] > m ? row[j] : m;
      }
      y[t] = nan ? std::numeric_limits<float>::quiet_NaN() : m;
    }
  };
  par.run(outer, task);
}

void run_lrn(const LrnParams& p, Parallel& par) {
  // Window over channels [c - (size-1)/2, c + size/2], as ONNX and torch define it.
  const int before = (p.size - 1) / 2, after = p.size - 1 - before;
  const float scale = p.alpha / float(p.size);
  constexpr int64_t kChunk = 256;
  const int64_t chunks = (p.HW + kChunk - 1) / kChunk;
  auto task = [&](int64_t t, int) {
    const int64_t n = t / chunks, j0 = (t % chunks) * kChunk, len = std::min(kChunk, p.HW - j0);
    const float* x = p.x + n * p.C * p.HW + j0;
    float* y = p.y + n * p.C * p.HW + j0;
    for (int64_t c = 0; c < p.C; ++c) {
      const int64_t lo = std::max<int64_t>(0, c - before), hi = std::min<int64_t>(p.C - 1, c + after);
      float* yr = y + c * p.HW;
      for (int64_t j = 0; j < len; ++j) yr[j] = 0.0f;
      for (int64_t cc = lo; cc <= hi; ++cc) {
        const float* xr = x + cc * p.HW;
        for (int64_t j = 0; j < len; ++j) yr[j] += xr[j] * xr[j];
      }
      const float* xr = x + c * p.HW;
      for (int64_t j = 0; j < len; ++j) yr[j] = xr[j] / std::pow(p.bias + scale * yr[j], p.beta);
    }
  };
  par.run(p.N * chunks, task);
}

}  // namespace cbir::cpu
