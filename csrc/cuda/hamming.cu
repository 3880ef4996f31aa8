// Hamming k-NN on the GPU by counting; see hamming.h for the contract and the passes.
#include "cuda/hamming.h"

#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;        // threads per block
constexpr int kCodesPerThread = 4;   // codes each thread handles per tile
constexpr int kTile = kThreads * kCodesPerThread;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

// Queries per block: their histograms (bits + 1 ints each) share at most 32 KiB of shared memory.
int queries_per_block(int bits) {
  const int per = (8192 / (bits + 1));
  return per < 1 ? 1 : (per > 8 ? 8 : per);
}

size_t align_up(size_t x) { return (x + 255) / 256 * 256; }

// One database code's words: in registers when the word count is a compile-time constant,
// read from global memory each time otherwise.
template <int W>
struct Code {
  uint32_t w[W > 0 ? W : 1];
  const uint32_t* db;
  int n, words, c;
  __device__ __forceinline__ void load(const uint32_t* db_, int n_, int words_, int c_) {
    db = db_, n = n_, words = words_, c = c_;
    if (W > 0) {
#pragma unroll
      for (int i = 0; i < W; ++i) w[i] = __ldg(db + size_t(i) * n + c);
    }
  }
  __device__ __forceinline__ int distance(const uint32_t* q) const {
    int d = 0;
    if (W > 0) {
#pragma unroll
      for (int i = 0; i < W; ++i) d += __popc(w[i] ^ q[i]);
    } else {
      for (int i = 0; i < words; ++i) d += __popc(__ldg(db + size_t(i) * n + c) ^ q[i]);
    }
    return d;
  }
};

// Copies this block's queries to shared memory; returns how many the block has.
__device__ int load_queries(const uint32_t* queries, int nq, int words, int bq, uint32_t* qs) {
  const int q0 = blockIdx.y * bq;
  const int count = min(bq, nq - q0);
  for (int i = threadIdx.x; i < count * words; i += blockDim.x) qs[i] = queries[size_t(q0) * words + i];
  return count;
}

template <int W>
__global__ void histogram_kernel(const uint32_t* __restrict__ db, int n, int words, const uint32_t* __restrict__ queries,
                                 int nq, int bq, int nbins, int* __restrict__ hist) {
  extern __shared__ uint32_t smem[];
  uint32_t* qs = smem;
  int* counts = reinterpret_cast<int*>(smem + bq * words);  // [bq][nbins]
  const int nqb = load_queries(queries, nq, words, bq, qs);
  for (int i = threadIdx.x; i < bq * nbins; i += blockDim.x) counts[i] = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  for (int j = 0; j < kCodesPerThread; ++j) {
    const int c = blockIdx.x * kTile + j * kThreads + threadIdx.x;
    const bool valid = c < n;
    Code<W> code;
    if (valid) code.load(db, n, words, c);
    const unsigned active = __ballot_sync(kFull, valid);
    for (int q = 0; q < nqb; ++q) {
      if (valid) {
        const int d = code.distance(qs + q * words);
        // Lanes with the same distance add once: few distinct distances per warp.
        const unsigned peers = __match_any_sync(active, d);
        if (lane == __ffs(peers) - 1) atomicAdd(&counts[q * nbins + d], __popc(peers));
      }
    }
  }
  __syncthreads();
  const int q0 = blockIdx.y * bq;
  for (int i = threadIdx.x; i < nqb * nbins; i += blockDim.x)
    if (counts[i]) atomicAdd(&hist[size_t(q0) * nbins + i], counts[i]);
}

// The k-th distance of each query: the first bin where the running count reaches k.
__global__ void kth_kernel(const int* __restrict__ hist, int nq, int nbins, int k, int* kth, int* closer_total,
                           int* ties_wanted) {
  const int q = blockIdx.x * blockDim.x + threadIdx.x;
  if (q >= nq) return;
  const int* h = hist + size_t(q) * nbins;
  int below = 0, b = 0;
  while (b < nbins - 1 && below + h[b] < k) below += h[b++];
  kth[q] = b;
  closer_total[q] = below;
  ties_wanted[q] = k - below;
}

