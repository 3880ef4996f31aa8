// Flat Hamming search: work split, tile layout, counting top-k and result assembly. The SIMD tile
// scans live in hamming_avx2.cpp and hamming_avx512.cpp.
#include "cpu/hamming.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace cbir::cpu {
using hamming_detail::CandidateSink;
using hamming_detail::kVectorBytes;
using hamming_detail::ScanArgs;

namespace {

// ---- which SIMD path runs ----
enum IsaChoice : int { kIsaAuto = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
std::atomic<int> g_isa_choice{kIsaAuto};

bool cpu_avx512() {
  static const bool has = hamming_detail::cpu_has_avx512_vpopcntdq();
  return has;
}

bool use_avx512() {
  const int choice = g_isa_choice.load(std::memory_order_relaxed);
  return choice == kIsaAvx512 || (choice == kIsaAuto && cpu_avx512());
}

// ---- code shape ----
struct Shape {
  int code_bytes = 0;
  int lane_bytes = 0;  // 4 for codes of at most 32 bits, else 8
  int words = 0;       // lane words per code
  int lanes = 0;       // codes per 64-byte vector
  int max_distance = 0;
  bool direct = false;  // row-major codes already are the scan layout (one whole word per code)
  int64_t tile_codes = 0;
};

Shape make_shape(int code_bytes) {
  Shape s;
  s.code_bytes = code_bytes;
  s.lane_bytes = code_bytes <= 4 ? 4 : 8;
  s.words = (code_bytes + s.lane_bytes - 1) / s.lane_bytes;
  s.lanes = kVectorBytes / s.lane_bytes;
  s.max_distance = code_bytes * 8;
  s.direct = code_bytes == s.lane_bytes;
  // About 16 KiB of codes per tile: it stays in L1 while every query of a group reads it.
  const int64_t code_scan_bytes = int64_t(s.words) * s.lane_bytes;
  s.tile_codes = std::max<int64_t>(4 * s.lanes, (16384 / code_scan_bytes) / s.lanes * s.lanes);
  return s;
}

// One code as lane words, the last one zero padded (x86 is little-endian: byte j of the code is
// byte j % lane_bytes of word j / lane_bytes, as the house layout says).
void code_to_words(const Shape& s, const uint8_t* code, uint64_t* out) {
  for (int w = 0; w < s.words; ++w) {
    const int offset = w * s.lane_bytes;
    const int len = std::min(s.lane_bytes, s.code_bytes - offset);
    uint64_t v = 0;
    std::memcpy(&v, code + offset, size_t(len));
    out[w] = v;
  }
}

// Copies codes [start, start + count) of the n-code database into the scan layout at `out`, zero
// padding the last block; returns the number of blocks.
int64_t load_tile(const Shape& s, const uint8_t* db, int64_t n, int64_t start, int64_t count, uint8_t* out,
                  bool avx512) {
  const int64_t blocks = (count + s.lanes - 1) / s.lanes;
  const uint8_t* src = db + start * s.code_bytes;
  if (s.lane_bytes == 4) {
    uint32_t* dst = reinterpret_cast<uint32_t*>(out);  // one word per code, 16 lanes per block
    for (int64_t c = 0; c < count; ++c) {
      uint32_t v = 0;
      std::memcpy(&v, src + c * s.code_bytes, size_t(s.code_bytes));
      dst[c] = v;
    }
    for (int64_t c = count; c < blocks * 16; ++c) dst[c] = 0;
    return blocks;
  }
  uint64_t* dst = reinterpret_cast<uint64_t*>(out);
  const int words = s.words;
  const int full_words = s.code_bytes / 8;
  int64_t c = 0;
  if (avx512 && full_words == words)
    c = hamming_detail::transpose_tile_avx512(src, count, words, dst);  // whole blocks of 8
  const int tail_bytes = s.code_bytes - full_words * 8;
  const uint64_t tail_mask = tail_bytes ? (uint64_t(1) << (8 * tail_bytes)) - 1 : 0;
  for (; c < count; ++c) {
    uint64_t* lane = dst + (c / 8) * words * 8 + (c % 8);
    const uint8_t* code = src + c * s.code_bytes;
    for (int w = 0; w < full_words; ++w) {
      uint64_t v;
      std::memcpy(&v, code + w * 8, 8);
      lane[w * 8] = v;
    }
    if (tail_bytes) {
      uint64_t v = 0;
      // Read a whole word and mask it while another code follows in memory (the over-read
      // stays inside the database); the very last code copies its tail bytes alone.
      if (start + c + 1 < n) {
        std::memcpy(&v, code + full_words * 8, 8);
        v &= tail_mask;
      } else {
        std::memcpy(&v, code + full_words * 8, size_t(tail_bytes));
      }
      lane[full_words * 8] = v;
    }
  }
  for (int64_t p = count; p < blocks * 8; ++p)
    for (int w = 0; w < words; ++w) dst[(p / 8) * words * 8 + w * 8 + (p % 8)] = 0;
  return blocks;
}

// ---- candidate keys: (distance, position) packed so that integer order is (distance, position) ----
constexpr int kPosBits = 40;
constexpr uint64_t kPosMask = (uint64_t(1) << kPosBits) - 1;
inline uint64_t pack_key(int32_t d, int64_t pos) { return (uint64_t(uint32_t(d)) << kPosBits) | uint64_t(pos); }
inline int32_t key_distance(uint64_t key) { return int32_t(key >> kPosBits); }
inline int64_t key_pos(uint64_t key) { return int64_t(key & kPosMask); }

struct Labels {
  const int64_t* ids = nullptr;
  bool ascending = true;  // labels increase with position
  int64_t operator()(int64_t pos) const { return ids ? ids[pos] : pos; }
};

struct Cut {
  int32_t kth = 0;            // distance of the k-th kept code
  int64_t kth_label_max = 0;  // largest label kept at that distance (labels out of position order)
};

// Keeps the k best of keys[0, m) (m > k) by (distance, label) in keys[0, k). A histogram of the
// small integer distances gives the k-th distance in one pass; everything closer stays, and of the
// codes at exactly that distance the smallest labels stay. With labels in position order, `keys`
// must be in position order within each distance (it is: scans append in position order), so the
// first ties met are the ones to keep and the order survives the cut.
Cut cut_to_k(uint64_t* keys, int64_t m, int64_t k, int max_distance, int64_t* hist, uint64_t* ties,
             const Labels& labels) {
  std::fill(hist, hist + max_distance + 1, int64_t(0));
  for (int64_t i = 0; i < m; ++i) ++hist[key_distance(keys[i])];
  int32_t kth = 0;
  int64_t closer = 0;
  while (closer + hist[kth] < k) closer += hist[kth++];
  int64_t ties_wanted = k - closer;
  Cut cut;
  cut.kth = kth;
  int64_t kept = 0;
  if (labels.ascending) {
    for (int64_t i = 0; i < m; ++i) {
      const int32_t d = key_distance(keys[i]);
      if (d < kth || (d == kth && ties_wanted > 0)) {
        if (d == kth) --ties_wanted;
        keys[kept++] = keys[i];
      }
    }
    return cut;
  }
  int64_t nties = 0;
  for (int64_t i = 0; i < m; ++i) {
    const int32_t d = key_distance(keys[i]);
    if (d < kth) keys[kept++] = keys[i];
    else if (d == kth) ties[nties++] = keys[i];
  }
  auto by_label = [&](uint64_t a, uint64_t b) { return labels(key_pos(a)) < labels(key_pos(b)); };
  std::nth_element(ties, ties + (ties_wanted - 1), ties + nties, by_label);
  cut.kth_label_max = labels(key_pos(ties[ties_wanted - 1]));
  std::copy(ties, ties + ties_wanted, keys + kept);
  return cut;
}

void sort_by_distance_then_label(uint64_t* keys, int64_t m, const Labels& labels) {
  if (labels.ascending) {
    std::sort(keys, keys + m);  // (distance, position) order is (distance, label) order
    return;
  }
  std::sort(keys, keys + m, [&](uint64_t a, uint64_t b) {
    const int32_t da = key_distance(a), db = key_distance(b);
    if (da != db) return da < db;
    return labels(key_pos(a)) < labels(key_pos(b));
  });
}

// Hamming distance between two codes, plain popcounts (for short runs outside the SIMD scan).
inline int32_t code_distance(const uint8_t* a, const uint8_t* b, int code_bytes) {
  int32_t d = 0;
  int j = 0;
  for (; j + 8 <= code_bytes; j += 8) {
    uint64_t x, y;
    std::memcpy(&x, a + j, 8);
    std::memcpy(&y, b + j, 8);
    d += __builtin_popcountll(x ^ y);
  }
  for (; j < code_bytes; ++j) d += __builtin_popcount(unsigned(a[j] ^ b[j]));
  return d;
}

// ---- work split ----
struct Split {
  int64_t group_size = 1;
  int64_t groups = 1;
  int64_t splits = 1;
  int64_t split_codes = 0;  // multiple of the lanes, so direct tiles stay whole blocks
};

Split plan_split(const Shape& s, int64_t n, int64_t nq, int threads, int64_t per_query_bytes,
                 int64_t partial_bytes_per_split) {
  Split sp;
  // Up to 32 queries share each tile; fewer when each query's buffer is large (large k), and
  // few enough that every thread gets a group when there are enough queries.
  const int64_t by_memory = std::max<int64_t>(1, (int64_t(8) << 20) / std::max<int64_t>(1, per_query_bytes));
  sp.group_size = std::max<int64_t>(1, std::min<int64_t>({32, by_memory, (nq + threads - 1) / threads}));
  sp.groups = (nq + sp.group_size - 1) / sp.group_size;
  // Few groups: split the database too (each split at least 4 tiles), so all threads work.
  int64_t splits = threads > 1 ? (2 * threads + sp.groups - 1) / sp.groups : 1;
  splits = std::min(splits, std::max<int64_t>(1, n / (4 * s.tile_codes)));
  if (partial_bytes_per_split > 0)
    splits = std::min(splits, std::max<int64_t>(1, (int64_t(256) << 20) / partial_bytes_per_split));
  sp.splits = std::max<int64_t>(1, splits);
  const int64_t per_split = (n + sp.splits - 1) / sp.splits;
  sp.split_codes = (per_split + s.lanes - 1) / s.lanes * s.lanes;
  return sp;
}

// Runs fn over tasks, rethrowing the first exception a task threw (a worker must not unwind).
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

// Scans database positions [begin, end) for `queries` queries whose lane words are `qwords`,
// feeding `sink` (which numbers queries from the register block it is given via set_base).
template <typename Sink>
void scan_range(const Shape& s, const uint8_t* db, int64_t n, int64_t begin, int64_t end, const uint64_t* qwords,
                int64_t queries, int32_t* accept_max, Sink& sink, uint8_t* tile_buffer, uint64_t* candidates) {
  const bool avx512 = use_avx512();
  const int lane_bits = s.lane_bytes * 8;
  const int best_r = avx512 ? hamming_detail::register_queries_avx512(lane_bits, s.words)
                            : hamming_detail::register_queries_avx2(lane_bits, s.words);
  for (int64_t t0 = begin; t0 < end; t0 += s.tile_codes) {
    const int64_t count = std::min(s.tile_codes, end - t0);
    ScanArgs args;
    if (s.direct && count % s.lanes == 0) {
      args.tile = db + t0 * s.code_bytes;
      args.blocks = count / s.lanes;
    } else {
      args.blocks = load_tile(s, db, n, t0, count, tile_buffer, avx512);
      args.tile = tile_buffer;
    }
    args.first_pos = t0;
    args.end_pos = t0 + count;
    args.words = s.words;
    args.sink = &sink;
    args.candidates = candidates;
    for (int64_t r0 = 0; r0 < queries;) {
      const int64_t left = queries - r0;
      int r = best_r;
      while (r > left) r /= 2;
      args.query_words = qwords + r0 * s.words;
      args.accept_max = accept_max + r0;
      sink.set_base(int(r0));
      if (avx512) hamming_detail::scan_tile_avx512(args, lane_bits, r);
      else hamming_detail::scan_tile_avx2(args, lane_bits, r);
      r0 += r;
    }
  }
}

// Per-query candidate buffers of one group, cut back to k by counting whenever one fills.
class KnnCollector final : public CandidateSink {
 public:
  KnnCollector(int64_t k, int64_t cap, int max_distance, const Labels& labels, uint64_t* keys,
               int64_t* sizes, int32_t* accept_max, int64_t* tie_label_max, int64_t* hist, uint64_t* ties)
      : k_(k), cap_(cap), max_distance_(max_distance), labels_(labels), keys_(keys), sizes_(sizes),
        accept_max_(accept_max), tie_label_max_(tie_label_max), hist_(hist), ties_(ties) {}

