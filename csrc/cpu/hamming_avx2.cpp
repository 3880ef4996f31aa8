// The tile scan with AVX2 (the build's baseline): popcount by nibble lookup (PSHUFB), byte counts
// summed per lane with PSADBW (64-bit lanes) or PMADDUBSW/PMADDWD (32-bit lanes). Each 64-byte
// block of the scan layout is read as two 32-byte halves.
#include <immintrin.h>

#include <cstdint>

#include "cpu/hamming.h"

namespace cbir::cpu::hamming_detail {
namespace {

inline __m256i popcount_bytes(__m256i v) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,  //
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low_nibble = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_and_si256(v, low_nibble);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibble);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

// Candidates collect in the caller's buffer and go to the sink when this many have gathered
// (and at the end of the tile).
constexpr int64_t kFlushAt = 256;
static_assert(kFlushAt + 16 * kMaxRegisterQueries <= kCandidateBuffer, "candidate buffer too small");

// Slow path, out of line so the scan loop stays small: appends query r's passing lanes of a block.
template <typename Lane>
__attribute__((noinline)) void collect(const ScanArgs& a, int r, int64_t pos0, uint32_t mask, const Lane* distances,
                                       int64_t* count) {
  while (mask) {
    const int lane = __builtin_ctz(mask);
    mask &= mask - 1;
    const int64_t pos = pos0 + lane;
    if (pos < a.end_pos) a.candidates[(*count)++] = pack_candidate(r, int32_t(distances[lane]), pos);
  }
}

// Byte counts of up to 31 words fit in a byte (8 * 31 < 256); longer codes flush every 31 words.
constexpr int kWordsPerFlush = 31;

template <int W, int R>
void scan64(const ScanArgs& a) {
  const int words = W > 0 ? W : a.words;
  const uint64_t* tile = static_cast<const uint64_t*>(a.tile);
  const uint64_t* q = a.query_words;
  const __m256i zero = _mm256_setzero_si256();
  int64_t count = 0;
  for (int64_t b = 0; b < a.blocks; ++b) {
    const uint64_t* block = tile + b * words * 8;
    __m256i dist[R][2];
    for (int r = 0; r < R; ++r) dist[r][0] = dist[r][1] = zero;
    for (int w0 = 0; w0 < words; w0 += kWordsPerFlush) {
      const int w1 = words - w0 < kWordsPerFlush ? words : w0 + kWordsPerFlush;
      __m256i bytes[R][2];
      for (int r = 0; r < R; ++r) bytes[r][0] = bytes[r][1] = zero;
#pragma GCC unroll 8
      for (int w = w0; w < w1; ++w) {
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + w * 8));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + w * 8 + 4));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m256i qw = _mm256_set1_epi64x(int64_t(q[r * words + w]));
          bytes[r][0] = _mm256_add_epi8(bytes[r][0], popcount_bytes(_mm256_xor_si256(x0, qw)));
          bytes[r][1] = _mm256_add_epi8(bytes[r][1], popcount_bytes(_mm256_xor_si256(x1, qw)));
        }
      }
      for (int r = 0; r < R; ++r) {
        dist[r][0] = _mm256_add_epi64(dist[r][0], _mm256_sad_epu8(bytes[r][0], zero));
        dist[r][1] = _mm256_add_epi64(dist[r][1], _mm256_sad_epu8(bytes[r][1], zero));
      }
    }
    uint32_t pass[R];
    uint32_t any = 0;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256i limit = _mm256_set1_epi64x(a.accept_max[r]);
      const int over0 = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(dist[r][0], limit)));
      const int over1 = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(dist[r][1], limit)));
      pass[r] = ~uint32_t(over0 | (over1 << 4)) & 0xffu;
      any |= pass[r];
    }
    if (__builtin_expect(any != 0, 0)) {
      for (int r = 0; r < R; ++r) {
        if (!pass[r]) continue;
        alignas(32) uint64_t lanes[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), dist[r][0]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + 4), dist[r][1]);
        collect(a, r, a.first_pos + b * 8, pass[r], lanes, &count);
      }
      if (count >= kFlushAt) {
        a.sink->take(a.candidates, count);
        count = 0;
      }
    }
  }
  if (count) a.sink->take(a.candidates, count);
}

template <int R>
void scan32(const ScanArgs& a) {
  const uint32_t* tile = static_cast<const uint32_t*>(a.tile);
  const uint64_t* q = a.query_words;
  const __m256i ones8 = _mm256_set1_epi8(1);
  const __m256i ones16 = _mm256_set1_epi16(1);
  int64_t count = 0;
  for (int64_t b = 0; b < a.blocks; ++b) {
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + b * 16));
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + b * 16 + 8));
    __m256i dist[R][2];
    uint32_t pass[R];
    uint32_t any = 0;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256i qw = _mm256_set1_epi32(int32_t(uint32_t(q[r])));
      const __m256i limit = _mm256_set1_epi32(a.accept_max[r]);
      for (int h = 0; h < 2; ++h) {
        const __m256i bytes = popcount_bytes(_mm256_xor_si256(h ? x1 : x0, qw));
        dist[r][h] = _mm256_madd_epi16(_mm256_maddubs_epi16(bytes, ones8), ones16);
      }
      const int over0 = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(dist[r][0], limit)));
      const int over1 = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(dist[r][1], limit)));
      pass[r] = ~uint32_t(over0 | (over1 << 8)) & 0xffffu;
      any |= pass[r];
    }
    if (__builtin_expect(any != 0, 0)) {
      for (int r = 0; r < R; ++r) {
        if (!pass[r]) continue;
        alignas(32) uint32_t lanes[16];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), dist[r][0]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + 8), dist[r][1]);
        collect(a, r, a.first_pos + b * 16, pass[r], lanes, &count);
      }
      if (count >= kFlushAt) {
        a.sink->take(a.candidates, count);
        count = 0;
      }
    }
  }
  if (count) a.sink->take(a.candidates, count);
}

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

}  // namespace

int register_queries_avx2(int lane_bits, int words) {
  if (lane_bits == 32) return 4;
  return words <= 2 ? 4 : 2;
}

void scan_tile_avx2(const ScanArgs& a, int lane_bits, int queries) {
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
