// The direct conv tile with AVX-512F: a pixel's 16 output channels are one zmm, and each input
// value is broadcast straight from memory into the FMA ({1to16}): a (tap, channel) step is one
// weight load and one fused broadcast-FMA per pixel, a third of the AVX2 tile's instructions at
// the same FMA peak. Same arithmetic order as the AVX2 tile, so both give the same sums up to the
// order of the odd/even channel split. Reached only after the run-time CPU check (gemm_isa()).
#include <immintrin.h>

#include <algorithm>

#include "cpu/direct_conv.h"

// For the whole file, lambdas included (they do not inherit a function's target attribute); the
// headers above stay compiled for the build's AVX2 target.
#pragma GCC push_options
#pragma GCC target("avx512f")

#include "cpu/direct_steps.h"  // after the pragma: the walk inlines into the AVX-512 tiles

namespace cbir::cpu::direct_detail {
namespace {

constexpr int CB = kDirectCoutBlock;
static_assert(CB == 16, "one zmm per pixel");

template <int MR, int SW_T>
void tile(const float* x, int sw, int64_t cs, const int32_t* taps, int C, const float* w, int64_t s0,
                      int64_t s1, bool accumulate, float out[kDirectMaxPixels][CB]) {
  // Named accumulators, as in the AVX2 tile (GCC keeps arrays of vectors in memory here). Tiles of
  // at most 3 pixels add a second set for odd channels: at least 4 chains cover the FMA latency.
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, b0 = a0, b1 = a0, b2 = a0;
  if (accumulate) {
    a0 = _mm512_loadu_ps(out[0]);
    if constexpr (MR > 1) a1 = _mm512_loadu_ps(out[1]);
    if constexpr (MR > 2) a2 = _mm512_loadu_ps(out[2]);
    if constexpr (MR > 3) a3 = _mm512_loadu_ps(out[3]);
    if constexpr (MR > 4) a4 = _mm512_loadu_ps(out[4]);
    if constexpr (MR > 5) a5 = _mm512_loadu_ps(out[5]);
  }
  const int64_t step = (SW_T > 0 ? SW_T : sw) * cs;  // floats between the tile's pixels
  auto fma_step = [&](const float* xt, const float* wt) {
    const __m512 wv = _mm512_loadu_ps(wt);
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(xt[0]), wv, a0);
    if constexpr (MR > 1) a1 = _mm512_fmadd_ps(_mm512_set1_ps(xt[step]), wv, a1);
    if constexpr (MR > 2) a2 = _mm512_fmadd_ps(_mm512_set1_ps(xt[2 * step]), wv, a2);
    if constexpr (MR > 3) a3 = _mm512_fmadd_ps(_mm512_set1_ps(xt[3 * step]), wv, a3);
    if constexpr (MR > 4) a4 = _mm512_fmadd_ps(_mm512_set1_ps(xt[4 * step]), wv, a4);
    if constexpr (MR > 5) a5 = _mm512_fmadd_ps(_mm512_set1_ps(xt[5 * step]), wv, a5);
  };
  auto fma_odd = [&](const float* xt, const float* wt) {
    const __m512 wv = _mm512_loadu_ps(wt);
    b0 = _mm512_fmadd_ps(_mm512_set1_ps(xt[0]), wv, b0);
    if constexpr (MR > 1) b1 = _mm512_fmadd_ps(_mm512_set1_ps(xt[step]), wv, b1);
    if constexpr (MR > 2) b2 = _mm512_fmadd_ps(_mm512_set1_ps(xt[2 * step]), wv, b2);
  };
  w += s0 * CB;
  for_each_tap_run(x, taps, C, s0, s1, [&](const float* xt, int c, int end) {
    if constexpr (MR <= 3) {
      for (; c + 2 <= end; c += 2, w += 2 * CB) fma_step(xt + c, w), fma_odd(xt + c + 1, w + CB);
    }
    for (; c < end; ++c, w += CB) fma_step(xt + c, w);
  });
  if constexpr (MR <= 3) a0 = _mm512_add_ps(a0, b0), a1 = _mm512_add_ps(a1, b1), a2 = _mm512_add_ps(a2, b2);
  _mm512_storeu_ps(out[0], a0);
  if constexpr (MR > 1) _mm512_storeu_ps(out[1], a1);
  if constexpr (MR > 2) _mm512_storeu_ps(out[2], a2);
  if constexpr (MR > 3) _mm512_storeu_ps(out[3], a3);
  if constexpr (MR > 4) _mm512_storeu_ps(out[4], a4);
  if constexpr (MR > 5) _mm512_storeu_ps(out[5], a5);
}

// Two blocks of 16 output channels at once (blocks `wnext` floats apart in the packed weights):
// each broadcast input value feeds two FMAs, so a step is 2 weight loads and MR broadcasts for
// 2 x MR FMAs. With one block, a tile of 3 or 4 pixels (7- and 8-wide output rows) spends about
// as many load slots as FMAs, and the loads, not the FMAs, set the pace. No odd-channel split:
// 2 x MR chains cover the FMA latency, so for MR <= 3 the sums' order differs from the AVX2 tile's.
template <int MR, int SW_T>
void tile2(const float* x, int sw, int64_t cs, const int32_t* taps, int C, const float* w, int64_t wnext,
           int64_t s0, int64_t s1, bool accumulate, float out[kDirectMaxPixels][CB],
           float out2[kDirectMaxPixels][CB]) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
  __m512 c0 = a0, c1 = a0, c2 = a0, c3 = a0, c4 = a0, c5 = a0;
  if (accumulate) {
    a0 = _mm512_loadu_ps(out[0]), c0 = _mm512_loadu_ps(out2[0]);
    if constexpr (MR > 1) a1 = _mm512_loadu_ps(out[1]), c1 = _mm512_loadu_ps(out2[1]);
    if constexpr (MR > 2) a2 = _mm512_loadu_ps(out[2]), c2 = _mm512_loadu_ps(out2[2]);
    if constexpr (MR > 3) a3 = _mm512_loadu_ps(out[3]), c3 = _mm512_loadu_ps(out2[3]);
    if constexpr (MR > 4) a4 = _mm512_loadu_ps(out[4]), c4 = _mm512_loadu_ps(out2[4]);
    if constexpr (MR > 5) a5 = _mm512_loadu_ps(out[5]), c5 = _mm512_loadu_ps(out2[5]);
  }
  const int64_t step = (SW_T > 0 ? SW_T : sw) * cs;
  auto pixel = [](const float* xp, __m512 w0, __m512 w1, __m512& acc0, __m512& acc1) {
    const __m512 xb = _mm512_set1_ps(*xp);
    acc0 = _mm512_fmadd_ps(xb, w0, acc0), acc1 = _mm512_fmadd_ps(xb, w1, acc1);
  };
  w += s0 * CB;
  for_each_tap_run(x, taps, C, s0, s1, [&](const float* xt, int c, int end) {
    for (; c < end; ++c, w += CB) {
      const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + wnext);
      const float* xc = xt + c;
      pixel(xc, w0, w1, a0, c0);
      if constexpr (MR > 1) pixel(xc + step, w0, w1, a1, c1);
      if constexpr (MR > 2) pixel(xc + 2 * step, w0, w1, a2, c2);
      if constexpr (MR > 3) pixel(xc + 3 * step, w0, w1, a3, c3);
      if constexpr (MR > 4) pixel(xc + 4 * step, w0, w1, a4, c4);
      if constexpr (MR > 5) pixel(xc + 5 * step, w0, w1, a5, c5);
    }
  });
  _mm512_storeu_ps(out[0], a0), _mm512_storeu_ps(out2[0], c0);
  if constexpr (MR > 1) _mm512_storeu_ps(out[1], a1), _mm512_storeu_ps(out2[1], c1);
  if constexpr (MR > 2) _mm512_storeu_ps(out[2], a2), _mm512_storeu_ps(out2[2], c2);
  if constexpr (MR > 3) _mm512_storeu_ps(out[3], a3), _mm512_storeu_ps(out2[3], c3);
  if constexpr (MR > 4) _mm512_storeu_ps(out[4], a4), _mm512_storeu_ps(out2[4], c4);
  if constexpr (MR > 5) _mm512_storeu_ps(out[5], a5), _mm512_storeu_ps(out2[5], c5);
}

