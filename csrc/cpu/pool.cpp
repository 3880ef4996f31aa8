// Pooling and LRN on NCHW planes; one task per (n, c) plane.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/ops.h"
#include "cpu/simd.h"

namespace cbir::cpu {

namespace {

constexpr int kMaxRowBuffer = 4096;  // padded widths up to this use the buffered path

inline __m256 max_keep_nan(__m256 a, __m256 b) {  // NaN in either operand wins
  __m256 r = _mm256_max_ps(a, b);
  r = _mm256_blendv_ps(r, a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  return _mm256_blendv_ps(r, b, _mm256_cmp_ps(b, b, _CMP_UNORD_Q));
}
inline float max_keep_nan(float a, float b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

// p[0], p[2], ..., p[14].
inline __m256 load_even(const float* p) {
  const __m256 even = _mm256_shuffle_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8), _MM_SHUFFLE(2, 0, 2, 0));
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(even), 0xD8));
}

// Pooling in two separable passes per output row: the window's input rows are combined into a
// row buffer padded on both sides with the identity (0 or -inf), so the pass across columns
// needs no bounds checks; stride-1 windows are vectorised across outputs.
template <bool kMax>
void run_pool(const Pool2dParams& p, Parallel& par) {
  const int64_t in_plane = int64_t(p.H) * p.W, out_plane = int64_t(p.OH) * p.OW;
  const float ident = kMax ? -std::numeric_limits<float>::infinity() : 0.0f;
  // Averages divide by the window area inside the image (or the padded image): per column
  // factor here (padded by 8 so a masked last vector may read it), per row factor below.
  alignas(32) float cols[kMaxRowBuffer + 8];
  for (int ox = 0; ox < p.OW + 8; ++ox) {
    int pad = 0, valid = 0;
    for (int kx = 0; kx < p.KW && ox < p.OW; ++kx) {
      const int ix = ox * p.SW - p.PL + kx * p.DW;
      pad += (ix >= -p.PL && ix < p.W + p.PR);
      valid += (ix >= 0 && ix < p.W);
    }
    cols[ox] = float(p.count_include_pad ? pad : valid);
  }
  const int span = (p.OW - 1) * p.SW + (p.KW - 1) * p.DW + 1;  // buffer columns the windows read
  // 8 outputs at a time across the row (the last group masked): taps of output ox start at
  // src[ox*SW]; stride 2 takes the even elements of 16-float runs.
  auto pool_vec = [&](const float* src, int ox, const float* inv) {
    __m256 m = p.SW == 1 ? _mm256_loadu_ps(src + ox) : load_even(src + 2 * ox);
    for (int kx = 1; kx < p.KW; ++kx) {
      const float* t = src + int64_t(ox) * p.SW + kx * p.DW;
      const __m256 v = p.SW == 1 ? _mm256_loadu_ps(t) : load_even(t);
      m = kMax ? max_keep_nan(m, v) : _mm256_add_ps(m, v);
    }
    if (!kMax) m = _mm256_mul_ps(m, _mm256_loadu_ps(inv + ox));
    return m;
  };
  const bool vectorised = (p.SW == 1 || p.SW == 2) && (p.SW == 1 ? p.DW == 1 : true);
  const __m256 identv = _mm256_set1_ps(ident);
  auto task = [&](int64_t t, int) {
    const float* x = p.x + t * in_plane;
    float* y = p.y + t * out_plane;
    // Slack of 32 past the span: the masked last vector reads (never uses) up to 2*7+16 further.
    alignas(32) float buf[kMaxRowBuffer + 32];
    // Averages: 1 / window area per column for the current row factor, rebuilt only when the
    // row factor changes (at the top and bottom borders).
    alignas(32) float inv[kMaxRowBuffer + 8];
    float inv_for = -1.0f;
    float* vrow = buf + p.PL;  // vrow[ix] for ix in [-PL, span - PL)
    std::fill(buf, buf + span + 32, ident);
    for (int oy = 0; oy < p.OH; ++oy) {
      int rows_pad = 0, rows_valid = 0;
      bool first = true;
      for (int ky = 0; ky < p.KH; ++ky) {
        const int iy = oy * p.SH - p.PT + ky * p.DH;
        rows_pad += (iy >= -p.PT && iy < p.H + p.PB);
        if (iy < 0 || iy >= p.H) continue;
        ++rows_valid;
        const float* xr = x + int64_t(iy) * p.W;
        // Whole vectors; the last group loads only the row's remaining floats and leaves the
        // identity in the lanes past the row (the right padding of the buffer).
        for (int j = 0; j < p.W; j += 8) {
          __m256 v;
          if (j + 8 <= p.W) {
            v = _mm256_loadu_ps(xr + j);
          } else {
            const __m256i m = simd::tail_mask(p.W - j);
            v = _mm256_blendv_ps(identv, _mm256_maskload_ps(xr + j, m), _mm256_castsi256_ps(m));
          }
          if (!first) {
            const __m256 acc = _mm256_loadu_ps(vrow + j);
            v = kMax ? max_keep_nan(acc, v) : _mm256_add_ps(acc, v);
          }
          _mm256_storeu_ps(vrow + j, v);
        }
        first = false;
      }
      if (first) std::fill(vrow, vrow + p.W, ident);  // no input row under the window
      const float row_div = float(p.count_include_pad ? rows_pad : rows_valid);
      if (!kMax && row_div != inv_for) {
        for (int ox = 0; ox < p.OW + 8; ++ox) inv[ox] = 1.0f / std::max(1.0f, row_div * cols[ox]);
        inv_for = row_div;
      }
      float* yr = y + int64_t(oy) * p.OW;
      int ox = 0;
      if (vectorised) {
        for (; ox + 8 <= p.OW; ox += 8) _mm256_storeu_ps(yr + ox, pool_vec(buf, ox, inv));
        if (ox < p.OW) {  // via a small buffer: masked stores are slow on some CPUs (Zen)
          alignas(32) float last[8];
          _mm256_store_ps(last, pool_vec(buf, ox, inv));
          for (int i = 0; ox < p.OW; ++i, ++ox) yr[ox] = last[i];
        }
      }
      for (; ox < p.OW; ++ox) {
        const float* w = buf + int64_t(ox) * p.SW;
        float m = w[0];
        for (int kx = 1; kx < p.KW; ++kx) m = kMax ? max_keep_nan(m, w[kx * p.DW]) : m + w[kx * p.DW];
        yr[ox] = kMax ? m : m * inv[ox];
      }
    }
  };
  par.run(int64_t(p.N) * p.C, task);
}