template <int W>
__global__ void tile_counts_kernel(const uint32_t* __restrict__ db, int n, int words, const uint32_t* __restrict__ queries,
                                   int nq, int bq, const int* __restrict__ kth, int ntiles, int* __restrict__ closer,
                                   int* __restrict__ ties) {
  extern __shared__ uint32_t smem[];
  uint32_t* qs = smem;
  int* sh_kth = reinterpret_cast<int*>(smem + bq * words);
  int* sh_closer = sh_kth + bq;
  int* sh_ties = sh_closer + bq;
  const int nqb = load_queries(queries, nq, words, bq, qs);
  const int q0 = blockIdx.y * bq;
  if (threadIdx.x < nqb) {
    sh_kth[threadIdx.x] = kth[q0 + threadIdx.x];
    sh_closer[threadIdx.x] = 0;
    sh_ties[threadIdx.x] = 0;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  for (int j = 0; j < kCodesPerThread; ++j) {
    const int c = blockIdx.x * kTile + j * kThreads + threadIdx.x;
    const bool valid = c < n;
    Code<W> code;
    if (valid) code.load(db, n, words, c);
    for (int q = 0; q < nqb; ++q) {
      const int d = valid ? code.distance(qs + q * words) : -1;
      const unsigned closer_lanes = __ballot_sync(kFull, valid && d < sh_kth[q]);
      const unsigned tie_lanes = __ballot_sync(kFull, valid && d == sh_kth[q]);
      if (lane == 0) {
        if (closer_lanes) atomicAdd(&sh_closer[q], __popc(closer_lanes));
        if (tie_lanes) atomicAdd(&sh_ties[q], __popc(tie_lanes));
      }
    }
  }
  __syncthreads();
  if (threadIdx.x < nqb) {
    const size_t at = size_t(q0 + threadIdx.x) * ntiles + blockIdx.x;
    closer[at] = sh_closer[threadIdx.x];
    ties[at] = sh_ties[threadIdx.x];
  }
}

// Exclusive prefix sum of v over the block in thread order; *total gets the block's sum.
__device__ int block_exclusive_scan(int v, int* warp_sums, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int s = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(kFull, s, o);
      if (lane >= o) s += y;
    }
    if (lane < kWarps) warp_sums[lane] = s;
  }
  __syncthreads();
  const int before = warp ? warp_sums[warp - 1] : 0;
  *total = warp_sums[kWarps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return before + x - v;
}

// Rows of `ntiles` counts become exclusive offsets (position order over the tiles).
__global__ void row_exclusive_scan_kernel(int* __restrict__ a, int* __restrict__ b, int ntiles) {
  __shared__ int warp_sums[kWarps];
  int* rows[2] = {a + size_t(blockIdx.x) * ntiles, b + size_t(blockIdx.x) * ntiles};
  for (int r = 0; r < 2; ++r) {
    int carry = 0;
    for (int base = 0; base < ntiles; base += kThreads) {
      const int i = base + threadIdx.x;
      const int v = i < ntiles ? rows[r][i] : 0;
      int total;
      const int before = block_exclusive_scan(v, warp_sums, &total);
      if (i < ntiles) rows[r][i] = carry + before;
      carry += total;
    }
  }
}

