// Multi-index hashing: table build (counting sort per substring) and the exact k-NN / range
// probes. See mih.h for the idea.
#include "cpu/mih.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace cbir::cpu {
namespace {

template <typename F>
void run_tasks(Parallel& par, int64_t tasks, F&& fn) {
  std::exception_ptr error;
  std::mutex error_mu;
  auto guarded = [&](int64_t task, int thread) {
    try {
      fn(task, thread);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mu);
      if (!error) error = std::current_exception();
    }
  };
  par.run(tasks, guarded);
  if (error) std::rethrow_exception(error);
}

void code_to_words(const uint8_t* code, int code_bytes, int words, uint64_t* out) {
  for (int w = 0; w < words; ++w) {
    const int len = std::min(8, code_bytes - w * 8);
    uint64_t v = 0;
    std::memcpy(&v, code + w * 8, size_t(len));
    out[w] = v;
  }
}

// Bits [first_bit, first_bit + bits) of a code as an integer (bits <= 32).
inline uint32_t substring_of(const uint64_t* words, int first_bit, int bits) {
  const int w = first_bit >> 6, shift = first_bit & 63;
  uint64_t v = words[w] >> shift;
  if (shift + bits > 64) v |= words[w + 1] << (64 - shift);
  return uint32_t(v & ((uint64_t(1) << bits) - 1));
}

// A 64-bit code without its substring [first_bit, first_bit + bits): the bits below it, then the
// bits above it shifted down (what a table of packed remainders stores).
inline uint64_t low_bits(int count) { return count >= 64 ? ~uint64_t(0) : (uint64_t(1) << count) - 1; }
inline uint64_t rest_of(uint64_t code, int first_bit, int bits) {
  const int top = first_bit + bits;
  const uint64_t above = top >= 64 ? 0 : code >> top;
  return (code & low_bits(first_bit)) | (first_bit >= 64 ? 0 : above << first_bit);
}
inline uint64_t code_from_rest(uint64_t rest, uint32_t sub, int first_bit, int bits) {
  const int top = first_bit + bits;
  const uint64_t above = top >= 64 ? 0 : (rest >> first_bit) << top;
  return (rest & low_bits(first_bit)) | (uint64_t(sub) << first_bit) | above;
}

inline int32_t distance(const uint64_t* a, const uint64_t* b, int words) {
  int32_t d = 0;
  for (int w = 0; w < words; ++w) d += __builtin_popcountll(a[w] ^ b[w]);
  return d;
}

// A result key: distance in the high bits, below it a database position or, while searching,
// where the code was met (table << 32 | entry in that table's bucket order). Positions are looked
// up only for the codes kept in the end: each lookup is a cache miss, and most codes met within
// the running bound fall out of the top k later.
constexpr int kPosBits = 44;
constexpr uint64_t kPosMask = (uint64_t(1) << kPosBits) - 1;
inline uint64_t pack_key(int32_t d, int64_t pos) { return (uint64_t(uint32_t(d)) << kPosBits) | uint64_t(pos); }
inline int32_t key_distance(uint64_t key) { return int32_t(key >> kPosBits); }
inline int64_t key_pos(uint64_t key) { return int64_t(key & kPosMask); }
inline int64_t met_at(int table, uint32_t entry) { return int64_t(table) << 32 | int64_t(entry); }

// Replaces the met_at part of each key by the database position.
void resolve_positions(const MihTables& t, uint64_t* keys, int64_t count) {
  auto position = [&](uint64_t key) -> const uint32_t* {
    const int64_t at = key_pos(key);
    return t.tables[size_t(at >> 32)].positions.data() + (at & 0xffffffff);
  };
  constexpr int64_t kAhead = 16;  // lookups in flight
  for (int64_t i = 0; i < std::min(count, kAhead); ++i) __builtin_prefetch(position(keys[i]));
  for (int64_t i = 0; i < count; ++i) {
    if (i + kAhead < count) __builtin_prefetch(position(keys[i + kAhead]));
    keys[i] = pack_key(key_distance(keys[i]), int64_t(*position(keys[i])));
  }
}

struct Labels {
  const int64_t* ids = nullptr;
  bool ascending = true;
  int64_t operator()(int64_t pos) const { return ids ? ids[pos] : pos; }
};