  void reset(int64_t queries) {
    for (int64_t q = 0; q < queries; ++q) {
      sizes_[q] = 0;
      accept_max_[q] = max_distance_;
      tie_label_max_[q] = INT64_MAX;
    }
  }
  void set_base(int base) { base_ = base; }

  void take(const uint64_t* candidates, int64_t count) override {
    for (int64_t i = 0; i < count; ++i) {
      const uint64_t c = candidates[i];
      const int64_t q = base_ + hamming_detail::candidate_query(c);
      const int32_t d = hamming_detail::candidate_distance(c);
      const int64_t pos = hamming_detail::candidate_pos(c);
      if (d > accept_max_[q]) continue;  // the limit may have dropped since the scan passed it
      // Labels out of position order: a code tying the k-th distance enters only with a smaller
      // label.
      if (!labels_.ascending && d == accept_max_[q] && labels_(pos) > tie_label_max_[q]) continue;
      uint64_t* keys = keys_ + q * cap_;
      keys[sizes_[q]++] = pack_key(d, pos);
      if (sizes_[q] == cap_) shrink(q);
    }
  }

  // Fills query q's empty buffer with the k best of positions [first, last) (more than k of
  // them), found by counting in `scratch` (room for last - first keys), and sets its limit.
  void seed(int64_t q, const uint8_t* query, const uint8_t* db, int64_t first, int64_t last, int code_bytes,
            uint64_t* scratch) {
    for (int64_t pos = first; pos < last; ++pos)
      scratch[pos - first] = pack_key(code_distance(query, db + pos * code_bytes, code_bytes), pos);
    const Cut cut = cut_to_k(scratch, last - first, k_, max_distance_, hist_, ties_, labels_);
    std::copy(scratch, scratch + k_, keys_ + q * cap_);
    sizes_[q] = k_;
    limit_after(q, cut);
  }