template <int W>
__global__ void select_kernel(const uint32_t* __restrict__ db, int n, int words, const uint32_t* __restrict__ queries,
                              int nq, int bq, const int* __restrict__ kth, const int* __restrict__ closer_total,
                              const int* __restrict__ ties_wanted, const int* __restrict__ closer_off,
                              const int* __restrict__ ties_off, int ntiles, int k, int32_t* __restrict__ out_d,
                              int64_t* __restrict__ out_p) {
  extern __shared__ uint32_t smem[];
  __shared__ int warp_sums[kWarps];
  uint32_t* qs = smem;
  int* sh_kth = reinterpret_cast<int*>(smem + bq * words);
  int* sh_closer_total = sh_kth + bq;
  int* sh_ties_wanted = sh_closer_total + bq;
  int* sh_closer_next = sh_ties_wanted + bq;  // next closer slot of this tile
  int* sh_tie_next = sh_closer_next + bq;     // next tie rank of this tile
  const int nqb = load_queries(queries, nq, words, bq, qs);
  const int q0 = blockIdx.y * bq;
  if (threadIdx.x < nqb) {
    const int q = q0 + threadIdx.x;
    const size_t at = size_t(q) * ntiles + blockIdx.x;
    sh_kth[threadIdx.x] = kth[q];
    sh_closer_total[threadIdx.x] = closer_total[q];
    sh_ties_wanted[threadIdx.x] = ties_wanted[q];
    sh_closer_next[threadIdx.x] = closer_off[at];
    sh_tie_next[threadIdx.x] = ties_off[at];
  }
  __syncthreads();
  for (int j = 0; j < kCodesPerThread; ++j) {
    // Thread order within a step is position order, and steps go in position order.
    const int c = blockIdx.x * kTile + j * kThreads + threadIdx.x;
    const bool valid = c < n;
    Code<W> code;
    if (valid) code.load(db, n, words, c);
    for (int q = 0; q < nqb; ++q) {
      const int d = valid ? code.distance(qs + q * words) : -1;
      const bool is_closer = valid && d < sh_kth[q];
      const bool is_tie = valid && d == sh_kth[q];
      // Both ranks in one scan: closer in the low 16 bits, ties in the high (<= 256 each).
      int total;
      const int ranks = block_exclusive_scan(int(is_closer) | (int(is_tie) << 16), warp_sums, &total);
      const size_t row = size_t(q0 + q) * k;
      if (is_closer) {
        const int slot = sh_closer_next[q] + (ranks & 0xffff);
        out_d[row + slot] = d;
        out_p[row + slot] = c;
      } else if (is_tie) {
        const int rank = sh_tie_next[q] + (ranks >> 16);
        if (rank < sh_ties_wanted[q]) {
          const int slot = sh_closer_total[q] + rank;
          out_d[row + slot] = d;
          out_p[row + slot] = c;
        }
      }
      __syncthreads();  // every thread has read this step's bases
      if (threadIdx.x == 0) {
        sh_closer_next[q] += total & 0xffff;
        sh_tie_next[q] += total >> 16;
      }
      __syncthreads();
    }
  }
}

