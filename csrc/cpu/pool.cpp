// Pooling and LRN on NCHW planes; one task per (n, c) plane.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/ops.h"
#include "cpu/pool_detail.h"
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

// Averages divide by the window area inside the image (or the padded image): the factor of
// output column ox (cols[ox]; zero past the row, up to 8 floats on), then the row's below.
void window_columns(const Pool2dParams& p, float* cols) {
  for (int ox = 0; ox < p.OW + 8; ++ox) {
    int pad = 0, valid = 0;
    for (int kx = 0; kx < p.KW && ox < p.OW; ++kx) {
      const int ix = ox * p.SW - p.PL + kx * p.DW;
      pad += (ix >= -p.PL && ix < p.W + p.PR);
      valid += (ix >= 0 && ix < p.W);
    }
    cols[ox] = float(p.count_include_pad ? pad : valid);
  }
}
// The divisor of output row oy's windows (rows inside the image, or the padded image).
float window_rows(const Pool2dParams& p, int oy) {
  int pad = 0, valid = 0;
  for (int ky = 0; ky < p.KH; ++ky) {
    const int iy = oy * p.SH - p.PT + ky * p.DH;
    pad += (iy >= -p.PT && iy < p.H + p.PB);
    valid += (iy >= 0 && iy < p.H);
  }
  return float(p.count_include_pad ? pad : valid);
}