// Stride-1 "same" windows (GoogLeNet and Inception branches) over whole planes: the plane is
// pooled as one flat array, first down the columns (taps W floats apart), then along the rows
// (taps 1 float apart), so vectors run across row ends; the few columns whose windows cross a
// row end are redone afterwards. Per-row overheads, which dominate small planes, disappear.
bool same_stride1(const Pool2dParams& p) {
  return p.SH == 1 && p.SW == 1 && p.DH == 1 && p.DW == 1 && p.KH % 2 == 1 && p.KW % 2 == 1 && p.KW <= 17 &&
         p.PT == p.KH / 2 && p.PB == p.KH / 2 && p.PL == p.KW / 2 && p.PR == p.KW / 2 &&
         p.OH == p.H && p.OW == p.W && p.KW <= p.W && p.W <= kMaxRowBuffer;
}

template <bool kMax>
void run_pool_same_s1(const Pool2dParams& p, Parallel& par) {
  const int64_t plane = int64_t(p.H) * p.W;
  const int rh = p.KH / 2, rw = p.KW / 2;
  const float ident = kMax ? -std::numeric_limits<float>::infinity() : 0.0f;
  auto combine = [](__m256 a, __m256 b) { return kMax ? max_keep_nan(a, b) : _mm256_add_ps(a, b); };
  auto combine1 = [](float a, float b) { return kMax ? max_keep_nan(a, b) : a + b; };
  // 1 / (columns of each window inside the image), for averages without the padding.
  alignas(32) float cinv[kMaxRowBuffer];
  for (int xx = 0; xx < std::min(p.W, kMaxRowBuffer); ++xx)
    cinv[xx] = 1.0f / float(std::min(rw, p.W - 1 - xx) + std::min(rw, xx) + 1);
  auto task = [&](int64_t t, int thread) {
    const float* x = p.x + t * plane;
    float* y = p.y + t * plane;
    float* v = par.scratch(thread) + 8;  // the column pass, with 8 guard floats on each side
    // 1. Down the columns: v[i] = op of x[i + dy*W] for the window rows inside the image.
    for (int yy = 0; yy < p.H; ++yy) {
      const int lo = std::max(-rh, -yy), hi = std::min(rh, p.H - 1 - yy);
      // Runs of rows with the same tap range share one flat loop.
      int y1 = yy + 1;
      while (y1 < p.H && std::max(-rh, -y1) == lo && std::min(rh, p.H - 1 - y1) == hi) ++y1;
      const int64_t i0 = int64_t(yy) * p.W, i1 = int64_t(y1) * p.W;
      int64_t i = i0;
      for (; i + 8 <= i1; i += 8) {
        __m256 m = _mm256_loadu_ps(x + i + int64_t(lo) * p.W);
        for (int dy = lo + 1; dy <= hi; ++dy) m = combine(m, _mm256_loadu_ps(x + i + int64_t(dy) * p.W));
        _mm256_storeu_ps(v + i, m);
      }
      for (; i < i1; ++i) {
        float m = x[i + int64_t(lo) * p.W];
        for (int dy = lo + 1; dy <= hi; ++dy) m = combine1(m, x[i + int64_t(dy) * p.W]);
        v[i] = m;
      }
      yy = y1 - 1;
    }
    // 2. Along the rows, flat: right for every column whose window stays inside its row.
    int64_t i = 0;
    for (; i + 8 <= plane; i += 8) {
      __m256 m = _mm256_loadu_ps(v + i - rw);
      for (int dx = -rw + 1; dx <= rw; ++dx) m = combine(m, _mm256_loadu_ps(v + i + dx));
      _mm256_storeu_ps(y + i, m);
    }
    for (; i < plane; ++i) {
      float m = v[i - rw];
      for (int dx = -rw + 1; dx <= rw; ++dx) m = combine1(m, v[i + dx]);
      y[i] = m;
    }
    // 3. Redo the columns near the row ends, whose flat windows wrapped into the next row.
    for (int yy = 0; yy < p.H && rw > 0; ++yy) {  // a 1-wide window never wraps
      const float* vr = v + int64_t(yy) * p.W;
      float* yr = y + int64_t(yy) * p.W;
      for (int xx = 0; xx < p.W; ++xx) {
        if (xx == rw && p.W - rw > rw) xx = p.W - rw;  // skip the interior
        float m = ident;
        bool any = false;
        for (int dx = -rw; dx <= rw; ++dx) {
          const int c = xx + dx;
          if (c < 0 || c >= p.W) continue;
          m = any ? combine1(m, vr[c]) : vr[c];
          any = true;
        }
        yr[xx] = m;
      }
    }
    if (!kMax) {  // divide by the window area inside the image, or the whole window
      if (p.count_include_pad) {
        const __m256 inv = _mm256_set1_ps(1.0f / float(p.KH * p.KW));
        int64_t j = 0;
        for (; j + 8 <= plane; j += 8) _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_loadu_ps(y + j), inv));
        for (; j < plane; ++j) y[j] *= 1.0f / float(p.KH * p.KW);
      } else {
        for (int yy = 0; yy < p.H; ++yy) {
          const float rinv = 1.0f / float(std::min(rh, p.H - 1 - yy) + std::min(rh, yy) + 1);
          float* yr = y + int64_t(yy) * p.W;
          int xx = 0;
          for (; xx + 8 <= p.W; xx += 8)
            _mm256_storeu_ps(yr + xx, _mm256_mul_ps(_mm256_loadu_ps(yr + xx),
                                                    _mm256_mul_ps(_mm256_set1_ps(rinv), _mm256_loadu_ps(cinv + xx))));
          for (; xx < p.W; ++xx) yr[xx] *= rinv * cinv[xx];
        }
      }
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

// Whether the padded row fits the stack buffer of run_pool.
static bool buffered(const Pool2dParams& p) {
  const int64_t span = int64_t(p.OW - 1) * p.SW + int64_t(p.KW - 1) * p.DW + 1;
  return std::max<int64_t>(span, int64_t(p.PL) + p.W) <= kMaxRowBuffer;
}

size_t pool2d_scratch_floats(const Pool2dParams& p) {
  return same_stride1(p) ? size_t(p.H) * p.W + 16 : 0;
}

void run_maxpool2d(const Pool2dParams& p, Parallel& par) {
  if (same_stride1(p) && par.scratch_floats() >= pool2d_scratch_floats(p)) run_pool_same_s1<true>(p, par);
  else if (buffered(p)) run_pool<true>(p, par);
  else maxpool_direct(p, par);
}

void run_avgpool2d(const Pool2dParams& p, Parallel& par) {
  if (same_stride1(p) && par.scratch_floats() >= pool2d_scratch_floats(p)) run_pool_same_s1<false>(p, par);
  else if (buffered(p)) run_pool<false>(p, par);
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
