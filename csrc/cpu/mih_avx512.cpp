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

// Byte permutes that spread 8 remainders of 1..7 bytes into 64-bit lanes, and the bytes each keeps.
struct SpreadTable {
  alignas(64) uint8_t index[64];
  uint64_t keep;
};
struct SpreadTables {
  SpreadTable t[8] = {};
  SpreadTables() {
    for (int stride = 1; stride < 8; ++stride)
      for (int lane = 0; lane < 8; ++lane)
        for (int b = 0; b < 8; ++b) {
          t[stride].index[lane * 8 + b] = uint8_t(b < stride ? lane * stride + b : 0);
          if (b < stride) t[stride].keep |= uint64_t(1) << (lane * 8 + b);
        }
  }
  const SpreadTable& operator[](int stride) const { return t[stride]; }
};
const SpreadTables kSpread;

__attribute__((target("avx512f,avx512bw,avx512vbmi,avx512vpopcntdq"))) void scan_rest8(
    const uint8_t* rest, int64_t count, int stride, uint64_t q_rest, int32_t base, const int32_t* bound,
    BucketHit hit, void* ctx) {
  // One 64-byte load holds 8 remainders of `stride` bytes; a byte permute spreads them into the
  // 8 64-bit lanes (bytes past the stride zeroed), then XOR and popcount as for whole codes.
  const SpreadTable& t = kSpread[stride];
  const __m512i spread = _mm512_load_si512(t.index);
  const uint64_t keep = t.keep;
  const __m512i qv = _mm512_set1_epi64(int64_t(q_rest));
  const __m512i basev = _mm512_set1_epi64(base);
  const int64_t step = int64_t(8) * stride;
  for (int64_t i = 0; i < count; i += 8) {
    const __mmask8 valid = count - i >= 8 ? __mmask8(0xff) : __mmask8((1u << (count - i)) - 1);
    const __m512i raw = _mm512_loadu_si512(rest + (i / 8) * step);
    const __m512i x = _mm512_maskz_permutexvar_epi8(__mmask64(keep), spread, raw);
    const __m512i d = _mm512_add_epi64(_mm512_popcnt_epi64(_mm512_xor_si512(x, qv)), basev);
    const __mmask8 pass = _mm512_mask_cmple_epi64_mask(valid, d, _mm512_set1_epi64(*bound));
    if (__builtin_expect(pass != 0, 0)) {
      alignas(64) uint64_t lanes[8];
      _mm512_store_si512(lanes, d);
      report(i, pass, lanes, hit, ctx, bound);
    }
  }
}

}  // namespace

void scan_rest_avx512(const uint8_t* rest, int64_t count, int stride, uint64_t q_rest, int32_t base,
                      const int32_t* bound, BucketHit hit, void* ctx) {
  scan_rest8(rest, count, stride, q_rest, base, bound, hit, ctx);
}

bool cpu_has_avx512_vbmi() {
  static const bool has = __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bw");
  return has;
}

void scan_bucket_avx512(const uint64_t* codes, int64_t count, const uint64_t* q, int words, const int32_t* bound,
                        BucketHit hit, void* ctx) {
  if (words == 1) scan1(codes, count, q, bound, hit, ctx);
  else if (words == 2) scan2(codes, count, q, bound, hit, ctx);
  else scan_bucket_scalar(codes, count, q, words, bound, hit, ctx);
}

}  // namespace cbir::cpu::mih_detail
