// The GEMM micro-kernel interface shared by the AVX2 kernels (gemm.cpp) and the AVX-512 ones
// (gemm_avx512.cpp, chosen at run time): one MR x NR tile of C from one packed A panel and one
// packed B panel (layouts in gemm.h).
#pragma once

#include <cstdint>

namespace cbir::cpu::gemm_detail {

// The epilogue of one full-width tile, applied on the accumulators before the single store
// (bias, residual, ReLU/Clip; other cases take the separate apply_epilogue pass).
struct TileEpilogue {
  const float* row_bias = nullptr;  // bias of the tile's first row (per-row bias)
  const float* col_bias = nullptr;  // bias of the tile's first column (per-column bias)
  const float* res = nullptr;       // residual of the tile's first element, unit column stride
  int64_t res_rs = 0;
  float beta = 1.0f;
  bool relu = false, clip = false;
  float lo = 0.0f, hi = 0.0f;
};

// C (+)= A_panel[kc x MR] * B_panel[kc x NR] for the first R rows (R = table index); with a
// TileEpilogue, it is applied in registers before the store.
using MicroFn = void (*)(int kc, const float* a, const float* b, float* c, int64_t ldc, bool accumulate,
                         const TileEpilogue* ep);

// A tile of `cols` < NR columns, written in place (no epilogue).
using MaskedMicroFn = void (*)(int kc, const float* a, const float* b, float* c, int64_t ldc, bool accumulate,
                               int cols);

// Full-width (NR = 16) tiles with one 16-float vector per row; tables indexed by rows (1..6).
// Call only when cpu_has_avx512f().
bool cpu_has_avx512f();
const MicroFn* avx512_micro();
const MicroFn* avx512_micro_fused();
const MaskedMicroFn* avx512_micro_masked();

}  // namespace cbir::cpu::gemm_detail
