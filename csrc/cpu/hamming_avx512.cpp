// The tile scan with AVX-512 VPOPCNTDQ: one popcount instruction counts 8 (or 16) codes' words.
// The build targets AVX2, so these functions carry their own target attribute and are only
// called after a runtime CPU check (hamming.cpp); nothing here has external linkage except the
// dispatch entry points, so no AVX-512 code can leak into other translation units.
#include <immintrin.h>

#include <cstdint>

#include "cpu/hamming.h"

#define CBIR_AVX512 __attribute__((target("avx512f,avx512vpopcntdq")))

namespace cbir::cpu::hamming_detail {
namespace {

// Slow path, out of line so the scan loop stays small: hands each flagged lane to the sink.
template <typename Lane>
__attribute__((noinline)) void report(const ScanArgs& a, int r, int64_t pos0, uint32_t mask,
                                      const Lane* distances) {
  while (mask) {
    const int lane = __builtin_ctz(mask);
    mask &= mask - 1;
    const int64_t pos = pos0 + lane;
    if (pos < a.end_pos) a.sink->take(r, pos, int32_t(distances[lane]));
  }
}

// 64-bit lanes, 8 codes per block. W > 0 fixes the words per code at compile time (unrolled);
// W == 0 reads it from the arguments.
template <int W, int R>
CBIR_AVX512 void scan64(const ScanArgs& a) {
  const int words = W > 0 ? W : a.words;
  const uint64_t* tile = static_cast<const uint64_t*>(a.tile);
  const uint64_t* q = a.query_words;
  for (int64_t b = 0; b < a.blocks; ++b) {
    const uint64_t* block = tile + b * words * 8;
    __m512i dist[R];
    {
      const __m512i x = _mm512_loadu_si512(block);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        dist[r] = _mm512_popcnt_epi64(_mm512_xor_si512(x, _mm512_set1_epi64(int64_t(q[r * words]))));
    }
#pragma GCC unroll 8
    for (int w = 1; w < words; ++w) {
      const __m512i x = _mm512_loadu_si512(block + w * 8);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        dist[r] = _mm512_add_epi64(
            dist[r], _mm512_popcnt_epi64(_mm512_xor_si512(x, _mm512_set1_epi64(int64_t(q[r * words + w])))));
    }
    __mmask8 pass[R];
    __mmask8 any = 0;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      // Signed compare: accept_max is -1 when nothing can enter any more.
      pass[r] = _mm512_cmple_epi64_mask(dist[r], _mm512_set1_epi64(a.accept_max[r]));
      any = __mmask8(any | pass[r]);
    }
    if (__builtin_expect(any != 0, 0)) {
      for (int r = 0; r < R; ++r) {
        if (!pass[r]) continue;
        alignas(64) uint64_t lanes[8];
        _mm512_store_si512(lanes, dist[r]);
        report(a, r, a.first_pos + b * 8, pass[r], lanes);
      }
    }
  }
}

// 32-bit lanes (codes of at most 32 bits), 16 codes per block, one word per code.
template <int R>
CBIR_AVX512 void scan32(const ScanArgs& a) {
  const uint32_t* tile = static_cast<const uint32_t*>(a.tile);
  const uint64_t* q = a.query_words;
  for (int64_t b = 0; b < a.blocks; ++b) {
    const __m512i x = _mm512_loadu_si512(tile + b * 16);
    __m512i dist[R];
    __mmask16 pass[R];
    __mmask16 any = 0;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      dist[r] = _mm512_popcnt_epi32(_mm512_xor_si512(x, _mm512_set1_epi32(int32_t(uint32_t(q[r])))));
      pass[r] = _mm512_cmple_epi32_mask(dist[r], _mm512_set1_epi32(a.accept_max[r]));
      any = __mmask16(any | pass[r]);
    }
    if (__builtin_expect(any != 0, 0)) {
      for (int r = 0; r < R; ++r) {
        if (!pass[r]) continue;
        alignas(64) uint32_t lanes[16];
        _mm512_store_si512(lanes, dist[r]);
        report(a, r, a.first_pos + b * 16, pass[r], lanes);
      }
    }
  }
}