template <int SW_T>
void dispatch2(int mr, const float* x, int sw, int64_t cs, const int32_t* taps, int C, const float* w,
               int64_t wnext, int64_t s0, int64_t s1, bool accumulate, float out[kDirectMaxPixels][CB],
               float out2[kDirectMaxPixels][CB]) {
  switch (mr) {
    case 1: tile2<1, SW_T>(x, sw, cs, taps, C, w, wnext, s0, s1, accumulate, out, out2); break;
    case 2: tile2<2, SW_T>(x, sw, cs, taps, C, w, wnext, s0, s1, accumulate, out, out2); break;
    case 3: tile2<3, SW_T>(x, sw, cs, taps, C, w, wnext, s0, s1, accumulate, out, out2); break;
    case 4: tile2<4, SW_T>(x, sw, cs, taps, C, w, wnext, s0, s1, accumulate, out, out2); break;
    case 5: tile2<5, SW_T>(x, sw, cs, taps, C, w, wnext, s0, s1, accumulate, out, out2); break;
    default: tile2<6, SW_T>(x, sw, cs, taps, C, w, wnext, s0, s1, accumulate, out, out2); break;
  }
}

template <int SW_T>
void dispatch(int mr, const float* x, int sw, int64_t cs, const int32_t* taps, int C, const float* w,
                          int64_t s0, int64_t s1, bool accumulate, float out[kDirectMaxPixels][CB]) {
  switch (mr) {
    case 1: tile<1, SW_T>(x, sw, cs, taps, C, w, s0, s1, accumulate, out); break;
    case 2: tile<2, SW_T>(x, sw, cs, taps, C, w, s0, s1, accumulate, out); break;
    case 3: tile<3, SW_T>(x, sw, cs, taps, C, w, s0, s1, accumulate, out); break;
    case 4: tile<4, SW_T>(x, sw, cs, taps, C, w, s0, s1, accumulate, out); break;
    case 5: tile<5, SW_T>(x, sw, cs, taps, C, w, s0, s1, accumulate, out); break;
    default: tile<6, SW_T>(x, sw, cs, taps, C, w, s0, s1, accumulate, out); break;
  }
}

}  // namespace

