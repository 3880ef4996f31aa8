// Exact Hamming search over packed binary codes. A code of `code_bytes` bytes is plain bytes in
// the house layout (bit i is bit i % 64 of little-endian 64-bit word i / 64), the same bytes FAISS
// stores, so no conversion happens between Python and these kernels.
//
// Flat scan: queries in groups, the database in cache-sized tiles that every query of a group reads
// while they are hot; 8 (or 16 short) codes per SIMD popcount; each query keeps a candidate buffer
// filtered by its current k-th distance, and the buffer is cut back to k by counting (distances are
// small integers, so a histogram finds the k-th distance in one pass: no heap per code).
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/parallel.h"

namespace cbir::cpu {

// k nearest codes of each query; ties broken by the smaller id, results sorted by (distance, id).
struct HammingKnnParams {
  const uint8_t* db = nullptr;  // [n, code_bytes]
  int64_t n = 0;
  int code_bytes = 0;
  const int64_t* ids = nullptr;  // [n] labels of the codes; null means the position is the label
  bool ids_ascending = true;     // ids strictly increase with position (ties by position = by id)
  const uint8_t* queries = nullptr;  // [nq, code_bytes]
  int64_t nq = 0;
  int64_t k = 0;  // 1 <= k <= n
  int32_t* out_distances = nullptr;  // [nq, k]
  int64_t* out_ids = nullptr;        // [nq, k]
};
void run_hamming_knn(const HammingKnnParams& p, Parallel& par);

// Every code within `radius` (inclusive) of each query, per query sorted by (distance, id).
struct HammingRangeParams {
  const uint8_t* db = nullptr;
  int64_t n = 0;
  int code_bytes = 0;
  const int64_t* ids = nullptr;
  const uint8_t* queries = nullptr;
  int64_t nq = 0;
  int32_t radius = 0;
};
struct HammingRangeResult {
  std::vector<int64_t> lims;  // [nq + 1]: query q owns [lims[q], lims[q + 1])
  std::vector<int32_t> distances;
  std::vector<int64_t> ids;
};
void run_hamming_range(const HammingRangeParams& p, Parallel& par, HammingRangeResult* out);

// Full [nq, n] distance matrix (small inputs: tests, re-ranking).
void run_hamming_distances(const uint8_t* db, int64_t n, const uint8_t* queries, int64_t nq,
                           int code_bytes, int32_t* out, Parallel& par);

// The SIMD path the scan uses: "avx512-vpopcntdq" where the CPU has it, else "avx2".
const char* hamming_isa();
// Pins the scan to "avx2", "avx512-vpopcntdq" or "auto" (tests compare the paths); returns false
// when the CPU cannot run the one asked for.
bool hamming_set_isa(const char* name);

namespace hamming_detail {

// A database tile in the scan layout: blocks of one 64-byte vector per code word, so one load
// brings the same word of 8 codes (64-bit lanes) or 16 codes (32-bit lanes, codes <= 32 bits).
// Block b, word w, lane l sits at element (b * words + w) * lanes + l.
constexpr int kVectorBytes = 64;

// A code a scan lets through its filter, packed: query r (within the register block) in bits
// 56..63, distance in bits 40..55, database position in bits 0..39.
constexpr int kCandidatePosBits = 40;
constexpr int kMaxCodeBits = 65535;  // distances must fit the 16 bits of a candidate
inline uint64_t pack_candidate(int r, int32_t distance, int64_t pos) {
  return (uint64_t(r) << 56) | (uint64_t(uint32_t(distance)) << kCandidatePosBits) | uint64_t(pos);
}
inline int candidate_query(uint64_t c) { return int(c >> 56); }
inline int32_t candidate_distance(uint64_t c) { return int32_t((c >> kCandidatePosBits) & 0xffff); }
inline int64_t candidate_pos(uint64_t c) { return int64_t(c & ((uint64_t(1) << kCandidatePosBits) - 1)); }

// Receives the codes a scan lets through its filter, in batches and in position order per
// query (rare once a query's k-th distance is known; batching keeps the scan loop free of calls).
class CandidateSink {
 public:
  virtual ~CandidateSink() = default;
  // May lower accept_max for the queries it was given; the scan rereads the limits afterwards.
  virtual void take(const uint64_t* candidates, int64_t count) = 0;
};

// Room a scan needs in its candidate buffer: it flushes when fewer than one block's worth of
// candidates for every query fit.
constexpr int64_t kCandidateBuffer = 4096;

struct ScanArgs {
  const void* tile = nullptr;  // scan layout, `blocks` blocks
  int64_t blocks = 0;
  int64_t first_pos = 0;  // database position of the tile's first code
  int64_t end_pos = 0;    // positions at or past this are padding
  int words = 0;          // words per code (lane units)
  const uint64_t* query_words = nullptr;  // [R][words], one lane value per element
  // Per query: a code passes when distance <= accept_max[r]; the sink may lower it as it goes.
  const int32_t* accept_max = nullptr;
  CandidateSink* sink = nullptr;
  uint64_t* candidates = nullptr;  // kCandidateBuffer entries of scratch
};

// Scans one tile for R queries held in registers, R in {1, 2, 4, 8}; lane_bits is 32 or 64.
constexpr int kMaxRegisterQueries = 8;
using ScanFn = void (*)(const ScanArgs& args, int lane_bits, int queries);
void scan_tile_avx2(const ScanArgs& args, int lane_bits, int queries);
void scan_tile_avx512(const ScanArgs& args, int lane_bits, int queries);
bool cpu_has_avx512_vpopcntdq();
// Moves whole blocks of 8 row-major codes of `words` 64-bit words (2 or 4; others do nothing)
// into the scan layout with AVX-512 permutes; returns how many codes it moved (a multiple of 8).
int64_t transpose_tile_avx512(const uint8_t* rows, int64_t count, int words, uint64_t* tile);
// The R (1, 2, 4 or 8) the kernel runs best with for this shape.
int register_queries_avx2(int lane_bits, int words);
int register_queries_avx512(int lane_bits, int words);

}  // namespace hamming_detail
}  // namespace cbir::cpu
