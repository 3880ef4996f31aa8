// Pooling kernels shared between pool.cpp and its AVX-512 file.
#pragma once

#include <cstdint>

#include "cpu/ops.h"

namespace cbir::cpu::pool_detail {

// Windows of 1-3 rows and 2 or 3 columns at column stride 2 (the max and average pools of
// AlexNet, VGG, ResNet, GoogLeNet, Inception and DenseNet): any row stride and row dilation, left
// padding up to 2, any other padding.
bool stride2_fits(const Pool2dParams& p);
// Output columns rounded up to whole 16-float vectors (the rows of `factors` below).
inline int stride2_row_floats(const Pool2dParams& p) { return (p.OW + 15) / 16 * 16; }

// Pools plane t (0 <= t < N * C) with AVX-512F. Averages multiply by factors[oy * row_floats +
// ox] (1 / the window's divisor); maxima take no factors. Returns false, having written garbage,
// when the plane may hold a NaN: plain vector max drops NaN, so the caller pools the plane again
// with the NaN-keeping kernel. Only where the CPU has AVX-512F.
bool stride2_plane_avx512(bool is_max, const Pool2dParams& p, int64_t t, const float* factors);

}  // namespace cbir::cpu::pool_detail
