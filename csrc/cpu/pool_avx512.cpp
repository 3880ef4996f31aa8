// Stride-2 pooling with AVX-512F (see pool_detail.h). Each group of 16 outputs reads 32 input
// columns of the window's rows (and, for 3-column windows, the next group's first): combined down
// the rows in registers, split into even and odd columns by two-source permutes, the third tap
// being the even columns shifted by a lane. The AVX2 path needs a shuffle and a lane permute per
// tap, and a row buffer in memory. Max pools take the plain vector max and only probe for NaN (a
// sum of what they load), so a tap costs one instruction instead of five; a plane whose probe
// turns NaN is pooled again by the NaN-keeping kernel. The build targets AVX2, so these functions
// carry their own target attribute and run only after a run-time CPU check.
//
// Measured on Zen 4 (one thread, standalone, against the AVX2 path): 0.50-0.66x the time on
// GoogLeNet's and Inception v3's pools. Slower variants tried: a row buffer in memory between
// the passes (1.8-2.9x the time of this one; perf put the stalls on loads of what the row pass
// had just stored), and every vector loaded under its lane mask, the ones wholly outside the
// row too (2x).
#include <immintrin.h>

#include <algorithm>
#include <limits>

#include "cpu/pool_detail.h"

#define CBIR_AVX512 __attribute__((target("avx512f")))

