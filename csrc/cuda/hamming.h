// Hamming k-NN on an NVIDIA GPU: blocked popcount distances and top-k by counting (k <= 4096).
// A plain C ABI, so it can be called from the C++ runtime or loaded with ctypes from Python.
//
// Layout: 32-bit code words; the database word-major ([words, n]: a warp's loads coalesce) and
// in id order, so that among equal distances the smallest position is the smallest id.
// Passes per call: per-query distance histograms, the k-th distance per query, per-(query, tile)
// counts of closer and tying codes, exclusive offsets over the tiles, a deterministic write of the
// k kept codes (closer ones, then the first ties in position order), a per-query sort by
// (distance, position). No result depends on thread timing.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef __cplusplus
extern "C" {
#endif

#define CBIR_HAMMING_CUDA_MAX_K 4096
#define CBIR_HAMMING_CUDA_MAX_BITS 4096

// Bytes of device workspace cbir_hamming_knn_cuda needs for these sizes.
size_t cbir_hamming_knn_cuda_workspace(int64_t n, int64_t nq, int bits, int k);

// All pointers are device pointers; `stream` is a cudaStream_t (0: the default stream).
// Returns 0 on success, else a cudaError_t value (or -1 for arguments out of range:
// k < 1, k > n, k > CBIR_HAMMING_CUDA_MAX_K, bits > CBIR_HAMMING_CUDA_MAX_BITS, too small a
// workspace, n >= 2^31).
int cbir_hamming_knn_cuda(const uint32_t* db_words_t, int64_t n, int words, const uint32_t* queries, int64_t nq,
                          int bits, int k, int32_t* out_distances, int64_t* out_positions, void* workspace,
                          size_t workspace_bytes, void* stream);

#ifdef __cplusplus
}
#endif