void sort_by_distance_then_label(uint64_t* keys, int64_t m, const Labels& labels) {
  if (labels.ascending) {
    std::sort(keys, keys + m);
    return;
  }
  std::sort(keys, keys + m, [&](uint64_t a, uint64_t b) {
    const int32_t da = key_distance(a), db = key_distance(b);
    if (da != db) return da < db;
    return labels(key_pos(a)) < labels(key_pos(b));
  });
}

// Binomial coefficients C(n, r) for n, r <= 32.
struct Binomials {
  uint64_t c[33][33] = {};
  Binomials() {
    for (int n = 0; n <= 32; ++n) {
      c[n][0] = 1;
      for (int r = 1; r <= n; ++r) c[n][r] = c[n - 1][r - 1] + (r < n ? c[n - 1][r] : 0);
    }
  }
};
const Binomials kBinomials;

inline uint64_t masks_with(int width, int ones) { return ones > width ? 0 : kBinomials.c[width][ones]; }

// The rank-th (from 0) `width`-bit mask with `ones` bits set, in increasing numeric order
// (the combinatorial number system: rank = sum of C(c_i, i) over the set bits c_ones > ... > c_1).
inline uint64_t unrank_mask(uint64_t rank, int ones) {
  uint64_t mask = 0;
  for (int i = ones; i >= 1; --i) {
    int c = i - 1;
    while (kBinomials.c[c + 1][i] <= rank) ++c;
    mask |= uint64_t(1) << c;
    rank -= kBinomials.c[c][i];
  }
  return mask;
}

// Calls visit(mask) for the masks of rank [begin, end) among `width`-bit masks with `ones` bits
// set, in increasing numeric order.
template <typename Visit>
void for_each_mask(int ones, uint64_t begin, uint64_t end, Visit&& visit) {
  if (begin >= end) return;
  uint64_t mask = unrank_mask(begin, ones);
  for (uint64_t r = begin; r < end; ++r) {
    visit(uint32_t(mask));
    if (ones == 0) break;
    // Next larger integer with the same number of set bits.
    const uint64_t low = mask | (mask - 1);
    mask = (low + 1) | (((~low & (low + 1)) - 1) >> (__builtin_ctzll(mask) + 1));
  }
}

// Per-thread state for probing one query.
struct Probe {
  const MihTables* t = nullptr;
  std::vector<uint64_t> q;      // query words
  std::vector<uint32_t> q_sub;  // query substrings
  std::vector<uint32_t> q_head, q_tail;  // the query's rest per split table (see MihTables)
  MihStats stats;

  void set_query(const uint8_t* code) {
    q.resize(size_t(t->words));
    code_to_words(code, t->code_bytes, t->words, q.data());
    q_sub.resize(t->tables.size());
    q_head.resize(t->tables.size());
    q_tail.resize(t->tables.size());
    for (size_t i = 0; i < t->tables.size(); ++i) {
      const auto& tb = t->tables[i];
      q_sub[i] = substring_of(q.data(), tb.first_bit, tb.bits);
      const uint64_t rest = tb.split ? rest_of(q[0], tb.first_bit, tb.bits) : 0;
      q_head[i] = uint32_t(rest);
      q_tail[i] = uint32_t(rest >> 32);
    }
  }

  // A code is met once per table whose substring is close enough; count it only at its first
  // meeting in probe order (radius, then table): no table before `table` within `radius`, and no
  // table after it within radius - 1. Needs nothing but the code itself, so no visited set.
  bool first_met_here(const uint64_t* code, int radius, int table) const {
    const int m = int(t->tables.size());
    for (int i = 0; i < m; ++i) {
      if (i == table) continue;
      const auto& tb = t->tables[size_t(i)];
      const int e = __builtin_popcount(substring_of(code, tb.first_bit, tb.bits) ^ q_sub[size_t(i)]);
      if (i < table ? e <= radius : e < radius) return false;
    }
    return true;
  }