  // Cuts query q's candidates to at most k and sorts them by (distance, label).
  int64_t finish(int64_t q) {
    uint64_t* keys = keys_ + q * cap_;
    if (sizes_[q] > k_) shrink(q);
    sort_by_distance_then_label(keys, sizes_[q], labels_);
    return sizes_[q];
  }
  const uint64_t* keys(int64_t q) const { return keys_ + q * cap_; }

 private:
  void shrink(int64_t q) {
    const Cut cut = cut_to_k(keys_ + q * cap_, sizes_[q], k_, max_distance_, hist_, ties_, labels_);
    sizes_[q] = k_;
    limit_after(q, cut);
  }
  void limit_after(int64_t q, const Cut& cut) {
    // With labels in position order a later code must be strictly closer to enter.
    accept_max_[q] = labels_.ascending ? cut.kth - 1 : cut.kth;
    tie_label_max_[q] = cut.kth_label_max;
  }

  int64_t k_, cap_;
  int max_distance_;
  Labels labels_;
  uint64_t* keys_;
  int64_t* sizes_;
  int32_t* accept_max_;
  int64_t* tie_label_max_;
  int64_t* hist_;
  uint64_t* ties_;
  int base_ = 0;
};

// Everything one thread needs for a group of queries, allocated before the parallel run.
struct KnnScratch {
  std::vector<uint64_t> keys, ties, qwords, seed, candidates;
  std::vector<int64_t> sizes, tie_label_max, hist;
  std::vector<int32_t> accept_max;
  std::vector<uint8_t> tile;
};

void write_results(const uint64_t* keys, int64_t count, const Labels& labels, int64_t k, int32_t* dist,
                   int64_t* ids) {
  for (int64_t j = 0; j < count && j < k; ++j) {
    dist[j] = key_distance(keys[j]);
    ids[j] = labels(key_pos(keys[j]));
  }
}

}  // namespace

const char* hamming_isa() { return use_avx512() ? "avx512-vpopcntdq" : "avx2"; }

bool hamming_set_isa(const char* name) {
  const std::string n = name ? name : "";
  if (n == "auto") g_isa_choice = kIsaAuto;
  else if (n == "avx2") g_isa_choice = kIsaAvx2;
  else if (n == "avx512-vpopcntdq" && cpu_avx512()) g_isa_choice = kIsaAvx512;
  else return false;
  return true;
}

void run_hamming_knn(const HammingKnnParams& p, Parallel& par) {
  if (p.k < 1 || p.k > p.n) throw std::invalid_argument("hamming knn: k must be in [1, n]");
  if (p.n >= (int64_t(1) << kPosBits)) throw std::invalid_argument("hamming knn: too many codes");
  if (p.code_bytes * 8 > hamming_detail::kMaxCodeBits) throw std::invalid_argument("hamming knn: codes too long");
  if (p.nq == 0) return;
  const Shape s = make_shape(p.code_bytes);
  const Labels labels{p.ids, p.ids == nullptr || p.ids_ascending};
  const int threads = std::max(1, par.threads());
  // A buffer of 2k + 64 means a cut (linear in the buffer) at most every k + 64 new candidates;
  // it also holds the first tile's codes when they seed the limits (below).
  const int64_t seed_codes = p.k < s.tile_codes / 2 ? s.tile_codes : 0;
  const int64_t cap = 2 * p.k + 64;
  const Split sp = plan_split(s, p.n, p.nq, threads, cap * 8, p.nq * p.k * 8);

  std::vector<KnnScratch> scratch(static_cast<size_t>(threads));
  for (auto& sc : scratch) {
    sc.keys.resize(size_t(sp.group_size * cap));
    sc.ties.resize(size_t(std::max({cap, sp.splits * p.k, seed_codes})));
    sc.seed.resize(size_t(seed_codes));
    sc.candidates.resize(size_t(hamming_detail::kCandidateBuffer));
    sc.qwords.resize(size_t(sp.group_size * s.words));
    sc.sizes.resize(size_t(sp.group_size));
    sc.tie_label_max.resize(size_t(sp.group_size));
    sc.accept_max.resize(size_t(sp.group_size));
    sc.hist.resize(size_t(s.max_distance + 1));
    sc.tile.resize(size_t(s.tile_codes * s.words * s.lane_bytes + kVectorBytes));
  }
  // With several splits, each (split, query) keeps its best k here, merged afterwards.
  std::vector<uint64_t> partial;
  std::vector<int64_t> partial_size;
  if (sp.splits > 1) {
    partial.resize(size_t(sp.splits * p.nq * p.k));
    partial_size.resize(size_t(sp.splits * p.nq));
  }

  run_tasks(par, sp.groups * sp.splits, [&](int64_t task, int thread) {
    KnnScratch& sc = scratch[size_t(thread)];
    const int64_t group = task / sp.splits, split = task % sp.splits;
    const int64_t q0 = group * sp.group_size;
    const int64_t queries = std::min(sp.group_size, p.nq - q0);
    const int64_t begin = std::min(p.n, split * sp.split_codes);
    const int64_t end = std::min(p.n, begin + sp.split_codes);
    for (int64_t q = 0; q < queries; ++q)
      code_to_words(s, p.queries + (q0 + q) * p.code_bytes, sc.qwords.data() + q * s.words);
    KnnCollector collector(p.k, cap, s.max_distance, labels, sc.keys.data(), sc.sizes.data(),
                           sc.accept_max.data(), sc.tie_label_max.data(), sc.hist.data(), sc.ties.data());
    collector.reset(queries);
    // Seed: every code of the first tile goes in, then one cut gives each query the k-th
    // distance of a whole tile as its limit. Starting from "anything passes" instead, the limit
    // would tighten one candidate at a time, each through the scan's slow path.
    int64_t scan_begin = begin;
    if (seed_codes > 0 && end - begin > seed_codes) {
      scan_begin = begin + seed_codes;
      for (int64_t q = 0; q < queries; ++q)
        collector.seed(q, p.queries + (q0 + q) * p.code_bytes, p.db, begin, scan_begin, p.code_bytes,
                       sc.seed.data());
    }
    scan_range(s, p.db, p.n, scan_begin, end, sc.qwords.data(), queries, sc.accept_max.data(), collector,
               sc.tile.data(), sc.candidates.data());
    for (int64_t q = 0; q < queries; ++q) {
      const int64_t count = collector.finish(q);
      if (sp.splits == 1) {
        write_results(collector.keys(q), count, labels, p.k, p.out_distances + (q0 + q) * p.k,
                      p.out_ids + (q0 + q) * p.k);
      } else {
        const int64_t slot = split * p.nq + q0 + q;
        std::copy(collector.keys(q), collector.keys(q) + count, partial.data() + slot * p.k);
        partial_size[size_t(slot)] = count;
      }
    }
  });
  if (sp.splits == 1) return;

  // Merge the splits: their lists in split (= position) order, cut to k, sorted.
  run_tasks(par, p.nq, [&](int64_t q, int thread) {
    KnnScratch& sc = scratch[size_t(thread)];
    uint64_t* merged = sc.ties.data();
    int64_t m = 0;
    for (int64_t split = 0; split < sp.splits; ++split) {
      const int64_t slot = split * p.nq + q;
      const uint64_t* src = partial.data() + slot * p.k;
      std::copy(src, src + partial_size[size_t(slot)], merged + m);
      m += partial_size[size_t(slot)];
    }
    if (m > p.k) {
      std::vector<uint64_t> ties(static_cast<size_t>(m));
      cut_to_k(merged, m, p.k, s.max_distance, sc.hist.data(), ties.data(), labels);
      m = p.k;
    }
    sort_by_distance_then_label(merged, m, labels);
    write_results(merged, m, labels, p.k, p.out_distances + q * p.k, p.out_ids + q * p.k);
  });
}

namespace {

// Collects every code within the radius, per query of a group.
class RangeCollector final : public CandidateSink {
 public:
  explicit RangeCollector(std::vector<uint64_t>* lists) : lists_(lists) {}
  void set_base(int base) { base_ = base; }
  void take(const uint64_t* candidates, int64_t count) override {
    for (int64_t i = 0; i < count; ++i) {
      const uint64_t c = candidates[i];
      lists_[base_ + hamming_detail::candidate_query(c)].push_back(
          pack_key(hamming_detail::candidate_distance(c), hamming_detail::candidate_pos(c)));
    }
  }

