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

CBIR_AVX512 int64_t scan1(const uint64_t* codes, int64_t count, const uint64_t* q, const int32_t* bound,
                          BucketHit hit, void* ctx) {
  const __m512i qv = _mm512_set1_epi64(int64_t(q[0]));
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m512i d = _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(codes + i), qv));
    const __mmask8 pass = _mm512_cmple_epi64_mask(d, _mm512_set1_epi64(*bound));
    if (__builtin_expect(pass != 0, 0)) {
      alignas(64) uint64_t lanes[8];
      _mm512_store_si512(lanes, d);
      report(i, pass, lanes, hit, ctx, bound);
    }
  }
  return i;
}

CBIR_AVX512 int64_t scan2(const uint64_t* codes, int64_t count, const uint64_t* q, const int32_t* bound,
                          BucketHit hit, void* ctx) {
  // Two codes per 128 bits: popcount both words, then add each code's pair of lanes.
  const __m512i qv = _mm512_setr_epi64(int64_t(q[0]), int64_t(q[1]), int64_t(q[0]), int64_t(q[1]),
                                       int64_t(q[0]), int64_t(q[1]), int64_t(q[0]), int64_t(q[1]));
  const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
  const __m512i odd = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m512i p0 = _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(codes + 2 * i), qv));
    const __m512i p1 = _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(codes + 2 * i + 8), qv));
    const __m512i d = _mm512_add_epi64(_mm512_permutex2var_epi64(p0, even, p1), _mm512_permutex2var_epi64(p0, odd, p1));
    const __mmask8 pass = _mm512_cmple_epi64_mask(d, _mm512_set1_epi64(*bound));
    if (__builtin_expect(pass != 0, 0)) {
      alignas(64) uint64_t lanes[8];
      _mm512_store_si512(lanes, d);
      report(i, pass, lanes, hit, ctx, bound);
    }
  }
  return i;
}

}  // namespace

void scan_bucket_avx512(const uint64_t* codes, int64_t count, const uint64_t* q, int words, const int32_t* bound,
                        BucketHit hit, void* ctx) {
  int64_t done = 0;
  if (words == 1) done = scan1(codes, count, q, bound, hit, ctx);
  else if (words == 2) done = scan2(codes, count, q, bound, hit, ctx);
  if (done >= count) return;
  // The tail (and other widths) the plain way; entries keep their bucket numbering.
  struct Shift {
    BucketHit hit;
    void* ctx;
    int64_t offset;
  } shift{hit, ctx, done};
  scan_bucket_scalar(codes + done * words, count - done, q, words, bound,
                     [](void* c, int64_t entry, int32_t d) {
                       auto* s = static_cast<Shift*>(c);
                       s->hit(s->ctx, entry + s->offset, d);
                     },
                     &shift);
}

}  // namespace cbir::cpu::mih_detail
