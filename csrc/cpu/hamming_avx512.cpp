// The tile scan with AVX-512 VPOPCNTDQ: one popcount instruction counts 8 (or 16) codes' words.
// The build targets AVX2, so these functions carry their own target attribute and are only
// called after a runtime CPU check (hamming.cpp); nothing here has external linkage except the
// dispatch entry points, so no AVX-512 code can leak into other translation units.
#include <immintrin.h>

#include <cstdint>

#include "cpu/hamming.h"

#define CBIR_AVX512 __attribute__((target("avx512f,avx512vpopcntdq")))

// GCC 12 flags the deliberately undefined pass-through operand inside _mm512_min_epi32 as
// "maybe uninitialized" once inlined here; the intrinsic's result does not depend on it.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace cbir::cpu::hamming_detail {
namespace {

// Candidates collect in the caller's buffer and go to the sink when this many have gathered
// (and at the end of the tile): the limits the scan filters with are at most that stale.
constexpr int64_t kFlushAt = 256;
static_assert(kFlushAt + 16 * kMaxRegisterQueries + 8 <= kCandidateBuffer, "candidate buffer too small");

// 64-bit lanes, 8 codes per block. W > 0 fixes the words per code at compile time (unrolled);
// W == 0 reads it from the arguments. The query words (when they fit) live in registers, and so
// does the loosest per-query limit: the loop only asks whether any lane is within it. When one
// is, each query's passing lanes are packed as candidates without branches (compress in a
// register, then a plain store: Zen 4 microcodes compress-to-memory).
template <int W, int R>
CBIR_AVX512 void scan64(const ScanArgs& a) {
  const int words = W > 0 ? W : a.words;
  constexpr int kHeldWords = (W > 0 && W * R <= 16) ? W : 0;
  const uint64_t* tile = static_cast<const uint64_t*>(a.tile);
  const uint64_t* q = a.query_words;
  __m512i held[kHeldWords > 0 ? R * kHeldWords : 1] = {};
  if (kHeldWords > 0) {
#pragma GCC unroll 16
    for (int i = 0; i < R * kHeldWords; ++i) held[i] = _mm512_set1_epi64(int64_t(q[i]));
  }
  auto query_word = [&](int r, int w) CBIR_AVX512 {
    return kHeldWords > 0 ? held[r * kHeldWords + w] : _mm512_set1_epi64(int64_t(q[r * words + w]));
  };
  // Each query's limit in a register: the loop asks whether any lane is within its own query's
  // limit. (Asking whether the closest query is within the loosest limit costs the same but
  // passes far too often on real codes, whose queries differ: one query's tight neighbours fell
  // within another's loose limit, and the scan ran at half speed.)
  __m512i limit[R];
  auto load_limits = [&]() CBIR_AVX512 {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) limit[r] = _mm512_set1_epi64(a.accept_max[r]);
  };
  load_limits();
  const __m512i lane_index = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i end_pos = _mm512_set1_epi64(a.end_pos);
  uint64_t* out = a.candidates;
  int64_t count = 0;
  for (int64_t b = 0; b < a.blocks; ++b) {
    const uint64_t* block = tile + b * words * 8;
    __m512i dist[R];
    {
      const __m512i x = _mm512_loadu_si512(block);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) dist[r] = _mm512_popcnt_epi64(_mm512_xor_si512(x, query_word(r, 0)));
    }
#pragma GCC unroll 8
    for (int w = 1; w < words; ++w) {
      const __m512i x = _mm512_loadu_si512(block + w * 8);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        dist[r] = _mm512_add_epi64(dist[r], _mm512_popcnt_epi64(_mm512_xor_si512(x, query_word(r, w))));
    }
    // Signed compares: a limit is -1 once nothing can enter any more.
    __mmask8 any = 0;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) any |= _mm512_cmple_epi64_mask(dist[r], limit[r]);
    if (__builtin_expect(any != 0, 0)) {
      const __m512i pos = _mm512_add_epi64(_mm512_set1_epi64(a.first_pos + b * 8), lane_index);
      const __mmask8 inside = _mm512_cmplt_epi64_mask(pos, end_pos);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __mmask8 pass = _mm512_mask_cmple_epi64_mask(inside, dist[r], _mm512_set1_epi64(a.accept_max[r]));
        const __m512i packed = _mm512_or_si512(
            _mm512_or_si512(_mm512_slli_epi64(dist[r], kCandidatePosBits), pos),
            _mm512_set1_epi64(int64_t(uint64_t(r) << 56)));
        _mm512_storeu_si512(out + count, _mm512_maskz_compress_epi64(pass, packed));
        count += __builtin_popcount(pass);
      }
      if (count >= kFlushAt) {
        a.sink->take(out, count);
        count = 0;
        load_limits();
      }
    }
  }
  if (count) a.sink->take(out, count);
}

// 32-bit lanes (codes of at most 32 bits), 16 codes per block, one word per code. Candidates
// are packed 8 lanes at a time (they need 64 bits each).
template <int R>
CBIR_AVX512 void scan32(const ScanArgs& a) {
  const uint32_t* tile = static_cast<const uint32_t*>(a.tile);
  __m512i qv[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) qv[r] = _mm512_set1_epi32(int32_t(uint32_t(a.query_words[r])));
  __m512i limit[R];  // each query's own limit, as in scan64
  auto load_limits = [&]() CBIR_AVX512 {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) limit[r] = _mm512_set1_epi32(a.accept_max[r]);
  };
  load_limits();
  const __m512i lane_index = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i end_pos = _mm512_set1_epi64(a.end_pos);
  uint64_t* out = a.candidates;
  int64_t count = 0;
  for (int64_t b = 0; b < a.blocks; ++b) {
    const __m512i x = _mm512_loadu_si512(tile + b * 16);
    __m512i dist[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) dist[r] = _mm512_popcnt_epi32(_mm512_xor_si512(x, qv[r]));
    __mmask16 any = 0;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) any |= _mm512_cmple_epi32_mask(dist[r], limit[r]);
    if (__builtin_expect(any != 0, 0)) {
      for (int half = 0; half < 2; ++half) {
        const __m512i pos = _mm512_add_epi64(_mm512_set1_epi64(a.first_pos + b * 16 + half * 8), lane_index);
        const __mmask8 inside = _mm512_cmplt_epi64_mask(pos, end_pos);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m512i d = _mm512_cvtepu32_epi64(half ? _mm512_extracti64x4_epi64(dist[r], 1)
                                                       : _mm512_castsi512_si256(dist[r]));
          const __mmask8 pass = _mm512_mask_cmple_epi64_mask(inside, d, _mm512_set1_epi64(a.accept_max[r]));
          const __m512i packed = _mm512_or_si512(_mm512_or_si512(_mm512_slli_epi64(d, kCandidatePosBits), pos),
                                                 _mm512_set1_epi64(int64_t(uint64_t(r) << 56)));
          _mm512_storeu_si512(out + count, _mm512_maskz_compress_epi64(pass, packed));
          count += __builtin_popcount(pass);
        }
      }
      if (count >= kFlushAt) {
        a.sink->take(out, count);
        count = 0;
        load_limits();
      }
    }
  }
  if (count) a.sink->take(out, count);
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