// Sorts each query's k results by (distance, position) with a bitonic sort in shared memory.
__global__ void sort_rows_kernel(int32_t* __restrict__ out_d, int64_t* __restrict__ out_p, int k, int padded) {
  extern __shared__ unsigned long long keys[];
  const size_t row = size_t(blockIdx.x) * k;
  for (int i = threadIdx.x; i < padded; i += blockDim.x)
    keys[i] = i < k ? (static_cast<unsigned long long>(out_d[row + i]) << 40) |
                          static_cast<unsigned long long>(out_p[row + i])
                    : ~0ull;
  __syncthreads();
  for (int size = 2; size <= padded; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < padded; i += blockDim.x) {
        const int partner = i ^ stride;
        if (partner > i) {
          const bool ascending = (i & size) == 0;
          const unsigned long long a = keys[i], b = keys[partner];
          if ((a > b) == ascending) {
            keys[i] = b;
            keys[partner] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    out_d[row + i] = int32_t(keys[i] >> 40);
    out_p[row + i] = int64_t(keys[i] & ((1ull << 40) - 1));
  }
}

struct Workspace {
  int *hist, *kth, *closer_total, *ties_wanted, *closer, *ties;
};

size_t carve(void* base, int64_t nq, int nbins, int ntiles, Workspace* ws) {
  char* p = static_cast<char*>(base);
  size_t used = 0;
  auto take = [&](size_t count) {
    int* at = reinterpret_cast<int*>(p ? p + used : nullptr);
    used += align_up(count * sizeof(int));
    return at;
  };
  ws->hist = take(size_t(nq) * nbins);
  ws->kth = take(size_t(nq));
  ws->closer_total = take(size_t(nq));
  ws->ties_wanted = take(size_t(nq));
  ws->closer = take(size_t(nq) * ntiles);
  ws->ties = take(size_t(nq) * ntiles);
  return used;
}

template <int W>
void launch_passes(const uint32_t* db, int n, int words, const uint32_t* queries, int nq, int bq, int nbins,
                   int ntiles, int k, const Workspace& ws, int32_t* out_d, int64_t* out_p, cudaStream_t stream) {
  const dim3 grid(ntiles, (nq + bq - 1) / bq);
  const size_t q_bytes = size_t(bq) * words * sizeof(uint32_t);
  histogram_kernel<W><<<grid, kThreads, q_bytes + size_t(bq) * nbins * sizeof(int), stream>>>(
      db, n, words, queries, nq, bq, nbins, ws.hist);
  kth_kernel<<<(nq + 127) / 128, 128, 0, stream>>>(ws.hist, nq, nbins, k, ws.kth, ws.closer_total, ws.ties_wanted);
  tile_counts_kernel<W><<<grid, kThreads, q_bytes + 3 * size_t(bq) * sizeof(int), stream>>>(
      db, n, words, queries, nq, bq, ws.kth, ntiles, ws.closer, ws.ties);
  row_exclusive_scan_kernel<<<nq, kThreads, 0, stream>>>(ws.closer, ws.ties, ntiles);
  select_kernel<W><<<grid, kThreads, q_bytes + 5 * size_t(bq) * sizeof(int), stream>>>(
      db, n, words, queries, nq, bq, ws.kth, ws.closer_total, ws.ties_wanted, ws.closer, ws.ties, ntiles, k, out_d,
      out_p);
}

}  // namespace

extern "C" size_t cbir_hamming_knn_cuda_workspace(int64_t n, int64_t nq, int bits, int k) {
  (void)k;
  Workspace ws;
  const int ntiles = int((n + kTile - 1) / kTile);
  return carve(nullptr, nq, bits + 1, ntiles, &ws);
}

extern "C" int cbir_hamming_knn_cuda(const uint32_t* db_words_t, int64_t n, int words, const uint32_t* queries,
                                     int64_t nq, int bits, int k, int32_t* out_distances, int64_t* out_positions,
                                     void* workspace, size_t workspace_bytes, void* stream_ptr) {
  if (k < 1 || k > n || k > CBIR_HAMMING_CUDA_MAX_K || bits < 1 || bits > CBIR_HAMMING_CUDA_MAX_BITS ||
      n >= (int64_t(1) << 31) || words * 32 < bits || nq < 0)
    return -1;
  if (nq == 0) return 0;
  if (workspace_bytes < cbir_hamming_knn_cuda_workspace(n, nq, bits, k)) return -1;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int nbins = bits + 1;
  const int ntiles = int((n + kTile - 1) / kTile);
  const int bq = queries_per_block(bits);
  Workspace ws;
  carve(workspace, nq, nbins, ntiles, &ws);
  cudaError_t err = cudaMemsetAsync(ws.hist, 0, size_t(nq) * nbins * sizeof(int), stream);
  if (err != cudaSuccess) return int(err);
  // gridDim.y is at most 65535 blocks of queries: go in chunks of queries.
  const int64_t chunk = int64_t(65535) * bq;
  for (int64_t q0 = 0; q0 < nq; q0 += chunk) {
    const int m = int(nq - q0 < chunk ? nq - q0 : chunk);
    Workspace part = ws;
    part.hist += q0 * nbins;
    part.kth += q0;
    part.closer_total += q0;
    part.ties_wanted += q0;
    part.closer += q0 * ntiles;
    part.ties += q0 * ntiles;
    const uint32_t* q = queries + q0 * words;
    int32_t* d = out_distances + q0 * k;
    int64_t* p = out_positions + q0 * k;
    switch (words) {
      case 1: launch_passes<1>(db_words_t, int(n), words, q, m, bq, nbins, ntiles, k, part, d, p, stream); break;
      case 2: launch_passes<2>(db_words_t, int(n), words, q, m, bq, nbins, ntiles, k, part, d, p, stream); break;
      case 3: launch_passes<3>(db_words_t, int(n), words, q, m, bq, nbins, ntiles, k, part, d, p, stream); break;
      case 4: launch_passes<4>(db_words_t, int(n), words, q, m, bq, nbins, ntiles, k, part, d, p, stream); break;
      case 8: launch_passes<8>(db_words_t, int(n), words, q, m, bq, nbins, ntiles, k, part, d, p, stream); break;
      case 16: launch_passes<16>(db_words_t, int(n), words, q, m, bq, nbins, ntiles, k, part, d, p, stream); break;
      case 32: launch_passes<32>(db_words_t, int(n), words, q, m, bq, nbins, ntiles, k, part, d, p, stream); break;
      default: launch_passes<0>(db_words_t, int(n), words, q, m, bq, nbins, ntiles, k, part, d, p, stream); break;
    }
    int padded = 1;
    while (padded < k) padded <<= 1;
    sort_rows_kernel<<<m, kThreads, size_t(padded) * sizeof(unsigned long long), stream>>>(d, p, k, padded);
    err = cudaGetLastError();
    if (err != cudaSuccess) return int(err);
  }
  return 0;
}
