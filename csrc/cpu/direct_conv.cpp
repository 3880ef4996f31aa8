#include "cpu/direct_conv.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu/direct_steps.h"
#include "cpu/simd.h"

namespace cbir::cpu {
namespace {

constexpr int CB = kDirectCoutBlock;
constexpr int kMaxPixels = kDirectMaxPixels;  // 12 accumulators + 2 weight vectors + 1 broadcast of 16 ymm

int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One pixel's pair of accumulators (its 16 output channels) += broadcast(x) * weights.
inline void fma_pixel(__m256& lo, __m256& hi, const float* x, __m256 w0, __m256 w1) {
  const __m256 b = _mm256_broadcast_ss(x);
  lo = _mm256_fmadd_ps(b, w0, lo), hi = _mm256_fmadd_ps(b, w1, hi);
}
inline void load_pair(__m256& lo, __m256& hi, const float* from) {
  lo = _mm256_loadu_ps(from), hi = _mm256_loadu_ps(from + 8);
}
inline void store_pair(__m256 lo, __m256 hi, float* to) { _mm256_storeu_ps(to, lo), _mm256_storeu_ps(to + 8, hi); }

// One tile: output channels [16 kb, 16 kb + 16) x MR pixels of one output row, over the NHWC
// copy of the input, for the steps [s0, s1) of the reduction (step s = tap s / C, channel s % C).
// `x` points at channel 0 of the input pixel under tap (0, 0) of the tile's first pixel; taps[t]
// is the offset of tap t; successive pixels are SW pixels apart (SW_T when known at compile
// time, else sw). The sums start from `out` when `accumulate`, else from zero.
template <int MR, int SW_T>
inline void tile(const float* x, int sw, int64_t cs, const int32_t* taps, int C, const float* w, int64_t s0,
                 int64_t s1, bool accumulate, float out[kMaxPixels][CB]) {
  // Named accumulators (not arrays): GCC keeps arrays of vectors in memory here.
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00,
         a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  // A second set for odd channels when the tile has few pixels, or the FMA latency (4 cycles a
  // chain) and not the FMA throughput would set the pace.
  __m256 b00 = a00, b01 = a00, b10 = a00, b11 = a00, b20 = a00, b21 = a00;
  if (accumulate) {
    load_pair(a00, a01, out[0]);
    if constexpr (MR > 1) load_pair(a10, a11, out[1]);
    if constexpr (MR > 2) load_pair(a20, a21, out[2]);
    if constexpr (MR > 3) load_pair(a30, a31, out[3]);
    if constexpr (MR > 4) load_pair(a40, a41, out[4]);
    if constexpr (MR > 5) load_pair(a50, a51, out[5]);
  }
  const int64_t step = (SW_T > 0 ? SW_T : sw) * cs;  // floats between the tile's pixels
  auto fma_step = [&](const float* xt, const float* wt) {
    const __m256 w0 = _mm256_loadu_ps(wt), w1 = _mm256_loadu_ps(wt + 8);
    fma_pixel(a00, a01, xt, w0, w1);
    if constexpr (MR > 1) fma_pixel(a10, a11, xt + step, w0, w1);
    if constexpr (MR > 2) fma_pixel(a20, a21, xt + 2 * step, w0, w1);
    if constexpr (MR > 3) fma_pixel(a30, a31, xt + 3 * step, w0, w1);
    if constexpr (MR > 4) fma_pixel(a40, a41, xt + 4 * step, w0, w1);
    if constexpr (MR > 5) fma_pixel(a50, a51, xt + 5 * step, w0, w1);
  };
  auto fma_odd = [&](const float* xt, const float* wt) {
    const __m256 w0 = _mm256_loadu_ps(wt), w1 = _mm256_loadu_ps(wt + 8);
    fma_pixel(b00, b01, xt, w0, w1);
    if constexpr (MR > 1) fma_pixel(b10, b11, xt + step, w0, w1);
    if constexpr (MR > 2) fma_pixel(b20, b21, xt + 2 * step, w0, w1);
  };
  // Channels are contiguous per pixel (the NHWC copy), so each pixel is one sequential stream.
  w += s0 * CB;
  direct_detail::for_each_tap_run(x, taps, C, s0, s1, [&](const float* xt, int c, int end) {
    if constexpr (MR <= 3) {
      for (; c + 2 <= end; c += 2, w += 2 * CB) fma_step(xt + c, w), fma_odd(xt + c + 1, w + CB);
    }
    for (; c < end; ++c, w += CB) fma_step(xt + c, w);
  });
  if constexpr (MR <= 3) {
    a00 = _mm256_add_ps(a00, b00), a01 = _mm256_add_ps(a01, b01);
    a10 = _mm256_add_ps(a10, b10), a11 = _mm256_add_ps(a11, b11);
    a20 = _mm256_add_ps(a20, b20), a21 = _mm256_add_ps(a21, b21);
  }
  store_pair(a00, a01, out[0]);
  if constexpr (MR > 1) store_pair(a10, a11, out[1]);
  if constexpr (MR > 2) store_pair(a20, a21, out[2]);
  if constexpr (MR > 3) store_pair(a30, a31, out[3]);
  if constexpr (MR > 4) store_pair(a40, a41, out[4]);
  if constexpr (MR > 5) store_pair(a50, a51, out[5]);
}

template <int SW_T>
void run_tile(int mr, const float* x, int sw, int64_t cs, const int32_t* taps, int C, const float* w, int64_t s0,
              int64_t s1, bool accumulate, float out[kMaxPixels][CB]) {
  switch (mr) {
    case 1: tile<1, SW_T>(x, sw, cs, taps, C, w, s0, s1, accumulate, out); break;
    case 2: tile<2, SW_T>(x, sw, cs, taps, C, w, s0, s1, accumulate, out); break;
    case 3: tile<3, SW_T>(x, sw, cs, taps, C, w, s0, s1, accumulate, out); break;
    case 4: tile<4, SW_T>(x, sw, cs, taps, C, w, s0, s1, accumulate, out); break;
    case 5: tile<5, SW_T>(x, sw, cs, taps, C, w, s0, s1, accumulate, out); break;
    default: tile<6, SW_T>(x, sw, cs, taps, C, w, s0, s1, accumulate, out); break;
  }
}

// r[j][k] -> r[k][j] for an 8 x 8 block.
inline void transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// The first n (<= 6) floats of v to dst, with plain stores (masked stores are slow on Zen).
inline void store_first(float* dst, __m256 v, int n) {
  __m128 a = _mm256_castps256_ps128(v);
  if (n >= 4) {
    _mm_storeu_ps(dst, a);
    a = _mm256_extractf128_ps(v, 1), dst += 4, n -= 4;
  }
  if (n >= 2) {
    _mm_storel_pi(reinterpret_cast<__m64*>(dst), a);
    a = _mm_movehl_ps(a, a), dst += 2, n -= 2;
  }
  if (n) _mm_store_ss(dst, a);
}

// Bias, residual and activation on the tile, written to y (channel rows `ohw` floats apart; the
// tile's pixels `pix_step` floats apart: 1, or the output width for a transposed layout).
void store_tile(const Conv2dParams& p, const float out[kMaxPixels][CB], int mr, int k0, int kn, int64_t pix,
                int64_t pix_step, int64_t ohw, float* y, const float* res) {
  if (pix_step == 1 && (p.act == Act::None || p.act == Act::Relu || p.act == Act::Clip)) {
    // Transposed in registers so that each channel's pixels, one run of its output row, take
    // vector ops (per element, this epilogue cost about an eighth of a 512 -> 2048 1x1 conv at 7x7).
    __m256 lo[8], hi[8];  // lo[k] / hi[k]: the tile's pixels of channel k / 8 + k
    for (int j = 0; j < 8; ++j) {
      lo[j] = j < mr ? _mm256_loadu_ps(out[j]) : _mm256_setzero_ps();
      hi[j] = j < mr ? _mm256_loadu_ps(out[j] + 8) : _mm256_setzero_ps();
    }
    transpose8x8(lo);
    if (kn > 8) transpose8x8(hi);
    const __m256i pixels = simd::tail_mask(mr);
    const __m256 a = _mm256_set1_ps(p.act_a), b = _mm256_set1_ps(p.act_b);
    for (int k = 0; k < kn; ++k) {
      const int64_t row = int64_t(k0 + k) * ohw + pix;
      __m256 v = _mm256_add_ps(k < 8 ? lo[k] : hi[k - 8], _mm256_set1_ps(p.bias ? p.bias[k0 + k] : 0.0f));
      if (res) v = _mm256_add_ps(v, _mm256_maskload_ps(res + row, pixels));
      if (p.act == Act::Relu) v = simd::relu(v);
      else if (p.act == Act::Clip) v = simd::clip(v, a, b);
      store_first(y + row, v, mr);
    }
    return;
  }
  for (int k = 0; k < kn; ++k) {
    float* row = y + int64_t(k0 + k) * ohw + pix;
    const float* rrow = res ? res + int64_t(k0 + k) * ohw + pix : nullptr;
    const float b = p.bias ? p.bias[k0 + k] : 0.0f;
    for (int j = 0; j < mr; ++j) {
      float v = out[j][k] + b;
      if (rrow) v += rrow[j * pix_step];
      switch (p.act) {
        case Act::None: break;
        case Act::Relu: v = simd::relu(v); break;
        case Act::Clip: v = simd::clip(v, p.act_a, p.act_b); break;
        default: apply_act(p.act, p.act_a, p.act_b, &v, 1); break;
      }
      row[j * pix_step] = v;
    }
  }
}

// The input the kernel reads, as an NHWC copy: every padded row and column the conv touches, or
// for an unpadded 1x1 conv only the pixels it samples (so a strided 1x1 conv copies a quarter).
struct Layout {
  bool sampled;  // 1x1 without padding: the copy holds OH x OW pixels, read at stride 1
  // A 1xK conv with left/right padding: the copy is the image transposed (copy row r = input
  // column r - PL, copy column = input row), so the padded taps become whole padded rows that
  // the kernel skips per output row, as it skips the top/bottom padding of a Kx1 conv.
  bool transposed;
  int rows, cols;
  int cs;  // floats per pixel: C rounded up to whole cache lines, and to an odd number of them,
           // so the tile's pixel streams fall in different L1 sets (at 2^k lines they share one)
};
Layout layout_of(const Conv2dParams& p) {
  int cs = (p.C + 15) / 16 * 16;
  if (cs / 16 % 2 == 0) cs += 16;
  if (p.C < 16) cs = p.C;  // the stem's 3 channels: padding would multiply the copy
  if (p.KH == 1 && p.KW == 1 && p.PT == 0 && p.PL == 0) return {true, false, p.OH, p.OW, cs};
  if (p.KH == 1 && p.KW > 1 && p.PT == 0 && p.OH == p.H && p.SH == 1 && p.SW == 1 && p.DW == 1 && p.C >= 16 &&
      (p.PL > 0 || p.OW + p.KW - 1 > p.W + p.PL))
    return {false, true, p.OW + p.KW - 1, p.H, cs};
  return {false, false, (p.OH - 1) * p.SH + (p.KH - 1) * p.DH + 1, (p.OW - 1) * p.SW + (p.KW - 1) * p.DW + 1,
          cs};
}

// Row r of the copy for batch entry n: pixels [0, cols) x channels [0, C), zero outside x; pixel j
// at dst + j * pix (pix = l.cs, or a transposed copy's row length).
void copy_row(const Conv2dParams& p, const Layout& l, int64_t n, int r, float* dst, int64_t pix) {
  const int64_t plane = int64_t(p.H) * p.W;
  const float* x = p.x + n * conv_x_batch_stride(p);
  const int iy = l.sampled ? r * p.SH : r - p.PT;
  const int step = l.sampled ? p.SW : 1, shift = l.sampled ? 0 : p.PL;
  if (iy < 0 || iy >= p.H) {
    for (int j = 0; j < l.cols; ++j) std::memset(dst + j * pix, 0, sizeof(float) * size_t(p.C));
    return;
  }
  const float* src = x + int64_t(iy) * p.W;
  constexpr int kPix = 8;  // pixels per block: each channel's read is one short run
  for (int c0 = 0; c0 < l.cols; c0 += kPix) {
    const int cn = std::min(kPix, l.cols - c0);
    int ix[kPix];
    bool inside[kPix], all_inside = cn == kPix;
    for (int j = 0; j < cn; ++j) {
      ix[j] = (c0 + j) * step - shift;
      inside[j] = ix[j] >= 0 && ix[j] < p.W;
      all_inside = all_inside && inside[j];
    }
    int c = 0;
    if (all_inside && step <= 2) {
      // 8 channels x 8 pixels at a time: load each channel's run (every other float at stride
      // 2), transpose in registers, store 8 pixels' channel runs.
      for (; c + 8 <= p.C; c += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) {
          const float* sc = src + (c + i) * plane + ix[0];
          if (step == 1) {
            r[i] = _mm256_loadu_ps(sc);
          } else {
            // Only floats [0, 15) are read: the last lies at ix[7] < W.
            const __m256 lo = _mm256_loadu_ps(sc);
            const __m256 hi = _mm256_castps128_ps256(_mm_loadu_ps(sc + 8));
            const __m256 hi2 = _mm256_insertf128_ps(hi, _mm_maskload_ps(sc + 12, _mm_setr_epi32(-1, -1, -1, 0)), 1);
            const __m256 even = _mm256_shuffle_ps(lo, hi2, _MM_SHUFFLE(2, 0, 2, 0));  // lo0 lo2 hi0 hi2 | ...
            r[i] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(even), _MM_SHUFFLE(3, 1, 2, 0)));
          }
        }
        transpose8x8(r);  // r[j]: pixel j's 8 channels
        float* d = dst + int64_t(c0) * pix + c;
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(d + int64_t(j) * pix, r[j]);
      }
    }
    for (; c < p.C; ++c) {
      const float* sc = src + c * plane;
      float* d = dst + int64_t(c0) * pix + c;
      for (int j = 0; j < cn; ++j) d[int64_t(j) * pix] = inside[j] ? sc[ix[j]] : 0.0f;
    }
  }
}

}  // namespace
size_t direct_conv_packed_weight_floats(int K, int C, int KH, int KW) {
  return size_t(ceil_div64(K, CB)) * CB * size_t(C) * KH * KW;
}

