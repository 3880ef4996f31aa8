// Multi-index hashing (Norouzi, Punjani, Fleet: "Fast Exact Search in Hamming Space with
// Multi-Index Hashing", 2014): the code is cut into m substrings and each substring indexes a
// table. A code within distance d of the query matches it within floor(d / m) bits on at least one
// substring (pigeonhole), so probing the tables at growing substring radii finds the exact k
// nearest after touching a small part of the database.
//
// Each table is a bucket array (offsets into a position list, counting-sorted by substring value)
// and keeps a copy of the codes in bucket order, so checking a bucket's codes reads memory in
// sequence instead of jumping around the database. For codes of at most 64 bits the copy leaves
// out the table's own substring (every code of a bucket has the same one, at a distance from the
// query's that the probe knows) and is split in two: the low 32 bits of the rest (the "head") and
// the bits above (the "tail"). A probe reads the heads first: a head's distance plus what the
// pigeonhole principle guarantees for the substrings that lie wholly in the tail is a lower bound
// on the code's distance (a code that breaks the guarantee was met at an earlier stage, so it may
// be skipped too), and only the few codes that bound does not rule out have their tails read.
// 16 heads fill one vector, and a search reads 4 bytes a candidate instead of 6 (64-bit codes,
// 16-bit substrings).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "cpu/hamming.h"
#include "cpu/huge_pages.h"
#include "cpu/parallel.h"