  // Probes table `table` at substring distance exactly `radius`, calling
  // hit(distance, met_at(table, entry)) for each code met here for the first time whose full
  // distance is at most *bound (re-read after every hit: hit may lower it). Only the buckets of
  // rank [first_mask, end_mask) among the radius-`radius` neighbours of the query's substring
  // are probed (threads sharing a query take chunks of them).
  template <typename Hit>
  void probe(int table, int radius, const int32_t* bound, Hit&& hit, uint64_t first_mask, uint64_t end_mask) {
    const MihTables::Table& tb = t->tables[size_t(table)];
    if (radius > tb.bits) return;
    const int words = t->words;
    const uint32_t key0 = q_sub[size_t(table)];
    // Whole codes (tables of codes over 64 bits): scan_bucket calls back for each code within
    // the bound.
    struct Context {
      Probe* self;
      const MihTables::Table* tb;
      uint32_t first;
      int table, radius;
      std::remove_reference_t<Hit>* hit;
      static void on_hit(void* c, int64_t entry, int32_t d) {
        auto* x = static_cast<Context*>(c);
        const uint32_t e = x->first + uint32_t(entry);
        const uint64_t* code = x->tb->codes.data() + size_t(e) * size_t(x->self->t->words);
        if (x->self->first_met_here(code, x->radius, x->table)) (*x->hit)(d, met_at(x->table, e));
      }
    } ctx{this, &tb, 0, table, radius, &hit};
    // Buckets are taken in blocks: first every key of the block (its offsets prefetched), then
    // the bucket bounds, then the scan. The scan reads a chain of short runs of cache lines at
    // random places (about 10 lines of heads a bucket at the default substring width); a
    // prefetch cursor walks that chain kLinesAhead lines ahead of the scan, line by line, so a
    // steady number of requests is in flight (measured faster than prefetching whole buckets
    // some buckets ahead, which issues them in bursts). Into L2 (prefetcht2): measured faster
    // than into L1 (prefetcht0) or with a non-temporal hint.
    constexpr int kBlock = 256, kLinesAhead = 64;
    uint32_t keys[kBlock], begin[kBlock], end[kBlock];
    const uint64_t* codes = tb.codes.data();
    // Split tables: only the heads are prefetched; tails are read for the few codes that the
    // heads do not rule out.
    const size_t code_bytes = tb.split ? sizeof(uint32_t) : size_t(words) * 8;
    const char* base = tb.split ? reinterpret_cast<const char*>(tb.head.data()) : reinterpret_cast<const char*>(codes);
    // Every code met here is exactly `radius` bits off the query on this table's substring, and
    // (if met here first) at least `radius` or radius + 1 off on each substring in its tail.
    const int32_t floor = radius + tb.tail_substrings_before * (radius + 1) + tb.tail_substrings_after * radius;
    const uint32_t q_head_here = q_head[size_t(table)], q_tail_here = q_tail[size_t(table)];
    const uint8_t* tails = tb.tail.data();
    // Survivors of the head bound (survivor_entries / survivor_ones), and per bucket the end of
    // its run. Their tails are prefetched when found and checked in batches (flush), so the tail
    // misses overlap instead of stalling the scan one by one.
    size_t survivors = 0;
    int flush_from = 0;  // the first bucket with survivors in the buffer
    uint32_t survivors_end[kBlock];
    auto flush = [&](int upto) {  // checks the buffer's survivors (buckets flush_from..upto)
      size_t next = 0;
      for (int j = flush_from; j <= upto; ++j) {
        const size_t end_j = j == upto ? survivors : survivors_end[j];
        for (; next < end_j; ++next) {
          const uint32_t entry = survivor_entries[next];
          const int32_t ones = int32_t(survivor_ones[next]);
          if (floor + ones > *bound) continue;  // the bound fell since the scan
          ++stats.survivors;
          const uint32_t tail = mih_detail::load_tail(tails, tb.tail_bytes, entry);
          const int32_t d = radius + ones + __builtin_popcount(tail ^ q_tail_here);
          if (d > *bound) continue;
          const uint64_t code = code_from_rest(tb.head[entry] | uint64_t(tail) << 32, keys[j], tb.first_bit, tb.bits);
          if (first_met_here(&code, radius, table)) hit(d, met_at(table, entry));
        }
      }
      survivors = 0;
      flush_from = upto;
    };
    for (uint64_t rank = first_mask; rank < end_mask;) {
      const int count = int(std::min<uint64_t>(kBlock, end_mask - rank));
      int e = 0;
      for_each_mask(radius, rank, rank + uint64_t(count), [&](uint32_t mask) {
        keys[e] = key0 ^ mask;
        __builtin_prefetch(tb.offsets.data() + keys[e++]);
      });
      rank += uint64_t(count);
      for (int j = 0; j < count; ++j) {
        begin[j] = tb.offsets[keys[j]];
        end[j] = tb.offsets[keys[j] + 1];
      }
      // The prefetch cursor: bucket pf, byte offset pf_at (line aligned) into the code array.
      int pf = 0;
      size_t pf_at = size_t(begin[0]) * code_bytes & ~size_t(63);
      auto prefetch_lines = [&](int64_t lines) {
        while (lines > 0 && pf < count) {
          if (pf_at >= size_t(end[pf]) * code_bytes) {
            if (++pf < count) pf_at = size_t(begin[pf]) * code_bytes & ~size_t(63);
            continue;
          }
          __builtin_prefetch(base + pf_at, 0, 1);
          pf_at += 64;
          --lines;
        }
      };
      prefetch_lines(kLinesAhead);
      for (int j = 0; j < count; ++j) {
        const uint32_t first = begin[j], last = end[j];
        survivors_end[j] = uint32_t(survivors);
        if (first == last) continue;
        prefetch_lines(int64_t((size_t(last) * code_bytes + 63) / 64 - size_t(first) * code_bytes / 64));
        stats.candidates += last - first;
        if (tb.split) {
          for (uint32_t at = first; at < last;) {
            const uint32_t piece = std::min(kPiece, last - at);
            const int64_t got = split_survivors(tb.head.data() + at, int64_t(piece), q_head_here, floor, *bound, at,
                                                survivor_entries.data() + survivors,
                                                survivor_ones.data() + survivors);
            for (int64_t g = 0; g < got && tb.tail_bytes; ++g)
              __builtin_prefetch(tails + size_t(survivor_entries[survivors + size_t(g)]) * size_t(tb.tail_bytes));
            survivors += size_t(got);
            at += piece;
            if (survivors >= kFlushAt) flush(j);
          }
          survivors_end[j] = uint32_t(survivors);
        } else {
          ctx.first = first;
          scan_bucket(codes + size_t(first) * size_t(words), int64_t(last - first), q.data(), words, bound,
                      &Context::on_hit, &ctx);
        }
      }
      if (tb.split) {
        flush(count - 1);
        flush_from = 0;
      }
      stats.buckets += count;
    }
  }

