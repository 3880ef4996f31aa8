// Bucket scans for multi-index hashing with AVX-512 VPOPCNTDQ: 8 codes per popcount. Called only
// after the runtime CPU check in mih.cpp; the build itself targets AVX2.
#include <immintrin.h>

#include <cstdint>

#include "cpu/mih.h"

#define CBIR_AVX512 __attribute__((target("avx512f,avx512vpopcntdq")))

namespace cbir::cpu::mih_detail {
namespace {

__attribute__((noinline)) void report(int64_t first, uint32_t mask, const uint64_t* distances, BucketHit hit,
                                      void* ctx, const int32_t* bound) {
  while (mask) {
    const int lane = __builtin_ctz(mask);
    mask &= mask - 1;
    if (int32_t(distances[lane]) <= *bound) hit(ctx, first + lane, int32_t(distances[lane]));
  }
}

CBIR_AVX512 void scan1(const uint64_t* codes, int64_t count, const uint64_t* q, const int32_t* bound,
                       BucketHit hit, void* ctx) {
  const __m512i qv = _mm512_set1_epi64(int64_t(q[0]));
  for (int64_t i = 0; i < count; i += 8) {
    // The last vector loads only the codes that exist (masked lanes read nothing).
    const __mmask8 valid = count - i >= 8 ? __mmask8(0xff) : __mmask8((1u << (count - i)) - 1);
    const __m512i x = _mm512_maskz_loadu_epi64(valid, codes + i);
    const __m512i d = _mm512_popcnt_epi64(_mm512_xor_si512(x, qv));
    const __mmask8 pass = _mm512_mask_cmple_epi64_mask(valid, d, _mm512_set1_epi64(*bound));
    if (__builtin_expect(pass != 0, 0)) {
      alignas(64) uint64_t lanes[8];
      _mm512_store_si512(lanes, d);
      report(i, pass, lanes, hit, ctx, bound);
    }
  }
}

CBIR_AVX512 void scan2(const uint64_t* codes, int64_t count, const uint64_t* q, const int32_t* bound,
                       BucketHit hit, void* ctx) {
  // Two codes per 128 bits: popcount both words, then add each code's pair of lanes.
  const __m512i qv = _mm512_setr_epi64(int64_t(q[0]), int64_t(q[1]), int64_t(q[0]), int64_t(q[1]),
                                       int64_t(q[0]), int64_t(q[1]), int64_t(q[0]), int64_t(q[1]));
  const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
  const __m512i odd = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t i = 0; i < count; i += 8) {
    const int64_t left = count - i;
    const __mmask8 valid = left >= 8 ? __mmask8(0xff) : __mmask8((1u << left) - 1);
    const __mmask8 lo = left >= 4 ? __mmask8(0xff) : __mmask8((1u << (2 * left)) - 1);
    const __mmask8 hi = left >= 8 ? __mmask8(0xff) : left <= 4 ? __mmask8(0) : __mmask8((1u << (2 * (left - 4))) - 1);
    const __m512i p0 = _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_maskz_loadu_epi64(lo, codes + 2 * i), qv));
    const __m512i p1 = _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_maskz_loadu_epi64(hi, codes + 2 * i + 8), qv));
    const __m512i d = _mm512_add_epi64(_mm512_permutex2var_epi64(p0, even, p1), _mm512_permutex2var_epi64(p0, odd, p1));
    const __mmask8 pass = _mm512_mask_cmple_epi64_mask(valid, d, _mm512_set1_epi64(*bound));
    if (__builtin_expect(pass != 0, 0)) {
      alignas(64) uint64_t lanes[8];
      _mm512_store_si512(lanes, d);
      report(i, pass, lanes, hit, ctx, bound);
    }
  }
}

CBIR_AVX512 int64_t split_survivors16(const uint32_t* head, int64_t count, uint32_t q_head, int32_t floor,
                                      int32_t bound, uint32_t first, uint32_t* out_entries, uint32_t* out_ones) {
  if (bound < floor) return 0;
  const __m512i qv = _mm512_set1_epi32(int32_t(q_head));
  const __m512i limit = _mm512_set1_epi32(bound - floor);
  const __m512i lanes = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(int32_t(first)));
  int64_t found = 0;
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 valid = count - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (count - i)) - 1);
    const __m512i ones = _mm512_popcnt_epi32(_mm512_xor_si512(_mm512_maskz_loadu_epi32(valid, head + i), qv));
    const __mmask16 pass = _mm512_mask_cmple_epu32_mask(valid, ones, limit);
    // No branch on `pass`: about one vector in six has a survivor (10M random 64-bit codes,
    // 16-bit substrings), too often to predict, and two stores a vector cost less than the
    // mispredictions did (1.08-1.17x per query). Compressed in registers: a compress straight to
    // memory is slow on Zen 4.
    const __m512i entries = _mm512_add_epi32(lanes, _mm512_set1_epi32(int32_t(i)));
    _mm512_storeu_si512(out_entries + found, _mm512_maskz_compress_epi32(pass, entries));
    _mm512_storeu_si512(out_ones + found, _mm512_maskz_compress_epi32(pass, ones));
    found += __builtin_popcount(pass);
  }
  return found;
}

}  // namespace

int64_t split_survivors_avx512(const uint32_t* head, int64_t count, uint32_t q_head, int32_t floor, int32_t bound,
                               uint32_t first, uint32_t* out_entries, uint32_t* out_ones) {
  return split_survivors16(head, count, q_head, floor, bound, first, out_entries, out_ones);
}

void scan_bucket_avx512(const uint64_t* codes, int64_t count, const uint64_t* q, int words, const int32_t* bound,
                        BucketHit hit, void* ctx) {
  if (words == 1) scan1(codes, count, q, bound, hit, ctx);
  else if (words == 2) scan2(codes, count, q, bound, hit, ctx);
  else scan_bucket_scalar(codes, count, q, words, bound, hit, ctx);
}

}  // namespace cbir::cpu::mih_detail
