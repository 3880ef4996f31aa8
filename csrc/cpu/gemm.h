// Single-precision GEMM with packed operands and a fused epilogue, the workhorse behind Conv,
// Gemm and MatMul. C[M,N] = act(alpha * A[M,K] @ B[K,N] + bias + beta * residual).
//
// Packed layouts (zero-padded to whole panels), blocked by KC rows of K so that what one K block
// of the product reads is one contiguous stretch (streams well when weights come from memory):
//   A: for each K block [k0, k0+kc): ceil(M/MR) panels of kc x MR floats, starting at
//      Mp*MR*k0 (Mp = ceil(M/MR)); element (i, k) at block(k0) + (i/MR)*kc*MR + (k-k0)*MR + i%MR
//   B: likewise with NR-column panels: block(k0) = Np*NR*k0, panel q at q*kc*NR inside it
// Weights are packed once at load time; activations are packed block by block into the
// per-thread scratch, so the hot path allocates nothing.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/parallel.h"

namespace cbir::cpu {

constexpr int kGemmMR = 6;
constexpr int kGemmNR = 16;
constexpr int kGemmKC = 256;  // K block: an A micro-panel and a B micro-panel stay in L1

enum class Act : int32_t { None = 0, Relu = 1, Clip = 2, LeakyRelu = 3, Sigmoid = 4 };

// What happens to each output element after the dot product.
struct Epilogue {
  float alpha = 1.0f;
  const float* bias = nullptr;  // length M (bias_per_row) or N
  bool bias_per_row = true;
  const float* residual = nullptr;  // element (i, j) at residual[i*res_rs + j*res_cs]
  int64_t res_rs = 0, res_cs = 0, res_bs = 0;  // res_bs: per batch entry
  float beta = 1.0f;
  Act act = Act::None;
  float act_a = 0.0f, act_b = 0.0f;  // Clip: [a, b]; LeakyRelu: slope a
};

// Applies `ep` to rows [0, m) x cols [0, n) of the tile at c (row stride ldc), whose top-left
// element is (i0, j0) of the whole output; `res` is the residual base for this batch entry.
void apply_epilogue(const Epilogue& ep, const float* res, int i0, int j0, int m, int n, float* c,
                    int64_t ldc);
// Same activation on a flat array, for standalone activation kernels.
void apply_act(Act act, float a, float b, float* y, int64_t n);

size_t packed_a_floats(int M, int K);
size_t packed_b_floats(int K, int N);
// Packs A (element (i, k) at a[i*rs + k*cs]) into the layout above.
void pack_a(const float* a, int64_t rs, int64_t cs, int M, int K, float* out);
// Packs B (element (k, j) at b[k*rs + j*cs]) into the layout above.
void pack_b(const float* b, int64_t rs, int64_t cs, int K, int N, float* out);

// Fills a packed B block: rows [k0, k0+kc), columns [n0, n0+nc) of batch entry `batch`,
// written as ceil(nc/NR) panels of kc x NR floats (zero padded), `panel_stride` floats apart.
// Lets Conv pack im2col columns straight from the image without materialising im2col.
using PackBFn = void (*)(const void* ctx, int64_t batch, int k0, int kc, int n0, int nc,
                         float* dst, int64_t panel_stride);

// The memory a block of B is packed from: `outer` x `inner` runs of `run` floats, the first at
// `first`, runs `inner_stride` floats apart within a group and groups `outer_stride` apart (for
// im2col: the input rows a block of output pixels reads, in each of its channels). A superset
// is fine: it only steers prefetches.
struct BSource {
  const float* first = nullptr;
  int64_t outer_stride = 0, inner_stride = 0;
  int outer = 0, inner = 1, run = 0;
};
using BSourceFn = BSource (*)(const void* ctx, int64_t batch, int k0, int kc, int n0, int nc);

struct GemmParams {
  int M = 0, N = 0, K = 0;
  int64_t batch = 1;
  // A: prepacked (a_packed, a_packed_bs floats apart per batch entry; 0: shared) or strided.
  const float* a_packed = nullptr;
  int64_t a_packed_bs = 0;
  const float* a = nullptr;
  int64_t a_rs = 0, a_cs = 0, a_bs = 0;
  // B: prepacked (b_packed, b_packed_bs floats apart per batch entry), strided (b, b_rs, b_cs,
  // b_bs) or a custom packer. While the tiles of one block run, the source of the next block is
  // prefetched: for strided B with unit column stride, or where the packer says what it reads
  // (b_source_fn, given pack_b_ctx).
  const float* b_packed = nullptr;
  int64_t b_packed_bs = 0;
  const float* b = nullptr;
  int64_t b_rs = 0, b_cs = 0, b_bs = 0;
  PackBFn pack_b_fn = nullptr;
  BSourceFn b_source_fn = nullptr;
  const void* pack_b_ctx = nullptr;
  // C: element (i, j) of batch entry t at c[t*c_bs + i*ldc + j].
  float* c = nullptr;
  int64_t ldc = 0, c_bs = 0;
  Epilogue ep;
  // Shared buffer of gemm_workspace_floats(): when several row blocks read the same B columns
  // (few columns, many rows: late layers at batch 1), B is packed once into it, not per task.
  float* workspace = nullptr;
};

// The instruction set of the full-width micro-kernels ("avx512" or "avx2"), and a way to pin it
// ("auto", "avx2", "avx512"; false when unknown or the CPU lacks it), for tests and comparisons.
const char* gemm_isa();
bool gemm_set_isa(const char* name);
// Whether the AVX-512F micro-kernels run (what gemm_isa() names); the direct conv follows it.
bool gemm_uses_avx512();

// Per-thread scratch the call needs (floats).
size_t gemm_scratch_floats(const GemmParams& p, int threads);
// Shared workspace that lets the call pack B once (0: it never needs to).
size_t gemm_workspace_floats(const GemmParams& p, int threads);
void run_gemm(const GemmParams& p, Parallel& par);

}  // namespace cbir::cpu