  using ScanBucket = void (*)(const uint64_t*, int64_t, const uint64_t*, int, const int32_t*,
                              mih_detail::BucketHit, void*);
  ScanBucket scan_bucket = pick_scan_bucket();

  static ScanBucket pick_scan_bucket() {
    return std::string(hamming_isa()) == "avx2" ? &mih_detail::scan_bucket_scalar
                                                 : &mih_detail::scan_bucket_avx512;
  }

  using SplitSurvivors = int64_t (*)(const uint32_t*, int64_t, uint32_t, int32_t, int32_t, uint32_t, uint32_t*,
                                     uint32_t*);
  SplitSurvivors split_survivors = pick_split_survivors();
  // A batch of survivors is checked (flushed) at the end of a block of buckets or once kFlushAt
  // wait, and a bucket is scanned kPiece heads at a time: early in a search the bound is loose
  // and nearly every code survives (clustered codes fill buckets of thousands), so the hits that
  // tighten it must not wait for the block's end. A piece starts with fewer than kFlushAt
  // survivors waiting and the scan stores whole vectors, hence the buffers' size.
  static constexpr size_t kFlushAt = 64;
  static constexpr uint32_t kPiece = 256;
  std::array<uint32_t, kFlushAt + kPiece + 16> survivor_entries, survivor_ones;

  static SplitSurvivors pick_split_survivors() {
    return std::string(hamming_isa()) == "avx2" ? &mih_detail::split_survivors_scalar
                                                : &mih_detail::split_survivors_avx512;
  }
};

int max_table_bits(const MihTables& t) {
  int b = 0;
  for (const auto& tb : t.tables) b = std::max(b, tb.bits);
  return b;
}

}  // namespace

void mih_detail::scan_bucket_scalar(const uint64_t* codes, int64_t count, const uint64_t* q, int words,
                                    const int32_t* bound, BucketHit hit, void* ctx) {
  for (int64_t i = 0; i < count; ++i) {
    const int32_t d = distance(codes + i * words, q, words);
    if (d <= *bound) hit(ctx, i, d);
  }
}

int64_t mih_detail::split_survivors_scalar(const uint32_t* head, int64_t count, uint32_t q_head, int32_t floor,
                                           int32_t bound, uint32_t first, uint32_t* out_entries,
                                           uint32_t* out_ones) {
  int64_t found = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int32_t ones = __builtin_popcount(head[i] ^ q_head);
    if (floor + ones > bound) continue;
    out_entries[found] = first + uint32_t(i);
    out_ones[found++] = uint32_t(ones);
  }
  return found;
}

