// Pooling and LRN on NCHW planes; one task per (n, c) plane.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/ops.h"
#include "cpu/simd.h"

namespace cbir::cpu {

namespace {

constexpr int kMaxRowBuffer = 4096;  // widths up to this use the vectorised path

// Pools one output row: first over the window's input rows (vectorised across the row, NaN
// kept), then across each output's columns. `max` selects max pooling, else sums and the
// caller divides.
template <bool kMax>
void pool_row(const Pool2dParams& p, const float* x, int oy, float* vrow) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int j = 0;
  for (; j + 8 <= p.W; j += 8) _mm256_storeu_ps(vrow + j, kMax ? ninf : _mm256_setzero_ps());
  for (; j < p.W; ++j) vrow[j] = kMax ? -std::numeric_limits<float>::infinity() : 0.0f;
  for (int ky = 0; ky < p.KH; ++ky) {
    const int iy = oy * p.SH - p.PT + ky * p.DH;
    if (iy < 0 || iy >= p.H) continue;
    const float* xr = x + int64_t(iy) * p.W;
    j = 0;
    for (; j + 8 <= p.W; j += 8) {
      const __m256 v = _mm256_loadu_ps(xr + j), acc = _mm256_loadu_ps(vrow + j);
      __m256 r;
      if (kMax) {  // NaN wins: keep acc if it is NaN, else take v when v is NaN or larger
        r = _mm256_max_ps(v, acc);
        r = _mm256_blendv_ps(r, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        r = _mm256_blendv_ps(r, acc, _mm256_cmp_ps(acc, acc, _CMP_UNORD_Q));
      } else {
        r = _mm256_add_ps(acc, v);
      }
      _mm256_storeu_ps(vrow + j, r);
    }
    for (; j < p.W; ++j) {
      const float v = xr[j], acc = vrow[j];
      vrow[j] = kMax ? ((acc != acc || v != v) ? (acc != acc ? acc : v) : (v > acc ? v : acc)) : acc + v;
    }
  }
}

// One output of a pooled row from the row already reduced over the window's rows.
template <bool kMax>
float window_col(const Pool2dParams& p, const float* vrow, int ox, int rows_pad, int rows_valid) {
  float m = kMax ? -std::numeric_limits<float>::infinity() : 0.0f;
  bool nan = false;
  int cols_pad = 0, cols_valid = 0;
  for (int kx = 0; kx < p.KW; ++kx) {
    const int ix = ox * p.SW - p.PL + kx * p.DW;
    cols_pad += (ix >= -p.PL && ix < p.W + p.PR);
    if (ix < 0 || ix >= p.W) continue;
    ++cols_valid;
    const float v = vrow[ix];
    if (kMax) {
      nan |= v != v;
      m = v > m ? v : m;
    } else {
      m += v;
    }
  }
  if (kMax) return nan ? std::numeric_limits<float>::quiet_NaN() : m;
  const int div = p.count_include_pad ? rows_pad * cols_pad : rows_valid * cols_valid;
  return m / float(std::max(div, 1));
}

template <bool kMax>
void run_pool(const Pool2dParams& p, Parallel& par) {
  const int64_t in_plane = int64_t(p.H) * p.W, out_plane = int64_t(p.OH) * p.OW;
  auto task = [&](int64_t t, int) {
    const float* x = p.x + t * in_plane;
    float* y = p.y + t * out_plane;
    alignas(32) float vrow[kMaxRowBuffer];
    for (int oy = 0; oy < p.OH; ++oy) {
      pool_row<kMax>(p, x, oy, vrow);
      int rows_pad = 0, rows_valid = 0;  // window rows inside the padded / the real image
      for (int ky = 0; ky < p.KH; ++ky) {
        const int iy = oy * p.SH - p.PT + ky * p.DH;
        rows_pad += (iy >= -p.PT && iy < p.H + p.PB);
        rows_valid += (iy >= 0 && iy < p.H);
      }
      float* yr = y + int64_t(oy) * p.OW;
      int ox = 0;
      if (p.SW == 1 && p.DW == 1) {
        // Outputs whose whole window lies inside the row: vector over 8 outputs at a time.
        const int lo = p.PL, hi = p.W - p.KW + 1 + p.PL;  // ox in [lo, hi) has ix in range
        const int first = std::min(std::max(lo, 0), p.OW), last = std::max(first, std::min(hi, p.OW));
        for (; ox < first; ++ox) yr[ox] = window_col<kMax>(p, vrow, ox, rows_pad, rows_valid);
        const __m256 inv = _mm256_set1_ps(1.0f / float(std::max(1, (p.count_include_pad ? rows_pad : rows_valid) * p.KW)));
        for (; ox + 8 <= last; ox += 8) {
          const float* src = vrow + ox - p.PL;
          __m256 m = _mm256_loadu_ps(src);
          __m256 nan = _mm256_cmp_ps(m, m, _CMP_UNORD_Q);
          for (int kx = 1; kx < p.KW; ++kx) {
            const __m256 v = _mm256_loadu_ps(src + kx);
            if (kMax) {
              nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
              m = _mm256_max_ps(v, m);
            } else {
              m = _mm256_add_ps(m, v);
            }
          }
          if (kMax) m = _mm256_blendv_ps(m, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), nan);
          else m = _mm256_mul_ps(m, inv);
          _mm256_storeu_ps(yr + ox, m);
        }
      }
      for (; ox < p.OW; ++ox) yr[ox] = window_col<kMax>(p, vrow, ox, rows_pad, rows_valid);
    }
  };
  par.run(int64_t(p.N) * p.C, task);
}

// Direct form for rows too wide for the stack buffer.
void maxpool_direct(const Pool2dParams& p, Parallel& par) {
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


void avgpool_direct(const Pool2dParams& p, Parallel& par) {
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

}  // namespace

void run_maxpool2d(const Pool2dParams& p, Parallel& par) {
  if (p.W <= kMaxRowBuffer) run_pool<true>(p, par);
  else maxpool_direct(p, par);
}

void run_avgpool2d(const Pool2dParams& p, Parallel& par) {
  if (p.W <= kMaxRowBuffer) run_pool<false>(p, par);
  else avgpool_direct(p, par);
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