// `queries` is 1, 2, 4 or 8 (the caller splits a register block into these sizes).
template <int W>
void scan64_r(const ScanArgs& a, int queries) {
  switch (queries) {
    case 1: return scan64<W, 1>(a);
    case 2: return scan64<W, 2>(a);
    case 4: return scan64<W, 4>(a);
    default: return scan64<W, 8>(a);
  }
}

void scan32_r(const ScanArgs& a, int queries) {
  switch (queries) {
    case 1: return scan32<1>(a);
    case 2: return scan32<2>(a);
    case 4: return scan32<4>(a);
    default: return scan32<8>(a);
  }
}

// 8 codes of 2 words: split even and odd qwords of the two vectors that hold them.
CBIR_AVX512 int64_t transpose2(const uint64_t* rows, int64_t count, uint64_t* tile) {
  const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
  const __m512i odd = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
  int64_t c = 0;
  for (; c + 8 <= count; c += 8) {
    const __m512i x0 = _mm512_loadu_si512(rows + 2 * c), x1 = _mm512_loadu_si512(rows + 2 * c + 8);
    _mm512_storeu_si512(tile + 2 * c, _mm512_permutex2var_epi64(x0, even, x1));
    _mm512_storeu_si512(tile + 2 * c + 8, _mm512_permutex2var_epi64(x0, odd, x1));
  }
  return c;
}

// 8 codes of 4 words: two rounds of the even/odd split.
CBIR_AVX512 int64_t transpose4(const uint64_t* rows, int64_t count, uint64_t* tile) {
  const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
  const __m512i odd = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
  int64_t c = 0;
  for (; c + 8 <= count; c += 8) {
    const uint64_t* r = rows + 4 * c;
    const __m512i x0 = _mm512_loadu_si512(r), x1 = _mm512_loadu_si512(r + 8);
    const __m512i x2 = _mm512_loadu_si512(r + 16), x3 = _mm512_loadu_si512(r + 24);
    // Words {0, 2} and {1, 3} of codes 0-3, then of codes 4-7.
    const __m512i a0 = _mm512_permutex2var_epi64(x0, even, x1), a1 = _mm512_permutex2var_epi64(x0, odd, x1);
    const __m512i b0 = _mm512_permutex2var_epi64(x2, even, x3), b1 = _mm512_permutex2var_epi64(x2, odd, x3);
    uint64_t* out = tile + 4 * c;
    _mm512_storeu_si512(out, _mm512_permutex2var_epi64(a0, even, b0));       // word 0 of codes 0-7
    _mm512_storeu_si512(out + 8, _mm512_permutex2var_epi64(a1, even, b1));   // word 1
    _mm512_storeu_si512(out + 16, _mm512_permutex2var_epi64(a0, odd, b0));   // word 2
    _mm512_storeu_si512(out + 24, _mm512_permutex2var_epi64(a1, odd, b1));   // word 3
  }
  return c;
}

}  // namespace

int64_t transpose_tile_avx512(const uint8_t* rows, int64_t count, int words, uint64_t* tile) {
  const auto* r = reinterpret_cast<const uint64_t*>(rows);  // read with unaligned vector loads
  if (words == 2) return transpose2(r, count, tile);
  if (words == 4) return transpose4(r, count, tile);
  return 0;
}

bool cpu_has_avx512_vpopcntdq() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
}

int register_queries_avx512(int lane_bits, int words) {
  (void)lane_bits;
  return words <= 4 ? 8 : 4;
}

void scan_tile_avx512(const ScanArgs& a, int lane_bits, int queries) {
  if (lane_bits == 32) return scan32_r(a, queries);
  switch (a.words) {
    case 1: return scan64_r<1>(a, queries);
    case 2: return scan64_r<2>(a, queries);
    case 3: return scan64_r<3>(a, queries);
    case 4: return scan64_r<4>(a, queries);
    case 8: return scan64_r<8>(a, queries);
    default: return scan64_r<0>(a, queries);
  }
}

}  // namespace cbir::cpu::hamming_detail