 private:
  std::vector<uint64_t>* lists_;
  int base_ = 0;
};

}  // namespace

void run_hamming_range(const HammingRangeParams& p, Parallel& par, HammingRangeResult* out) {
  if (p.n >= (int64_t(1) << kPosBits)) throw std::invalid_argument("hamming range: too many codes");
  if (p.code_bytes * 8 > hamming_detail::kMaxCodeBits) throw std::invalid_argument("hamming range: codes too long");
  out->lims.assign(size_t(p.nq + 1), 0);
  out->distances.clear();
  out->ids.clear();
  if (p.nq == 0 || p.n == 0 || p.radius < 0) return;
  const Shape s = make_shape(p.code_bytes);
  const Labels labels{p.ids, p.ids == nullptr};
  const int threads = std::max(1, par.threads());
  const Split sp = plan_split(s, p.n, p.nq, threads, 0, 0);
  // lists[split * nq + q]: query q's codes in that split, in position order.
  std::vector<std::vector<uint64_t>> lists(size_t(sp.splits * p.nq));
  struct Scratch {
    std::vector<uint64_t> qwords, candidates;
    std::vector<int32_t> accept_max;
    std::vector<uint8_t> tile;
  };
  std::vector<Scratch> scratch(static_cast<size_t>(threads));
  for (auto& sc : scratch) {
    sc.qwords.resize(size_t(sp.group_size * s.words));
    sc.accept_max.assign(size_t(sp.group_size), std::min(p.radius, s.max_distance));
    sc.candidates.resize(size_t(hamming_detail::kCandidateBuffer));
    sc.tile.resize(size_t(s.tile_codes * s.words * s.lane_bytes + kVectorBytes));
  }
  run_tasks(par, sp.groups * sp.splits, [&](int64_t task, int thread) {
    Scratch& sc = scratch[size_t(thread)];
    const int64_t group = task / sp.splits, split = task % sp.splits;
    const int64_t q0 = group * sp.group_size;
    const int64_t queries = std::min(sp.group_size, p.nq - q0);
    const int64_t begin = std::min(p.n, split * sp.split_codes);
    const int64_t end = std::min(p.n, begin + sp.split_codes);
    for (int64_t q = 0; q < queries; ++q)
      code_to_words(s, p.queries + (q0 + q) * p.code_bytes, sc.qwords.data() + q * s.words);
    RangeCollector collector(lists.data() + split * p.nq + q0);
    scan_range(s, p.db, p.n, begin, end, sc.qwords.data(), queries, sc.accept_max.data(), collector,
               sc.tile.data(), sc.candidates.data());
  });
  for (int64_t q = 0; q < p.nq; ++q) {
    int64_t count = 0;
    for (int64_t split = 0; split < sp.splits; ++split) count += int64_t(lists[size_t(split * p.nq + q)].size());
    out->lims[size_t(q + 1)] = out->lims[size_t(q)] + count;
  }
  const int64_t total = out->lims[size_t(p.nq)];
  out->distances.resize(size_t(total));
  out->ids.resize(size_t(total));
  run_tasks(par, p.nq, [&](int64_t q, int) {
    std::vector<uint64_t> keys;
    keys.reserve(size_t(out->lims[size_t(q + 1)] - out->lims[size_t(q)]));
    for (int64_t split = 0; split < sp.splits; ++split) {
      auto& list = lists[size_t(split * p.nq + q)];
      keys.insert(keys.end(), list.begin(), list.end());
      std::vector<uint64_t>().swap(list);
    }
    sort_by_distance_then_label(keys.data(), int64_t(keys.size()), labels);
    const int64_t base = out->lims[size_t(q)];
    for (size_t j = 0; j < keys.size(); ++j) {
      out->distances[size_t(base) + j] = key_distance(keys[j]);
      out->ids[size_t(base) + j] = labels(key_pos(keys[j]));
    }
  });
}

void run_hamming_distances(const uint8_t* db, int64_t n, const uint8_t* queries, int64_t nq,
                           int code_bytes, int32_t* out, Parallel& par) {
  run_tasks(par, nq, [&](int64_t q, int) {
    const uint8_t* qc = queries + q * code_bytes;
    for (int64_t i = 0; i < n; ++i) out[q * n + i] = code_distance(qc, db + i * code_bytes, code_bytes);
  });
}

}  // namespace cbir::cpu