// Pools plane t (of N * C) in two separable passes per output row: the window's input rows are
// combined into a row buffer padded on both sides with the identity (0 or -inf), so the pass
// across columns needs no bounds checks; stride-1 windows are vectorised across outputs.
template <bool kMax>
void pool_plane(const Pool2dParams& p, const float* cols, int64_t t) {
  const int64_t in_plane = int64_t(p.H) * p.W;
  const float ident = kMax ? -std::numeric_limits<float>::infinity() : 0.0f;
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
  // The input affine of average pools (identity otherwise).
  const int c = int(t % p.C);
  const bool has_affine = !kMax && p.in_scale;
  const __m256 scale = _mm256_set1_ps(has_affine ? p.in_scale[c] : 1.0f);
  const __m256 shift = _mm256_set1_ps(has_affine ? p.in_shift[c] : 0.0f);
  // MAXPS returns its second operand when either is NaN: the data goes second, so NaN stays.
  auto affine = [&](__m256 v) {
    if (!has_affine) return v;
    v = _mm256_fmadd_ps(v, scale, shift);
    return p.in_relu ? _mm256_max_ps(_mm256_setzero_ps(), v) : v;
  };
  const float* x = p.x + t * in_plane;
  float* y = pool_out_plane(p, t);
  // Slack of 32 past the span: the masked last vector reads (never uses) up to 2*7+16 further.
  alignas(32) float buf[kMaxRowBuffer + 32];
  // Averages: 1 / window area per column for the current row factor, rebuilt only when the
  // row factor changes (at the top and bottom borders).
  alignas(32) float inv[kMaxRowBuffer + 8];
  float inv_for = -1.0f;
  float* vrow = buf + p.PL;  // vrow[ix] for ix in [-PL, span - PL)
  std::fill(buf, buf + span + 32, ident);
  for (int oy = 0; oy < p.OH; ++oy) {
    bool first = true;
    for (int ky = 0; ky < p.KH; ++ky) {
      const int iy = oy * p.SH - p.PT + ky * p.DH;
      if (iy < 0 || iy >= p.H) continue;
      const float* xr = x + int64_t(iy) * p.W;
      // Whole vectors; the last group loads only the row's remaining floats and leaves the
      // identity in the lanes past the row (the right padding of the buffer).
      for (int j = 0; j < p.W; j += 8) {
        __m256 v;
        if (j + 8 <= p.W) {
          v = affine(_mm256_loadu_ps(xr + j));
        } else {
          const __m256i m = simd::tail_mask(p.W - j);
          v = _mm256_blendv_ps(identv, affine(_mm256_maskload_ps(xr + j, m)), _mm256_castsi256_ps(m));
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
    const float row_div = kMax ? 1.0f : window_rows(p, oy);
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
}

template <bool kMax>
void run_pool(const Pool2dParams& p, Parallel& par) {
  alignas(32) float cols[kMaxRowBuffer + 8];
  window_columns(p, cols);
  auto task = [&](int64_t t, int) { pool_plane<kMax>(p, cols, t); };
  par.run(int64_t(p.N) * p.C, task);
}

// Stride-2 windows with AVX-512 (pool_avx512.cpp); a max-pool plane that may hold a NaN is
// pooled again by pool_plane, which keeps it. Averages take their factors from a table made
// once a call (a few KiB; computing them per plane cost DenseNet's transition pools with 14x14
// and 7x7 outputs 1.43x and 1.51x the time at batch 8).
template <bool kMax>
bool run_pool_stride2(const Pool2dParams& p, Parallel& par) {
  const int row_floats = pool_detail::stride2_row_floats(p);
  std::vector<float> factors;
  if (!kMax) {
    if (int64_t(p.OH) * row_floats > (int64_t(1) << 16)) return false;  // over 256 KiB: the row-buffer path
    alignas(32) float cols[kMaxRowBuffer + 8];
    window_columns(p, cols);
    factors.assign(size_t(p.OH) * size_t(row_floats), 0.0f);
    for (int oy = 0; oy < p.OH; ++oy) {
      const float rows = window_rows(p, oy);
      for (int ox = 0; ox < p.OW; ++ox)
        factors[size_t(oy) * size_t(row_floats) + size_t(ox)] = 1.0f / std::max(1.0f, rows * cols[ox]);
    }
  }
  auto task = [&](int64_t t, int) {
    if (pool_detail::stride2_plane_avx512(kMax, p, t, factors.data())) return;
    alignas(32) float cols[kMaxRowBuffer + 8];
    window_columns(p, cols);
    pool_plane<kMax>(p, cols, t);
  };
  par.run(int64_t(p.N) * p.C, task);
  return true;
}

// Stride-1 "same" windows (GoogLeNet and Inception branches). Each plane is copied into a
// scratch image with rh rows and rw columns of the identity (-inf or 0) around it, and pooled
// there in two flat separable passes: down the columns (taps a padded row apart), then along
// the rows (taps 1 float apart). With the borders in the image, vectors run across row ends
// with no special cases, which matters on the small planes of these networks (7x7 to 35x35):
// the per-row and per-border work, not the arithmetic, is what costs there. The borders are
// written once per thread and call; planes overwrite only the interior.
bool same_stride1(const Pool2dParams& p) {
  return p.SH == 1 && p.SW == 1 && p.DH == 1 && p.DW == 1 && p.KH % 2 == 1 && p.KW % 2 == 1 && p.KW <= 17 &&
         p.KH <= 17 && p.PT == p.KH / 2 && p.PB == p.KH / 2 && p.PL == p.KW / 2 && p.PR == p.KW / 2 &&
         p.OH == p.H && p.OW == p.W && p.W <= kMaxRowBuffer;
}

struct SameS1Geometry {
  int rh, rw, stride;  // padded row length
  int64_t padded;      // floats of the padded image
  int64_t body;        // floats of the H padded-stride rows the passes produce
  // Scratch: padded image, column pass, row pass; each with 8 floats of slack for the last vector.
  int64_t scratch() const { return padded + 2 * body + 3 * 16; }
};
SameS1Geometry same_s1_geometry(const Pool2dParams& p) {
  SameS1Geometry g;
  g.rh = p.KH / 2, g.rw = p.KW / 2, g.stride = p.W + 2 * g.rw;
  g.padded = int64_t(p.H + 2 * g.rh) * g.stride;
  g.body = int64_t(p.H) * g.stride;
  return g;
}

// Shared by both same-window paths below.

// 1 / (the taps of a window of radius r centred on i that fall inside [0, n)).
inline float inside_inv(int r, int i, int n) { return 1.0f / float(std::min(r, n - 1 - i) + std::min(r, i) + 1); }

// Each thread's scratch image, its first `border_floats` set to the identity on the thread's
// first plane of a call: planes overwrite only the interior, so the borders stay.
class BorderedScratch {
 public:
  BorderedScratch(Parallel& par, int64_t border_floats, float ident)
      : par_(par), floats_(border_floats), ident_(ident), ready_(size_t(std::max(1, par.threads())), 0) {}
  float* get(int thread) {
    float* img = par_.scratch(thread);
    if (!ready_[size_t(thread)]) {
      std::fill(img, img + floats_, ident_);
      ready_[size_t(thread)] = 1;
    }
    return img;
  }

 private:
  Parallel& par_;
  int64_t floats_;
  float ident_;
  std::vector<char> ready_;
};

// Copies an H x W plane into the image (row y at dst + y * stride), rows in order. Each row's
// last vector is stored whole with its lanes past the row set to `identv`: they land on border
// columns, on the next row (copied after it) or on the bottom border, all of which must hold
// the identity. Returns whether the plane holds a NaN (without one, plain max replaces the
// NaN-keeping one).
inline bool copy_plane_in(const float* x, int H, int W, float* dst, int64_t stride, __m256 identv) {
  const int full = W / 8 * 8, tail = W - full;
  const __m256i mask = simd::tail_mask(tail);
  __m256 nan = _mm256_setzero_ps();
  for (int yy = 0; yy < H; ++yy) {
    const float* src = x + int64_t(yy) * W;
    float* d = dst + int64_t(yy) * stride;
    for (int xx = 0; xx < full; xx += 8) {
      const __m256 v = _mm256_loadu_ps(src + xx);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      _mm256_storeu_ps(d + xx, v);
    }
    if (tail) {
      const __m256 v = _mm256_maskload_ps(src + full, mask);  // masked lanes read as 0
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      _mm256_storeu_ps(d + full, _mm256_blendv_ps(identv, v, _mm256_castsi256_ps(mask)));
    }
  }
  return _mm256_movemask_ps(nan) != 0;
}

// The window's reduction: a sum, or a max that keeps NaN only when the plane has one.
template <bool kMax>
struct Combine {
  bool keep_nan;
  __m256 operator()(__m256 a, __m256 b) const {
    if (!kMax) return _mm256_add_ps(a, b);
    return keep_nan ? max_keep_nan(a, b) : _mm256_max_ps(a, b);
  }
};

// Output vector at columns [xx, xx + 8) of row yy: averages scaled (by the whole window, or by
// rinv times the per-column factor), then stored whole (the next row overwrites the spill)
// except at the end of the plane's last row, whose spill would land on the next plane.
template <bool kMax>
inline void store_out(const Pool2dParams& p, __m256 v, float rinv, const float* cinv, int yy, int xx, float* dst) {
  if (!kMax) {
    v = _mm256_mul_ps(v, _mm256_set1_ps(rinv));
    if (!p.count_include_pad) v = _mm256_mul_ps(v, _mm256_loadu_ps(cinv + xx));
  }
  if (xx + 8 <= p.W || yy + 1 < p.H) _mm256_storeu_ps(dst + xx, v);
  else _mm256_maskstore_ps(dst + xx, simd::tail_mask(p.W - xx), v);
}
template <bool kMax>
inline float row_inv(const Pool2dParams& p, int yy) {
  return kMax || p.count_include_pad ? 1.0f / float(p.KH * p.KW) : inside_inv(p.KH / 2, yy, p.H);
}

// 3x3 stride-1 "same" windows, the GoogLeNet and Inception case, in one pass per plane. The
// plane is copied into a scratch image whose rows start 8 floats in (after a border of the
// identity) at a stride of whole vectors, so every vector load of the pass reads exactly what
// one vector store of the copy wrote: on small planes the pass follows the copy within a few
// hundred cycles, and a load straddling two stores still in the store buffer stalls (the flat
// two-pass form spent most of its time so on 7x7 planes). Each vector of column results is
// combined with its neighbours shifted by one lane in registers for the row direction.
struct Pool3x3Geometry {
  int stride;        // floats per scratch row: an 8-float left border, the row, 1+ identities
  int blocks;        // vectors per row
  int64_t floats;    // scratch image: H + 2 rows, plus a vector of slack
};
Pool3x3Geometry pool3x3_geometry(const Pool2dParams& p) {
  Pool3x3Geometry g;
  g.blocks = (p.W + 1 + 7) / 8;  // room for at least one identity after the row
  g.stride = 8 + 8 * g.blocks;
  g.floats = int64_t(p.H + 2) * g.stride + 8;
  return g;
}
bool pool3x3_s1(const Pool2dParams& p) { return same_stride1(p) && p.KH == 3 && p.KW == 3; }

// Lanes [1..7] of a then b[0]; and a[7] then lanes [0..6] of b.
inline __m256 next_lane(__m256 a, __m256 b) {
  const __m256i t = _mm256_castps_si256(_mm256_permute2f128_ps(a, b, 0x21));
  return _mm256_castsi256_ps(_mm256_alignr_epi8(t, _mm256_castps_si256(a), 4));
}
inline __m256 prev_lane(__m256 a, __m256 b) {
  const __m256i t = _mm256_castps_si256(_mm256_permute2f128_ps(a, b, 0x21));
  return _mm256_castsi256_ps(_mm256_alignr_epi8(_mm256_castps_si256(b), t, 12));
}

template <bool kMax>
void run_pool3x3_s1(const Pool2dParams& p, Parallel& par) {
  const Pool3x3Geometry g = pool3x3_geometry(p);
  const int64_t plane = int64_t(p.H) * p.W;
  const float ident = kMax ? -std::numeric_limits<float>::infinity() : 0.0f;
  alignas(32) float cinv[kMaxRowBuffer + 16] = {};  // 1 / window columns inside the image
  for (int xx = 0; xx < p.W; ++xx) cinv[xx] = inside_inv(1, xx, p.W);
  BorderedScratch scratch(par, g.floats, ident);
  auto task = [&](int64_t t, int thread) {
    float* img = scratch.get(thread);
    const __m256 identv = _mm256_set1_ps(ident);
    const Combine<kMax> combine{copy_plane_in(p.x + t * plane, p.H, p.W, img + g.stride + 8, g.stride, identv)};
    for (int yy = 0; yy < p.H; ++yy) {
      const float* r0 = img + int64_t(yy) * g.stride + 8;  // rows yy-1, yy, yy+1 of the image
      const float* r1 = r0 + g.stride;
      const float* r2 = r1 + g.stride;
      auto column = [&](int b) {
        return combine(combine(_mm256_load_ps(r0 + 8 * b), _mm256_load_ps(r1 + 8 * b)), _mm256_load_ps(r2 + 8 * b));
      };
      const float rinv = row_inv<kMax>(p, yy);
      float* dst = pool_out_plane(p, t) + int64_t(yy) * p.W;
      __m256 prev = identv, cur = column(0);
      for (int b = 0; b * 8 < p.W; ++b) {
        const __m256 next = b + 1 < g.blocks ? column(b + 1) : identv;
        store_out<kMax>(p, combine(combine(prev_lane(prev, cur), cur), next_lane(cur, next)), rinv, cinv, yy, 8 * b,
                        dst);
        prev = cur, cur = next;
      }
    }
  };
  par.run(int64_t(p.N) * p.C, task);
}

template <bool kMax>
void run_pool_same_s1(const Pool2dParams& p, Parallel& par) {
  const SameS1Geometry g = same_s1_geometry(p);
  const int64_t plane = int64_t(p.H) * p.W;
  const float ident = kMax ? -std::numeric_limits<float>::infinity() : 0.0f;
  // 1 / (columns of each window inside the image), for averages without the padding.
  alignas(32) float cinv[kMaxRowBuffer + 8] = {};
  for (int xx = 0; xx < p.W; ++xx) cinv[xx] = inside_inv(g.rw, xx, p.W);
  BorderedScratch scratch(par, g.padded + 16, ident);  // the image's borders and slack
  auto task = [&](int64_t t, int thread) {
    float* xp = scratch.get(thread);
    float* vp = xp + g.padded + 16;
    float* hp = vp + g.body + 16;
    const __m256 identv = _mm256_set1_ps(ident);
    const Combine<kMax> combine{
        copy_plane_in(p.x + t * plane, p.H, p.W, xp + int64_t(g.rh) * g.stride + g.rw, g.stride, identv)};
    if (p.W % 8 && g.rw == 0) {
      // No border columns: the whole-vector tails spilled into the bottom rows; restore them.
      std::fill(xp + g.padded - int64_t(g.rh) * g.stride, xp + g.padded + 16, ident);
    }
    // Down the columns, flat over the H body rows (the slack past the image holds the identity).
    const int taps_y = 2 * g.rh + 1, taps_x = 2 * g.rw + 1;
    for (int64_t i = 0; i < g.body; i += 8) {
      __m256 m = _mm256_loadu_ps(xp + i);
      for (int dy = 1; dy < taps_y; ++dy) m = combine(m, _mm256_loadu_ps(xp + i + int64_t(dy) * g.stride));
      _mm256_storeu_ps(vp + i, m);
    }
    // Along the rows, flat: output (yy, xx) lands at hp[yy * stride + xx].
    for (int64_t i = 0; i < g.body; i += 8) {
      __m256 m = _mm256_loadu_ps(vp + i);
      for (int dx = 1; dx < taps_x; ++dx) m = combine(m, _mm256_loadu_ps(vp + i + dx));
      _mm256_storeu_ps(hp + i, m);
    }
    for (int yy = 0; yy < p.H; ++yy) {
      const float* src = hp + int64_t(yy) * g.stride;
      const float rinv = row_inv<kMax>(p, yy);
      for (int xx = 0; xx < p.W; xx += 8)
        store_out<kMax>(p, _mm256_loadu_ps(src + xx), rinv, cinv, yy, xx, pool_out_plane(p, t) + int64_t(yy) * p.W);
    }
  };
  par.run(int64_t(p.N) * p.C, task);
}

// Direct form for rows too wide for the stack buffer.
void maxpool_direct(const Pool2dParams& p, Parallel& par) {
  const int64_t in_plane = int64_t(p.H) * p.W;
  auto task = [&](int64_t t, int) {
    const float* x = p.x + t * in_plane;
    float* y = pool_out_plane(p, t);
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
  const int64_t in_plane = int64_t(p.H) * p.W;
  auto task = [&](int64_t t, int) {
    const int c = int(t % p.C);
    const float* x = p.x + t * in_plane;
    float* y = pool_out_plane(p, t);
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
            float v = xr[ix];
            if (p.in_scale) {
              v = std::fma(v, p.in_scale[c], p.in_shift[c]);
              if (p.in_relu) v = std::max(v, 0.0f);  // NaN stays NaN
            }
            s += v;
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
  if (pool3x3_s1(p)) return size_t(pool3x3_geometry(p).floats);
  return same_stride1(p) ? size_t(same_s1_geometry(p).scratch()) : 0;
}

template <bool kMax>
static void run_pool2d(const Pool2dParams& p, Parallel& par) {
  // The same-window stride-1 paths take no input affine.
  const bool scratch = !p.in_scale && par.scratch_floats() >= pool2d_scratch_floats(p);
  // The conv kernels' instruction set choice (gemm_set_isa) picks the pooling path too. Rows
  // wider than 128 stay on the row-buffer path: there the pool waits on memory, and reading the
  // image a row at a time streams better than the AVX-512 path's rows side by side, even with
  // its prefetches (VGG16's 224-wide planes: 1.23x the time; 112-wide ones 0.73-0.97x).
  const bool stride2 = gemm_uses_avx512() && p.W <= 128 && pool_detail::stride2_fits(p);
  if (pool3x3_s1(p) && scratch) run_pool3x3_s1<kMax>(p, par);
  else if (same_stride1(p) && scratch) run_pool_same_s1<kMax>(p, par);
  else if (stride2 && run_pool_stride2<kMax>(p, par)) return;
  else if (buffered(p)) run_pool<kMax>(p, par);
  else if (kMax) maxpool_direct(p, par);
  else avgpool_direct(p, par);
}

void run_maxpool2d(const Pool2dParams& p, Parallel& par) { run_pool2d<true>(p, par); }
void run_avgpool2d(const Pool2dParams& p, Parallel& par) { run_pool2d<false>(p, par); }

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