size_t MihTables::memory_bytes() const {
  size_t bytes = 0;
  for (const auto& tb : tables)
    bytes += tb.offsets.size() * 4 + tb.positions.size() * 4 + tb.codes.size() * 8 + tb.head.size() * 4 +
             tb.tail.size();
  return bytes;
}

int mih_default_substrings(int bits, int64_t n) {
  // Norouzi et al. pick substrings of about log2(n) bits (one code per bucket). Here a bucket is
  // scanned with SIMD popcounts at streaming speed while each probe costs a cache miss or two,
  // so buckets of about 2^7 codes (about 1 KiB of 64-bit codes) measured faster: substrings of
  // about log2(n) - 7 bits (bench/bench_hamming.py, 1M and 10M codes).
  const int log_n = int(std::lround(std::log2(double(std::max<int64_t>(n, 2)))));
  const int width = std::max(4, std::min(kMihMaxSubstringBits, log_n - 7));
  const int m = (bits + width - 1) / width;
  return std::max(1, std::min(m, bits));
}

std::unique_ptr<MihTables> run_mih_build(const MihBuildParams& p, Parallel& par) {
  if (p.n < 0 || p.n >= (int64_t(1) << 32)) throw std::invalid_argument("mih: at most 2^32 - 1 codes");
  const int bits = p.code_bytes * 8;
  const int m = p.substrings > 0 ? p.substrings : mih_default_substrings(bits, p.n);
  if (m < 1 || m > bits) throw std::invalid_argument("mih: substrings must be in [1, bits]");
  if (m > 4096) throw std::invalid_argument("mih: at most 4096 substrings");  // see met_at
  if (bits >= (1 << (64 - kPosBits))) throw std::invalid_argument("mih: codes too long");  // see pack_key
  const int narrow = bits / m, wide_count = bits % m;
  if (narrow + (wide_count ? 1 : 0) > kMihMaxSubstringBits)
    throw std::invalid_argument("mih: substrings wider than " + std::to_string(kMihMaxSubstringBits) +
                                " bits; use at least " +
                                std::to_string((bits + kMihMaxSubstringBits - 1) / kMihMaxSubstringBits) +
                                " substrings");
  auto t = std::make_unique<MihTables>();
  t->code_bytes = p.code_bytes;
  t->words = (p.code_bytes + 7) / 8;
  t->n = p.n;
  t->tables.resize(size_t(m));
  int first = 0;
  for (int i = 0; i < m; ++i) {
    t->tables[size_t(i)].first_bit = first;
    t->tables[size_t(i)].bits = narrow + (i < wide_count ? 1 : 0);
    first += t->tables[size_t(i)].bits;
  }
  const int words = t->words;
  std::vector<uint64_t> all(size_t(p.n) * size_t(words));
  const int64_t chunk = 1 << 16;
  run_tasks(par, (p.n + chunk - 1) / chunk, [&](int64_t c, int) {
    for (int64_t i = c * chunk; i < std::min(p.n, (c + 1) * chunk); ++i)
      code_to_words(p.db + i * p.code_bytes, p.code_bytes, words, all.data() + i * words);
  });
  run_tasks(par, m, [&](int64_t i, int) {
    MihTables::Table& tb = t->tables[size_t(i)];
    const size_t buckets = size_t(1) << tb.bits;
    tb.offsets.assign(buckets + 1, 0);
    for (int64_t j = 0; j < p.n; ++j) ++tb.offsets[substring_of(all.data() + j * words, tb.first_bit, tb.bits) + 1];
    for (size_t v = 0; v < buckets; ++v) tb.offsets[v + 1] += tb.offsets[v];
    std::vector<uint32_t> cursor(tb.offsets.begin(), tb.offsets.end() - 1);
    tb.positions.resize(size_t(p.n));
    tb.split = words == 1;
    if (tb.split) {
      const int rest_bits = bits - tb.bits;
      tb.tail_bytes = rest_bits > 32 ? (rest_bits - 32 + 7) / 8 : 0;
      tb.head.resize(size_t(p.n));
      tb.tail.assign(size_t(p.n) * size_t(tb.tail_bytes) + 8, 0);
      for (int j = 0; j < m; ++j) {
        if (j == int(i)) continue;
        const auto& other = t->tables[size_t(j)];
        const int rest_first = j < i ? other.first_bit : other.first_bit - tb.bits;
        if (rest_first >= 32) ++(j < i ? tb.tail_substrings_before : tb.tail_substrings_after);
      }
    } else {
      tb.codes.resize(size_t(p.n) * size_t(words));
    }
    for (int64_t j = 0; j < p.n; ++j) {
      const uint64_t* code = all.data() + j * words;
      const uint32_t e = cursor[substring_of(code, tb.first_bit, tb.bits)]++;
      tb.positions[e] = uint32_t(j);
      if (tb.split) {
        const uint64_t r = rest_of(code[0], tb.first_bit, tb.bits);
        tb.head[e] = uint32_t(r);
        const uint32_t above = uint32_t(r >> 32);
        std::memcpy(tb.tail.data() + size_t(e) * size_t(tb.tail_bytes), &above, size_t(tb.tail_bytes));
      } else {
        std::copy(code, code + words, tb.codes.data() + size_t(e) * size_t(words));
      }
    }
  });
  return t;
}

