// GEMM micro-kernels with AVX-512F: a row of the 16-column tile is one zmm, and each row's A
// element is broadcast straight from memory into the FMA ({1to16}), so a k step is one load and
// R fused broadcast-FMAs. At the same FMA peak as the AVX2 kernel (two 256-bit FMA pipes on
// Zen 4), that is a third of the instructions: less for a busy sibling hyperthread to contend
// for. The build targets AVX2, so these functions carry their own target attribute and are
// reached only through avx512_micro() after a run-time CPU check.
#include <immintrin.h>

#include "cpu/gemm.h"
#include "cpu/gemm_micro.h"

#define CBIR_AVX512 __attribute__((target("avx512f")))

namespace cbir::cpu::gemm_detail {
namespace {

constexpr int MR = kGemmMR;
constexpr int NR = kGemmNR;
static_assert(NR == 16, "one zmm per tile row");

// acc[r] = sum over the kc steps of A panel row r times the B panel row (one zmm per row).
// Each row's sum is a chain of dependent FMAs, and a chain takes a step only every FMA latency (4
// cycles): below 4 rows the chains, not the FMA unit, would set the pace (1, 2 and 3 rows ran at
// 31%, 53% and 77% of the peak). Such tiles keep kSets partial sums a row, over interleaved k
// steps, and add them at the end.
template <int R>
CBIR_AVX512 inline __attribute__((always_inline)) void panel_product(int kc, const float* __restrict a,
                                                                     const float* __restrict b, __m512 acc[R]) {
  constexpr int kSets = R >= 4 ? 1 : R == 1 ? 4 : 2;
  __m512 part[kSets][R];
#pragma GCC unroll 4
  for (int s = 0; s < kSets; ++s)
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) part[s][r] = _mm512_setzero_ps();
  // Pointer steps, not k * MR indexing: int indices cost a sign extension per broadcast.
  const float* const end = b + int64_t(kc) * NR;
  if constexpr (kSets > 1) {
    for (; end - b >= kSets * NR; b += kSets * NR, a += kSets * MR) {
#pragma GCC unroll 4
      for (int s = 0; s < kSets; ++s) {
        __m512 bv = _mm512_loadu_ps(b + s * NR);
        // Held in a register: otherwise the compiler folds this load into every FMA of the step
        // and broadcasts A separately, twice the loads.
        asm("" : "+v"(bv));
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r) part[s][r] = _mm512_fmadd_ps(_mm512_set1_ps(a[s * MR + r]), bv, part[s][r]);
      }
    }
  }
#pragma GCC unroll 2
  for (; b != end; b += NR, a += MR) {
    const __m512 bv = _mm512_loadu_ps(b);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) part[0][r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r]), bv, part[0][r]);
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    acc[r] = part[0][r];
#pragma GCC unroll 4
    for (int s = 1; s < kSets; ++s) acc[r] = _mm512_add_ps(acc[r], part[s][r]);
  }
}

template <int R, bool kFused>
CBIR_AVX512 void micro_kernel(int kc, const float* __restrict a, const float* __restrict b, float* __restrict c,
                              int64_t ldc, bool accumulate, const TileEpilogue* ep) {
  __m512 acc[R];
  panel_product<R>(kc, a, b, acc);
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    float* row = c + r * ldc;
    if (accumulate) acc[r] = _mm512_add_ps(acc[r], _mm512_loadu_ps(row));
    if (kFused) {
      if (ep->row_bias) acc[r] = _mm512_add_ps(acc[r], _mm512_set1_ps(ep->row_bias[r]));
      if (ep->col_bias) acc[r] = _mm512_add_ps(acc[r], _mm512_loadu_ps(ep->col_bias));
      if (ep->res) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(ep->beta), _mm512_loadu_ps(ep->res + r * ep->res_rs), acc[r]);
      // MAXPS/MINPS return the second operand when either is NaN: data second keeps NaN.
      if (ep->relu) {
        acc[r] = _mm512_max_ps(_mm512_setzero_ps(), acc[r]);
      } else if (ep->clip) {
        acc[r] = _mm512_min_ps(_mm512_set1_ps(ep->hi), _mm512_max_ps(_mm512_set1_ps(ep->lo), acc[r]));
      }
    }
    _mm512_storeu_ps(row, acc[r]);
  }
}

// A tile of fewer than 16 columns (the last panel of a row whose length is not a multiple of 16):
// the same sums, loaded and stored under a lane mask straight in C (masked lanes are never
// touched, so rows may end anywhere), where the AVX2 path goes through a scratch tile.
template <int R>
CBIR_AVX512 void micro_kernel_masked(int kc, const float* __restrict a, const float* __restrict b,
                                     float* __restrict c, int64_t ldc, bool accumulate, int cols) {
  __m512 acc[R];
  panel_product<R>(kc, a, b, acc);
  const __mmask16 mask = __mmask16((1u << cols) - 1u);
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    float* row = c + r * ldc;
    if (accumulate) acc[r] = _mm512_add_ps(acc[r], _mm512_maskz_loadu_ps(mask, row));
    _mm512_mask_storeu_ps(row, mask, acc[r]);
  }
}

constexpr MaskedMicroFn kMasked[MR + 1] = {nullptr,
                                           micro_kernel_masked<1>, micro_kernel_masked<2>, micro_kernel_masked<3>,
                                           micro_kernel_masked<4>, micro_kernel_masked<5>, micro_kernel_masked<6>};

constexpr MicroFn kPlain[MR + 1] = {nullptr,
                                    micro_kernel<1, false>, micro_kernel<2, false>, micro_kernel<3, false>,
                                    micro_kernel<4, false>, micro_kernel<5, false>, micro_kernel<6, false>};
constexpr MicroFn kFusedTable[MR + 1] = {nullptr,
                                         micro_kernel<1, true>, micro_kernel<2, true>, micro_kernel<3, true>,
                                         micro_kernel<4, true>, micro_kernel<5, true>, micro_kernel<6, true>};

}  // namespace

bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
const MicroFn* avx512_micro() { return kPlain; }
const MicroFn* avx512_micro_fused() { return kFusedTable; }
const MaskedMicroFn* avx512_micro_masked() { return kMasked; }

}  // namespace cbir::cpu::gemm_detail