void run_tile_avx512(int mr, const float* x, int sw, int64_t cs, const int32_t* taps, int C, const float* w,
                     int64_t s0, int64_t s1, bool accumulate, float out[kDirectMaxPixels][kDirectCoutBlock]) {
  if (sw == 1) dispatch<1>(mr, x, 1, cs, taps, C, w, s0, s1, accumulate, out);
  else if (sw == 2) dispatch<2>(mr, x, 2, cs, taps, C, w, s0, s1, accumulate, out);
  else dispatch<0>(mr, x, sw, cs, taps, C, w, s0, s1, accumulate, out);
}

void run_tile2_avx512(int mr, const float* x, int sw, int64_t cs, const int32_t* taps, int C, const float* w,
                      int64_t wnext, int64_t s0, int64_t s1, bool accumulate,
                      float out[kDirectMaxPixels][kDirectCoutBlock], float out2[kDirectMaxPixels][kDirectCoutBlock]) {
  if (sw == 1) dispatch2<1>(mr, x, 1, cs, taps, C, w, wnext, s0, s1, accumulate, out, out2);
  else if (sw == 2) dispatch2<2>(mr, x, 2, cs, taps, C, w, wnext, s0, s1, accumulate, out, out2);
  else dispatch2<0>(mr, x, sw, cs, taps, C, w, wnext, s0, s1, accumulate, out, out2);
}

}  // namespace cbir::cpu::direct_detail

#pragma GCC pop_options