void run_mih_knn(const MihKnnParams& p, Parallel& par) {
  const MihTables& t = *p.tables;
  if (p.k < 1 || p.k > t.n) throw std::invalid_argument("mih knn: k must be in [1, n]");
  const Labels labels{p.ids, p.ids == nullptr || p.ids_ascending};
  const int m = int(t.tables.size());
  const int max_distance = t.code_bytes * 8;
  if (p.nq == 0) return;
  const int threads = std::max(1, par.threads());

  // Probing goes in stages s = radius * m + table. Once stages 0..s are done, every code within
  // distance s has been met (a code not met yet differs in > radius bits on tables 0..table and
  // in >= radius bits on the others), so the search ends when k codes are known within the
  // last stage of a finished prefix. A stage is cut into chunks of buckets: work items, taken
  // in order from a shared counter by whichever threads work on the query.
  constexpr uint64_t kChunk = 64;
  const int stages = (max_table_bits(t) + 1) * m;
  std::vector<int64_t> stage_chunks(static_cast<size_t>(stages)), first_item(static_cast<size_t>(stages) + 1, 0);
  for (int s = 0; s < stages; ++s) {
    const uint64_t masks = masks_with(t.tables[size_t(s % m)].bits, s / m);
    stage_chunks[size_t(s)] = int64_t((masks + kChunk - 1) / kChunk);
    first_item[size_t(s) + 1] = first_item[size_t(s)] + stage_chunks[size_t(s)];
  }
  const int64_t items = first_item[size_t(stages)];
  // Fewer queries than threads: the threads share each query. A lone query's probes are bound by
  // memory latency (misses at random buckets) and a second core doubles the misses in flight:
  // 10M random 64-bit codes, 2 threads sharing from the start against the calling thread alone:
  // 1.37x (k=1), 1.33x (k=10), 1.18x (k=100) faster (medians of per-query ratios, interleaved),
  // despite waking the other thread each time.
  const int parts = int(std::max<int64_t>(1, threads / p.nq));
  // A lone query starts on the calling thread alone and calls the others in only if it is still
  // running after serial_start_us: most queries on clustered codes end sooner than waking another
  // thread and agreeing with it on when to stop would pay for. Against sharing from the start
  // (in-process A/B, 2 threads, k=10 unless said), 20 us: 10M random 64-bit codes 1.14x (1.09x at
  // k=100), fashion-cnn 1M 1.88x; 15 and 30 us: random 1.26x and 1.19x, 10M LSH-clustered 2.0x
  // and 2.2x, fashion-cnn 1.47x and 1.65x; 10 us: random 1.26x, fashion-cnn 1.45x; 40 us:
  // random 0.94x, fashion-cnn 1.71x.
  const auto serial_for = std::chrono::microseconds(std::max(0, p.serial_start_us));

  struct Shared {
    std::vector<std::atomic<int64_t>> chunks_done;  // per stage
    std::atomic<int64_t> next_item{0};
    std::atomic<bool> done{false};
  };
  // What one thread working on a query keeps. Its counts and bound are written by that thread
  // alone (on their own cache lines) and read by the query's other parts: shared counters would
  // bounce between the cores on every hit.
  struct Part {
    std::vector<uint64_t> found;  // (distance, met_at) of codes met within the bound
    std::vector<int64_t> count_at;  // found codes per distance
    int32_t own_bound = 0;  // the k-th smallest distance this part has met
    int64_t within = 0;     // this part's codes met at distance <= own_bound
    int covered = -1;       // stages 0..covered are done (as far as this part has looked)
    std::unique_ptr<std::atomic<int64_t>[]> published_count_at;  // a copy the other parts read
    std::unique_ptr<std::atomic<int32_t>> published_bound;       // this part's k-th distance
  };
  std::vector<Shared> shared(size_t(p.nq));
  std::vector<Part> part_state(size_t(p.nq * parts));
  std::vector<Probe> probes(static_cast<size_t>(threads));
  for (auto& pr : probes) pr.t = &t;
  for (auto& sh : shared) {
    sh.chunks_done = std::vector<std::atomic<int64_t>>(size_t(stages));
    for (auto& c : sh.chunks_done) c.store(0, std::memory_order_relaxed);
  }
  for (auto& ps : part_state) {
    ps.own_bound = max_distance;
    ps.count_at.assign(size_t(max_distance + 1), 0);
    ps.published_count_at.reset(new std::atomic<int64_t>[size_t(max_distance + 1)]);
    for (int d = 0; d <= max_distance; ++d) ps.published_count_at[size_t(d)].store(0, std::memory_order_relaxed);
    ps.published_bound.reset(new std::atomic<int32_t>(max_distance));
  }

  // Works on part `task` of query task / parts until the query is done, or (`until`, on the
  // calling thread alone) until that time has passed.
  auto work = [&](int64_t task, int thread, const std::chrono::steady_clock::time_point* until) {
    const int64_t qi = task / parts;
    Shared& sh = shared[size_t(qi)];
    Part& ps = part_state[size_t(task)];
    Part* siblings = part_state.data() + qi * parts;
    Probe& pr = probes[size_t(thread)];
    pr.set_query(p.queries + qi * t.code_bytes);
    int32_t& own_bound = ps.own_bound;
    int64_t& within = ps.within;
    int& covered = ps.covered;
    // Codes farther than any part's k-th distance cannot make the top k: filter by the smallest.
    int32_t bound = own_bound;
    auto refresh_bound = [&]() {
      for (int j = 0; j < parts; ++j)
        bound = std::min(bound, siblings[j].published_bound->load(std::memory_order_relaxed));
    };
    auto hit = [&](int32_t d, int64_t where) {
      ps.found.push_back(pack_key(d, where));
      ps.published_count_at[size_t(d)].store(++ps.count_at[size_t(d)], std::memory_order_relaxed);
      ++within;
      const int32_t before = own_bound;
      while (within >= p.k && within - ps.count_at[size_t(own_bound)] >= p.k)
        within -= ps.count_at[size_t(own_bound--)];
      if (own_bound != before) {
        ps.published_bound->store(own_bound, std::memory_order_relaxed);
        bound = std::min(bound, own_bound);
      }
    };
    while (!sh.done.load(std::memory_order_acquire)) {
      if (until && std::chrono::steady_clock::now() >= *until) return;
      const int64_t item = sh.next_item.fetch_add(1, std::memory_order_relaxed);
      if (item >= items) break;
      const int stage = int(std::upper_bound(first_item.begin(), first_item.end(), item) - first_item.begin()) - 1;
      const uint64_t chunk = uint64_t(item - first_item[size_t(stage)]);
      const uint64_t masks = masks_with(t.tables[size_t(stage % m)].bits, stage / m);
      if (parts > 1) refresh_bound();
      pr.probe(stage % m, stage / m, &bound, hit, chunk * kChunk, std::min(masks, (chunk + 1) * kChunk));
      sh.chunks_done[size_t(stage)].fetch_add(1, std::memory_order_acq_rel);
      while (covered + 1 < stages &&
             sh.chunks_done[size_t(covered + 1)].load(std::memory_order_acquire) == stage_chunks[size_t(covered + 1)])
        ++covered;
      if (covered < 0) continue;
      int64_t known = 0;
      for (int j = 0; j < parts; ++j)
        for (int d = 0; d <= std::min(covered, max_distance) && known < p.k; ++d)
          known += siblings[j].published_count_at[size_t(d)].load(std::memory_order_relaxed);
      if (known >= p.k) sh.done.store(true, std::memory_order_release);
    }
  };
  if (p.nq == 1 && parts > 1 && serial_for.count() > 0) {
    const auto until = std::chrono::steady_clock::now() + serial_for;
    work(0, 0, &until);
  }
  if (!shared[0].done.load(std::memory_order_acquire))
    run_tasks(par, p.nq * parts, [&](int64_t task, int thread) { work(task, thread, nullptr); });

  // Every code within the k-th distance has been met by some part; merge, keep, sort.
  run_tasks(par, p.nq, [&](int64_t qi, int) {
    std::vector<uint64_t>& all = part_state[size_t(qi * parts)].found;
    for (int j = 1; j < parts; ++j) {
      auto& more = part_state[size_t(qi * parts + j)].found;
      all.insert(all.end(), more.begin(), more.end());
      std::vector<uint64_t>().swap(more);
    }
    std::vector<int64_t> count_at(size_t(max_distance + 1), 0);
    for (uint64_t key : all) ++count_at[size_t(key_distance(key))];
    int32_t kth = 0;
    for (int64_t seen = 0; (seen += count_at[size_t(kth)]) < p.k;) ++kth;
    int64_t kept = 0;
    for (uint64_t key : all)
      if (key_distance(key) <= kth) all[size_t(kept++)] = key;
    resolve_positions(t, all.data(), kept);
    sort_by_distance_then_label(all.data(), kept, labels);
    int32_t* dist = p.out_distances + qi * p.k;
    int64_t* ids = p.out_ids + qi * p.k;
    for (int64_t j = 0; j < p.k; ++j) {
      dist[j] = key_distance(all[size_t(j)]);
      ids[j] = labels(key_pos(all[size_t(j)]));
    }
    std::vector<uint64_t>().swap(all);
  });
  if (p.stats) {
    for (const auto& pr : probes) {
      p.stats->buckets += pr.stats.buckets;
      p.stats->candidates += pr.stats.candidates;
      p.stats->survivors += pr.stats.survivors;
    }
  }
}