void pack_direct_conv_weight(const float* w, int K, int C, int KH, int KW, float* out) {
  const int64_t T = int64_t(KH) * KW, per_k = int64_t(C) * T;
  const int64_t blocks = ceil_div64(K, CB);
  for (int64_t kb = 0; kb < blocks; ++kb)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c)
        for (int k = 0; k < CB; ++k) {
          const int64_t ko = kb * CB + k;
          out[((kb * T + t) * C + c) * CB + k] = ko < K ? w[ko * per_k + c * T + t] : 0.0f;
        }
}

size_t direct_conv_workspace_floats(const Conv2dParams& p) {
  const Layout l = layout_of(p);
  return size_t(p.N) * size_t(l.cs) * size_t(l.rows) * size_t(l.cols);
}

void run_direct_conv2d(const Conv2dParams& p, float* workspace, Parallel& par) {
  const int T = p.KH * p.KW;
  const Layout l = layout_of(p);
  const int64_t row_floats = int64_t(l.cols) * l.cs, image_floats = row_floats * l.rows;
  if (l.transposed) {
    // Input row iy becomes copy column iy: each input row is copied as for an untransposed,
    // unpadded conv, its pixel ix landing on copy row PL + ix. The padding rows are never read
    // (their taps are skipped), but are zeroed all the same.
    Conv2dParams q = p;
    q.PL = 0, q.PT = 0;
    const Layout rows_of_x{false, false, p.H, p.W, l.cs};
    auto copy = [&](int64_t task, int) {
      const int64_t n = task / p.H;
      const int iy = int(task % p.H);
      float* img = workspace + n * image_floats;
      copy_row(q, rows_of_x, n, iy, img + int64_t(p.PL) * row_floats + int64_t(iy) * l.cs, row_floats);
      if (iy == 0)
        for (int r = 0; r < l.rows; ++r)
          if (r < p.PL || r >= p.PL + p.W) std::memset(img + r * row_floats, 0, sizeof(float) * size_t(row_floats));
    };
    par.run(int64_t(p.N) * p.H, copy);
  } else {
    auto copy = [&](int64_t task, int) {
      const int64_t n = task / l.rows;
      const int r = int(task % l.rows);
      copy_row(p, l, n, r, workspace + n * image_floats + r * row_floats, l.cs);
    };
    par.run(int64_t(p.N) * l.rows, copy);
  }
  const int sh = l.sampled || l.transposed ? 1 : p.SH, sw = l.sampled || l.transposed ? 1 : p.SW;
  // When pixels are exactly C floats apart and the taps of a kernel row are adjacent pixels, the
  // (tap, channel) steps of a kernel row are one run of KW x C floats, in the weights' order too:
  // the reduction becomes KH taps of KW x C "channels" (the stem's 3 channels x 7 columns: one
  // loop of 21, not 7 loops of 3).
  const bool merge_row = l.cs == p.C && p.DW == 1 && p.KW > 1 && !l.transposed;
  const int taps_n = merge_row ? p.KH : T, chans = merge_row ? p.KW * p.C : p.C;
  int32_t taps[64];
  std::vector<int32_t> many;
  int32_t* tap = taps;
  if (taps_n > 64) {
    many.resize(size_t(taps_n));
    tap = many.data();
  }
  for (int ky = 0; ky < p.KH; ++ky)
    for (int kx = 0; kx < (merge_row ? 1 : p.KW); ++kx)
      tap[ky * (merge_row ? 1 : p.KW) + kx] =
          l.transposed ? int32_t(int64_t(kx) * l.cols * l.cs)  // KH == 1: tap kx is copy row + kx
                       : int32_t((int64_t(ky) * p.DH * l.cols + int64_t(kx) * p.DW) * l.cs);

  // The sampled copy of a 1x1 conv is its output plane, pixel for pixel: one row of OH x OW
  // pixels, so tiles run on across output rows (a 7x7 plane is 8 full tiles and 1 pixel, not
  // 7 rows of 6 + 1).
  // A transposed copy's output rows are the output columns.
  const int out_rows = l.sampled ? 1 : (l.transposed ? p.OW : p.OH);
  const int out_cols = l.sampled ? p.OH * p.OW : (l.transposed ? p.OH : p.OW);
  const int blocks = int(ceil_div64(p.K, CB));
  // Rows per task: about 96 output pixels, so a task reuses its weight block many times.
  const int rows = std::max(1, std::min(out_rows, int(ceil_div64(96, out_cols))));
  const int chunks = int(ceil_div64(out_rows, rows));
  const int64_t ohw = int64_t(p.OH) * p.OW;
  const int64_t wblock = int64_t(p.C) * T * CB;
  // The reduction runs in slices of kSliceSteps (tap, channel) steps, every tile of the task
  // per slice, so the slice's weights (8 KiB) stay in L1 while the tiles reuse them; partial
  // sums wait in a per-task buffer between slices.
  constexpr int64_t kSliceSteps = 128;
  const int64_t steps = int64_t(taps_n) * chans;
  // Tiles of a row as even as possible (8 pixels: 4 + 4, not 6 + 2): a narrow tile has too few
  // independent accumulators to keep the FMA units busy.
  // Per output row, the reduction steps whose kernel row reads real input: taps that fall wholly
  // in the top or bottom padding are skipped, not multiplied by zeros (a 7x1 conv at 17x17 with
  // 3 rows of padding does 10% fewer FMAs). Valid kernel rows are one contiguous run.
  const int taps_per_ky = merge_row || l.transposed ? 1 : p.KW;
  auto valid_steps = [&](int oy) {
    int ky0 = 0, ky1 = p.KH;
    if (l.transposed) {  // kernel "rows" are the taps kx; output row oy is output column oy
      ky0 = std::max(0, p.PL - oy), ky1 = std::max(ky0, std::min(p.KW, p.W + p.PL - oy));
    } else if (!l.sampled) {
      while (ky0 < p.KH && oy * p.SH - p.PT + ky0 * p.DH < 0) ++ky0;
      while (ky1 > ky0 && oy * p.SH - p.PT + (ky1 - 1) * p.DH >= p.H) --ky1;
    }
    return std::pair<int64_t, int64_t>(int64_t(ky0) * taps_per_ky * chans, int64_t(ky1) * taps_per_ky * chans);
  };
  const int row_tiles = int(ceil_div64(out_cols, kMaxPixels));
  const int narrow = out_cols / row_tiles, wide_tiles = out_cols % row_tiles;
  // The tile's instruction set follows the GEMM's (gemm_isa(): AVX-512F where the CPU has it).
  const bool wide = gemm_uses_avx512();
  // With AVX-512, tiles of at most 4 pixels (rows up to 8 wide: 7x7 and 8x8 outputs) take two
  // blocks of output channels per task (run_tile2_avx512: each broadcast feeds two FMAs), where
  // that still leaves 4 tasks a thread. Measured (2 threads, A/B): a stride-2 512->512 3x3 conv
  // with 7x7 outputs (tiles of 4 + 3) 0.91x the time; with 5- and 6-pixel tiles (14-wide rows,
  // 1x1 convs at 7x7) 1.01-1.04x, so those keep one block; and 1.19x for a 64->96 5x5 conv at
  // 8x8, whose 6 blocks made 3 tasks for 2 threads.
  const int widest_tile = narrow + (wide_tiles > 0 ? 1 : 0);
  const bool pairs_keep_threads_busy = int64_t(p.N) * (blocks / 2) * chunks >= 4 * par.threads();
  const int per_task = wide && widest_tile <= 4 && pairs_keep_threads_busy ? 2 : 1;
  const int groups = int(ceil_div64(blocks, per_task));
  auto work = [&](int64_t task, int) {
    const int64_t n = task / (int64_t(groups) * chunks);
    const int kb = int(task / chunks % groups) * per_task, chunk = int(task % chunks);
    const int nb = std::min(per_task, blocks - kb);
    const float* w = p.w + kb * wblock;
    const float* xn = workspace + n * image_floats;
    float* yn = p.y + n * conv_y_batch_stride(p);
    const float* rn = p.residual ? p.residual + n * int64_t(p.K) * ohw : nullptr;
    const int k0 = kb * CB;
    const int oy0 = chunk * rows, oy1 = std::min(out_rows, (chunk + 1) * rows);
    thread_local std::vector<float> sums_store;
    const int task_tiles = (oy1 - oy0) * row_tiles;
    sums_store.resize(size_t(nb) * size_t(task_tiles) * kMaxPixels * CB);
    auto* sums = reinterpret_cast<float(*)[kMaxPixels][CB]>(sums_store.data());  // block kb, then kb + 1
    // Each weight is used by only this task's pixels (49 of them at 7x7), so the weights stream
    // from memory: the next slice is prefetched while this one runs, spread over the tiles.
    const int64_t lines_per_tile = ceil_div64(kSliceSteps * CB / 16, task_tiles);
    for (int64_t s0 = 0; s0 < steps; s0 += kSliceSteps) {
      const int64_t s1 = std::min(steps, s0 + kSliceSteps);
      const float* next = w + s1 * CB;
      const int64_t next_lines = (std::min(steps, s1 + kSliceSteps) - s1) * CB / 16;
      int tile_no = 0;
      for (int oy = oy0; oy < oy1; ++oy) {
        const float* xrow = xn + int64_t(oy) * sh * row_floats;
        const auto [v0, v1] = valid_steps(oy);
        for (int ti = 0; ti < row_tiles; ++ti, ++tile_no) {
          for (int64_t line = tile_no * lines_per_tile; line < std::min(next_lines, (tile_no + 1) * lines_per_tile);
               ++line) {
            _mm_prefetch(reinterpret_cast<const char*>(next + line * 16), _MM_HINT_T0);
            if (nb == 2) _mm_prefetch(reinterpret_cast<const char*>(next + wblock + line * 16), _MM_HINT_T0);
          }
          const int ox = ti * narrow + std::min(ti, wide_tiles), mr = narrow + (ti < wide_tiles ? 1 : 0);
          const float* x = xrow + int64_t(ox) * sw * l.cs;
          float(*out)[CB] = sums[(oy - oy0) * row_tiles + ti];
          float(*out2)[CB] = nb == 2 ? sums[task_tiles + (oy - oy0) * row_tiles + ti] : nullptr;
          // This slice's share of the row's valid steps; the first valid step starts the sums.
          const int64_t a0 = std::max(s0, v0), a1 = std::min(s1, v1);
          if (a0 < a1) {
            if (nb == 2)
              direct_detail::run_tile2_avx512(mr, x, sw, l.cs, tap, chans, w, wblock, a0, a1, a0 > v0, out, out2);
            else if (wide) direct_detail::run_tile_avx512(mr, x, sw, l.cs, tap, chans, w, a0, a1, a0 > v0, out);
            else if (sw == 1) run_tile<1>(mr, x, 1, l.cs, tap, chans, w, a0, a1, a0 > v0, out);
            else if (sw == 2) run_tile<2>(mr, x, 2, l.cs, tap, chans, w, a0, a1, a0 > v0, out);
            else run_tile<0>(mr, x, sw, l.cs, tap, chans, w, a0, a1, a0 > v0, out);
          }
          if (s1 == steps) {
            // A transposed copy's tile runs down an output column: its pixels are OW apart.
            const int64_t pix = l.transposed ? int64_t(ox) * p.OW + oy : int64_t(oy) * out_cols + ox;
            if (v0 >= v1) std::fill_n(&out[0][0], kMaxPixels * CB, 0.0f);  // the row sees only padding
            store_tile(p, out, mr, k0, std::min(CB, p.K - k0), pix, l.transposed ? p.OW : 1, ohw, yn, rn);
            if (nb == 2) {
              if (v0 >= v1) std::fill_n(&out2[0][0], kMaxPixels * CB, 0.0f);
              store_tile(p, out2, mr, k0 + CB, std::min(CB, p.K - k0 - CB), pix, l.transposed ? p.OW : 1, ohw, yn, rn);
            }
          }
        }
      }
    }
  };
  par.run(int64_t(p.N) * groups * chunks, work);
}

}  // namespace cbir::cpu