namespace cbir::cpu::pool_detail {
namespace {

constexpr int kMaxRows = 3;  // window rows
// The rows the windows this many output rows on start to read are prefetched: rows read side by
// side, vector by vector, did not stream from memory (GoogLeNet's first pool at batch 8 took
// 1.28x the AVX2 path's time without; 0.97x with).
constexpr int kAhead = 2;

template <bool kMax>
CBIR_AVX512 inline __m512 combine(__m512 a, __m512 b) {
  return kMax ? _mm512_max_ps(a, b) : _mm512_add_ps(a, b);
}

// Lanes of the 16 columns from c that lie in a row of w columns, without branches.
inline __mmask16 lanes_inside(int c, int w) {
  const int lo = std::clamp(-c, 0, 16), hi = std::clamp(w - c, 0, 16);
  return __mmask16(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

// The input rows under a row of windows (at most 3).
struct WindowRows {
  const float* r0 = nullptr;
  const float* r1 = nullptr;
  const float* r2 = nullptr;
  int n = 0;
};

// The input affine of an average pool's plane (Pool2dParams::in_scale); off for max pools.
struct InputAffine {
  bool on = false, relu = false;
  __m512 scale, shift;
};

// Input columns [c, c + 16) of row r: the identity in the lanes not in `lanes` (outside the row),
// the affine applied to the others.
CBIR_AVX512 inline __m512 load(const float* r, int c, bool whole, __mmask16 lanes, __m512 identv,
                               const InputAffine& af) {
  __m512 v = whole ? _mm512_loadu_ps(r + c) : _mm512_mask_loadu_ps(identv, lanes, r + c);
  if (!af.on) return v;
  v = _mm512_fmadd_ps(v, af.scale, af.shift);
  if (af.relu) v = _mm512_max_ps(_mm512_setzero_ps(), v);  // the data second: NaN stays
  return whole ? v : _mm512_mask_mov_ps(identv, lanes, v);
}

// Input columns [c, c + 16) of the window's rows combined: the identity outside the row (lanes
// not in `lanes`). Max pools add the rows' sum to *probe, one add on its dependency chain.
template <bool kMax>
CBIR_AVX512 inline __m512 column(const WindowRows& rows, int c, __mmask16 lanes, __m512 identv,
                                 const InputAffine& af, __m512* probe) {
  if (lanes == 0 || rows.n == 0) return identv;
  const bool whole = lanes == 0xffff;
  __m512 v = load(rows.r0, c, whole, lanes, identv, af);
  __m512 sum = v;
  if (rows.n > 1) {
    const __m512 w = load(rows.r1, c, whole, lanes, identv, af);
    if (kMax) sum = _mm512_add_ps(sum, w);
    v = combine<kMax>(v, w);
  }
  if (rows.n > 2) {
    const __m512 w = load(rows.r2, c, whole, lanes, identv, af);
    if (kMax) sum = _mm512_add_ps(sum, w);
    v = combine<kMax>(v, w);
  }
  if (kMax) *probe = _mm512_add_ps(*probe, sum);
  return v;
}

// The 32 input columns from c, combined down the rows and split into even (*e) and odd (*o).
template <bool kMax>
CBIR_AVX512 inline void split(const WindowRows& rows, int c, int w, __m512 identv, const InputAffine& af,
                              __m512* probe_lo, __m512* probe_hi, __m512* e, __m512* o) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const __m512 lo = column<kMax>(rows, c, lanes_inside(c, w), identv, af, probe_lo);
  const __m512 hi = column<kMax>(rows, c + 16, lanes_inside(c + 16, w), identv, af, probe_hi);
  *e = _mm512_permutex2var_ps(lo, even, hi);
  *o = _mm512_permutex2var_ps(lo, odd, hi);
}

template <bool kMax, int KW>
CBIR_AVX512 bool plane(const Pool2dParams& p, int64_t t, const float* factors) {
  const float ident = kMax ? -std::numeric_limits<float>::infinity() : 0.0f;
  const __m512 identv = _mm512_set1_ps(ident);
  const float* x = p.x + t * int64_t(p.H) * p.W;
  float* y = pool_out_plane(p, t);
  const int row_floats = stride2_row_floats(p);
  InputAffine af;
  if (!kMax && p.in_scale) {
    const int64_t c = t % p.C;
    af.on = true, af.relu = p.in_relu;
    af.scale = _mm512_set1_ps(p.in_scale[c]), af.shift = _mm512_set1_ps(p.in_shift[c]);
  }
  // Max pools: a sum of every input vector read turns NaN if any holds one (infinities of both
  // signs may raise a false alarm; the caller then takes the exact path).
  __m512 probe_lo = _mm512_setzero_ps(), probe_hi = _mm512_setzero_ps();
  for (int oy = 0; oy < p.OH; ++oy) {
    WindowRows rows;
    for (int ky = 0; ky < p.KH; ++ky) {
      const int iy = oy * p.SH - p.PT + ky * p.DH;
      if (iy < 0 || iy >= p.H) continue;
      const float* r = x + int64_t(iy) * p.W;
      (rows.n == 0 ? rows.r0 : rows.n == 1 ? rows.r1 : rows.r2) = r;
      ++rows.n;
    }
    // The rows the windows kAhead output rows on start to read, into L1.
    if (oy + kAhead < p.OH) {
      const int top = (oy + kAhead) * p.SH - p.PT + (p.KH - 1) * p.DH;  // their last row
      const int from = std::max(0, top - p.SH + 1), to = std::min(p.H, top + 1);
      if (from < to) {
        const char* a = reinterpret_cast<const char*>(x + int64_t(from) * p.W);
        const char* end = reinterpret_cast<const char*>(x + int64_t(to) * p.W);
        for (; a < end; a += 64) _mm_prefetch(a, _MM_HINT_T0);
      }
    }
    float* yr = y + int64_t(oy) * p.OW;
    const float* f = factors ? factors + int64_t(oy) * row_floats : nullptr;
    __m512 e, o;
    split<kMax>(rows, -p.PL, p.W, identv, af, &probe_lo, &probe_hi, &e, &o);
    for (int ox = 0; ox < p.OW; ox += 16) {
      __m512 m = combine<kMax>(e, o);
      if (KW == 3) {
        __m512 e_next, o_next;
        split<kMax>(rows, 2 * (ox + 16) - p.PL, p.W, identv, af, &probe_lo, &probe_hi, &e_next, &o_next);
        // Lanes 1..15 of e, then lane 0 of the next group's: the even columns two floats on.
        const __m512 e2 = _mm512_castsi512_ps(
            _mm512_alignr_epi32(_mm512_castps_si512(e_next), _mm512_castps_si512(e), 1));
        m = combine<kMax>(m, e2);
        e = e_next, o = o_next;
      } else if (ox + 16 < p.OW) {
        split<kMax>(rows, 2 * (ox + 16) - p.PL, p.W, identv, af, &probe_lo, &probe_hi, &e, &o);
      }
      if (!kMax) m = _mm512_mul_ps(m, _mm512_loadu_ps(f + ox));
      if (ox + 16 <= p.OW) _mm512_storeu_ps(yr + ox, m);
      else _mm512_mask_storeu_ps(yr + ox, __mmask16((1u << (p.OW - ox)) - 1u), m);
    }
  }
  const __m512 probe = _mm512_add_ps(probe_lo, probe_hi);
  return !kMax || _mm512_cmp_ps_mask(probe, probe, _CMP_UNORD_Q) == 0;
}

}  // namespace

bool stride2_fits(const Pool2dParams& p) {
  return p.SW == 2 && p.DW == 1 && (p.KW == 2 || p.KW == 3) && p.KH >= 1 && p.KH <= kMaxRows && p.PL <= 2 &&
         p.W >= 1 && p.OW >= 1 && p.OH >= 1;
}

bool stride2_plane_avx512(bool is_max, const Pool2dParams& p, int64_t t, const float* factors) {
  if (is_max) return p.KW == 3 ? plane<true, 3>(p, t, nullptr) : plane<true, 2>(p, t, nullptr);
  return p.KW == 3 ? plane<false, 3>(p, t, factors) : plane<false, 2>(p, t, factors);
}

}  // namespace cbir::cpu::pool_detail