void run_mih_range(const MihRangeParams& p, Parallel& par, HammingRangeResult* out) {
  const MihTables& t = *p.tables;
  const Labels labels{p.ids, p.ids == nullptr};
  const int m = int(t.tables.size());
  const int widest = max_table_bits(t);
  const int threads = std::max(1, par.threads());
  out->lims.assign(size_t(p.nq + 1), 0);
  out->distances.clear();
  out->ids.clear();
  if (p.nq == 0 || t.n == 0 || p.radius < 0) return;
  const int32_t radius = std::min(p.radius, t.code_bytes * 8);
  std::vector<std::vector<uint64_t>> per_query(size_t(p.nq));
  std::vector<Probe> probes(static_cast<size_t>(threads));
  for (auto& pr : probes) pr.t = &t;
  run_tasks(par, p.nq, [&](int64_t qi, int thread) {
    Probe& pr = probes[size_t(thread)];
    pr.set_query(p.queries + qi * t.code_bytes);
    auto& found = per_query[size_t(qi)];
    auto hit = [&](int32_t d, int64_t where) { found.push_back(pack_key(d, where)); };
    // Probe (sub_radius, table) in order until every code within `radius` has been met.
    bool done = false;
    for (int sub = 0; sub <= widest && !done; ++sub) {
      for (int i = 0; i < m && !done; ++i) {
        pr.probe(i, sub, &radius, hit, 0, masks_with(t.tables[size_t(i)].bits, sub));
        done = m * sub + i >= radius;
      }
    }
    resolve_positions(t, found.data(), int64_t(found.size()));
    sort_by_distance_then_label(found.data(), int64_t(found.size()), labels);
  });
  for (int64_t q = 0; q < p.nq; ++q)
    out->lims[size_t(q + 1)] = out->lims[size_t(q)] + int64_t(per_query[size_t(q)].size());
  out->distances.resize(size_t(out->lims[size_t(p.nq)]));
  out->ids.resize(size_t(out->lims[size_t(p.nq)]));
  for (int64_t q = 0; q < p.nq; ++q) {
    auto& found = per_query[size_t(q)];
    const size_t base = size_t(out->lims[size_t(q)]);
    for (size_t j = 0; j < found.size(); ++j) {
      out->distances[base + j] = key_distance(found[j]);
      out->ids[base + j] = labels(key_pos(found[j]));
    }
    std::vector<uint64_t>().swap(found);
  }
  if (p.stats) {
    for (const auto& pr : probes) {
      p.stats->buckets += pr.stats.buckets;
      p.stats->candidates += pr.stats.candidates;
      p.stats->survivors += pr.stats.survivors;
    }
  }
}

}  // namespace cbir::cpu
