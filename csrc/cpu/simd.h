// AVX2 helpers shared by the CPU kernels. Max/min keep NaN the way torch does: a NaN input gives a
// NaN output (MAXPS returns its second operand when either is NaN, so the data goes second).
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace cbir::cpu::simd {

inline __m256 relu(__m256 v) { return _mm256_max_ps(_mm256_setzero_ps(), v); }
inline __m256 clip(__m256 v, __m256 lo, __m256 hi) {
  return _mm256_min_ps(hi, _mm256_max_ps(lo, v));
}
inline float relu(float v) { return v < 0.0f ? 0.0f : v; }  // NaN < 0 is false: NaN stays
inline float clip(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// exp(x) to about 2 ulp on [-88, 88] (Cephes polynomial); NaN in gives NaN out.
inline __m256 exp(__m256 x) {
  const __m256 nan_mask = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.3762626647949f));
  __m256 fx = _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  xc = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), xc);
  xc = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), xc);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, xc, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, xc, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, xc, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, xc, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, xc, _mm256_set1_ps(5.0000001201e-1f));
  __m256 x2 = _mm256_mul_ps(xc, xc);
  y = _mm256_fmadd_ps(y, x2, _mm256_add_ps(xc, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_cvttps_epi32(fx);
  n = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
  __m256 r = _mm256_mul_ps(y, _mm256_castsi256_ps(n));
  // Below the clamp the true value underflows to zero.
  r = _mm256_blendv_ps(r, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ));
  // Above it, overflow to +inf.
  r = _mm256_blendv_ps(r, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(88.3762626647949f), _CMP_GT_OQ));
  return _mm256_blendv_ps(r, x, nan_mask);
}

inline __m256 sigmoid(__m256 v) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 e = exp(_mm256_sub_ps(_mm256_setzero_ps(), v));
  return _mm256_div_ps(one, _mm256_add_ps(one, e));
}
inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// Loads the first n (< 8) floats, zero elsewhere; stores the first n.
inline __m256i tail_mask(int n) {
  alignas(32) static const int32_t m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 8 - n));
}

// r[lane] holds 4 values of one lane; afterwards out[k][lane] = r[lane][k].
inline void transpose8x4(const __m128 r[8], __m256 out[4]) {
  const __m256 a = _mm256_insertf128_ps(_mm256_castps128_ps256(r[0]), r[4], 1);
  const __m256 b = _mm256_insertf128_ps(_mm256_castps128_ps256(r[1]), r[5], 1);
  const __m256 c = _mm256_insertf128_ps(_mm256_castps128_ps256(r[2]), r[6], 1);
  const __m256 d = _mm256_insertf128_ps(_mm256_castps128_ps256(r[3]), r[7], 1);
  const __m256 ab0 = _mm256_unpacklo_ps(a, b), ab1 = _mm256_unpackhi_ps(a, b);
  const __m256 cd0 = _mm256_unpacklo_ps(c, d), cd1 = _mm256_unpackhi_ps(c, d);
  out[0] = _mm256_shuffle_ps(ab0, cd0, 0x44);
  out[1] = _mm256_shuffle_ps(ab0, cd0, 0xEE);
  out[2] = _mm256_shuffle_ps(ab1, cd1, 0x44);
  out[3] = _mm256_shuffle_ps(ab1, cd1, 0xEE);
}

// Lanes [lo, hi) set (empty when hi <= lo).
inline __m256i range_mask(int lo, int hi) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i ge_lo = _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(lo - 1));
  const __m256i lt_hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), lane);
  return _mm256_and_si256(ge_lo, lt_hi);
}

}  // namespace cbir::cpu::simd