namespace cbir::cpu {

// Allocates large arrays on 2 MiB pages where the kernel allows (madvise): probes jump around
// hundreds of MiB of tables, and with 4 KiB pages nearly every bucket would miss the TLB.
template <typename T>
struct HugePageAllocator {
  using value_type = T;
  HugePageAllocator() = default;
  template <typename U>
  HugePageAllocator(const HugePageAllocator<U>&) {}  // NOLINT(google-explicit-constructor)
  T* allocate(size_t n);
  void deallocate(T* p, size_t) noexcept;
  template <typename U>
  bool operator==(const HugePageAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const HugePageAllocator<U>&) const { return false; }
};
template <typename T>
using HugeVector = std::vector<T, HugePageAllocator<T>>;
template <typename T>
T* HugePageAllocator<T>::allocate(size_t n) {
  return static_cast<T*>(huge_page_alloc(n * sizeof(T)));
}
template <typename T>
void HugePageAllocator<T>::deallocate(T* p, size_t) noexcept {
  huge_page_free(p);
}

struct MihTables {
  int code_bytes = 0;
  int words = 0;  // 64-bit words per code, the last zero padded
  int64_t n = 0;
  struct Table {
    int first_bit = 0;
    int bits = 0;                    // substring width, at most kMihMaxSubstringBits
    HugeVector<uint32_t> offsets;    // [2^bits + 1]: bucket v holds entries [offsets[v], offsets[v+1])
    HugeVector<uint32_t> positions;  // [n] database positions in bucket order
    HugeVector<uint64_t> codes;      // [n, words] the codes in bucket order (codes over 64 bits)
    // Codes of one 64-bit word: the bits outside this substring (the rest, low first) split
    // into `head` (its low 32 bits) and `tail` (the bits above, tail_bytes (0..4) each, then 8
    // bytes of padding), both in bucket order. Empty for wider codes, which keep whole codes in
    // `codes`.
    bool split = false;
    int tail_bytes = 0;
    // Substrings of the other tables that lie wholly in the tail, before and after this table:
    // a code first met at substring radius r is more than r bits off on each of the former and
    // at least r on each of the latter.
    int tail_substrings_before = 0, tail_substrings_after = 0;
    HugeVector<uint32_t> head;
    HugeVector<uint8_t> tail;
  };
  std::vector<Table> tables;
  size_t memory_bytes() const;
};

constexpr int kMihMaxSubstringBits = 24;

// Substrings for n codes of `bits` bits: substrings of about log2(n) - 7 bits (buckets of about
// 128 codes; see mih.cpp), none wider than kMihMaxSubstringBits.
int mih_default_substrings(int bits, int64_t n);

struct MihBuildParams {
  const uint8_t* db = nullptr;  // [n, code_bytes]
  int64_t n = 0;                // < 2^32
  int code_bytes = 0;
  int substrings = 0;  // 1..bits; 0 picks mih_default_substrings
};
std::unique_ptr<MihTables> run_mih_build(const MihBuildParams& p, Parallel& par);

// What a search did, summed over its queries (for benchmarks and tuning).
struct MihStats {
  int64_t buckets = 0;     // buckets probed
  int64_t candidates = 0;  // codes checked (split tables: by their heads)
  int64_t survivors = 0;   // codes of split tables whose tails were checked
};

// Same results as run_hamming_knn over the codes the tables were built from.
struct MihKnnParams {
  const MihTables* tables = nullptr;
  const int64_t* ids = nullptr;  // null: the position is the label
  bool ids_ascending = true;
  const uint8_t* queries = nullptr;  // [nq, code_bytes]
  int64_t nq = 0;
  int64_t k = 0;  // 1 <= k <= n
  int32_t* out_distances = nullptr;
  int64_t* out_ids = nullptr;
  MihStats* stats = nullptr;  // optional
  // A lone query runs on the calling thread alone for this long before the other threads join
  // it (see mih.cpp); 0: they share it from the start.
  int serial_start_us = 20;
};
void run_mih_knn(const MihKnnParams& p, Parallel& par);

// Same results as run_hamming_range.
struct MihRangeParams {
  const MihTables* tables = nullptr;
  const int64_t* ids = nullptr;
  const uint8_t* queries = nullptr;
  int64_t nq = 0;
  int32_t radius = 0;
  MihStats* stats = nullptr;
};
void run_mih_range(const MihRangeParams& p, Parallel& par, HammingRangeResult* out);

namespace mih_detail {
// Scans `count` codes (row-major, `words` 64-bit words each) and calls hit(ctx, entry, distance)
// for each whose distance to q is at most *bound (re-read after every hit: it may drop).
using BucketHit = void (*)(void* ctx, int64_t entry, int32_t distance);
void scan_bucket_scalar(const uint64_t* codes, int64_t count, const uint64_t* q, int words, const int32_t* bound,
                        BucketHit hit, void* ctx);
// AVX-512 VPOPCNTDQ version for 1 or 2 words per code (mih_avx512.cpp); others use the scalar one.
void scan_bucket_avx512(const uint64_t* codes, int64_t count, const uint64_t* q, int words, const int32_t* bound,
                        BucketHit hit, void* ctx);
// Split tables (see MihTables): of `count` entries numbered from `first`, writes to out_entries
// the numbers of those whose lower bound floor + popcount(head ^ q_head) is at most `bound`, and
// to out_ones their popcount(head ^ q_head); returns how many. Both outputs need room for
// count + 16 values (vector stores).
int64_t split_survivors_scalar(const uint32_t* head, int64_t count, uint32_t q_head, int32_t floor, int32_t bound,
                               uint32_t first, uint32_t* out_entries, uint32_t* out_ones);
// AVX-512 VPOPCNTDQ: 16 heads per vector (mih_avx512.cpp).
int64_t split_survivors_avx512(const uint32_t* head, int64_t count, uint32_t q_head, int32_t floor, int32_t bound,
                               uint32_t first, uint32_t* out_entries, uint32_t* out_ones);
// The tail of entry `entry` (tail_bytes bytes, zero when there are none).
inline uint32_t load_tail(const uint8_t* tail, int tail_bytes, int64_t entry) {
  if (tail_bytes == 0) return 0;
  uint32_t v;
  __builtin_memcpy(&v, tail + entry * tail_bytes, 4);
  return tail_bytes == 4 ? v : v & ((uint32_t(1) << (8 * tail_bytes)) - 1);
}
}  // namespace mih_detail

}  // namespace cbir::cpu
